"""Training and validation data: token streams and deterministic batches.

Sources (`config.data`):
  - `source="stdlib"` (default, no downloads): the `.py` files of the running Python's standard library
    (`sysconfig.get_paths()["stdlib"]`, recursively, sorted; `site-packages` and test directories skipped).
  - `source="text"`: text files named by `paths` (comma-separated globs, `**` allowed).
  - `source="tokens"`: pre-tokenized files named by `paths`, each a raw little-endian array of token ids
    with no header, `token_dtype` "uint16" (2 bytes per id) or "uint32"; for example written by
    `np.asarray(ids, "<u2").tofile("train.bin")`. Each file is one document stream.
Tokenizer (`data.tokenizer`): "bytes" (token id = byte value, vocabulary 256) or the path of a Hugging
Face `tokenizer.json` (needs the `tokenizers` package). For `tokens` files it only serves to measure bytes
per token; without it their ids count as bytes.

Split: a file goes to validation when a stable hash of its path (relative to the files' common folder)
falls below `val_fraction`; if that leaves either side empty (e.g. one file), the last `val_fraction` of
the token stream is held out instead. Batches are windows of `seq_len + 1` tokens: training batch `step`
is a pure function of `(seed, step)`, validation batch `index` of `index` alone, so a resumed run sees
exactly the batches it would have seen.
"""
from __future__ import annotations

import dataclasses
import functools
import glob
import hashlib
import os
import sysconfig

import numpy as np

SOURCES = ("stdlib", "text", "tokens")
TOKEN_DTYPES = {"uint16": np.dtype("<u2"), "uint32": np.dtype("<u4")}
SKIPPED_DIRS = frozenset({"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"})
VAL_STREAM = 0x76616C  # the validation windows' own random stream, independent of train.seed


@dataclasses.dataclass(frozen=True)
class Corpus:
    """Token streams of the two splits (documents concatenated) and what is needed to report bits/byte."""
    train_N: np.ndarray
    val_N: np.ndarray
    bytes_per_token: float       # UTF-8 bytes per validation token: bits/byte = nats / ln 2 / this
    train_files: tuple[str, ...]
    val_files: tuple[str, ...]


def stdlib_files() -> list[str]:
    """The standard library's `.py` sources, sorted by path relative to the stdlib folder."""
    root = sysconfig.get_paths()["stdlib"]
    found = []
    for folder, subdirs, files in os.walk(root):
        subdirs[:] = sorted(d for d in subdirs if d not in SKIPPED_DIRS)
        found += [os.path.join(folder, f) for f in files if f.endswith(".py")]
    if not found:
        raise FileNotFoundError(f"no .py files under the standard library folder {root}")
    return sorted(found, key=lambda p: os.path.relpath(p, root))


def expand_paths(paths: str) -> list[str]:
    """Files matched by comma-separated globs, sorted; a glob that matches no file is an error."""
    patterns = [p.strip() for p in paths.split(",") if p.strip()]
    if not patterns:
        raise ValueError("data.paths is empty; give comma-separated files or globs")
    files = set()
    for pattern in patterns:
        matched = [f for f in glob.glob(os.path.expanduser(pattern), recursive=True) if os.path.isfile(f)]
        if not matched:
            raise FileNotFoundError(f"data.paths: no files match {pattern!r}")
        files.update(matched)
    return sorted(files)


def is_validation(relative_path: str, val_fraction: float) -> bool:
    """Stable across processes and machines (unlike `hash`): the first 8 bytes of the path's SHA-256."""
    digest = hashlib.sha256(relative_path.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2.0 ** 64 < val_fraction


def split_files(files: list[str], val_fraction: float) -> tuple[list[str], list[str]]:
    """(train, validation) files, decided by each file's path relative to their common folder."""
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"data.val_fraction must be in (0, 1), got {val_fraction}")
    root = os.path.commonpath([os.path.dirname(os.path.abspath(f)) for f in files])
    train, val = [], []
    for f in files:
        rel = os.path.relpath(os.path.abspath(f), root).replace(os.sep, "/")
        (val if is_validation(rel, val_fraction) else train).append(f)
    return train, val


class HFTokenizer:
    """A Hugging Face `tokenizer.json`, through the `tokenizers` package."""

    def __init__(self, path: str):
        try:
            from tokenizers import Tokenizer
        except ImportError:
            raise ImportError(f"data.tokenizer={path!r} needs the `tokenizers` package: "
                              "pip install tokenizers") from None
        if not os.path.isfile(path):
            raise FileNotFoundError(f"data.tokenizer: no such tokenizer file {path!r}")
        self.tokenizer = Tokenizer.from_file(path)

    def encode(self, text_bytes: list[bytes]) -> list[np.ndarray]:
        texts = [b.decode("utf-8", errors="replace") for b in text_bytes]
        encodings = self.tokenizer.encode_batch(texts, add_special_tokens=False)
        return [np.asarray(e.ids, np.uint32) for e in encodings]

    def decoded_bytes(self, ids_N: np.ndarray) -> int:
        return len(self.tokenizer.decode(ids_N.tolist(), skip_special_tokens=False).encode("utf-8"))

    def encode_text(self, text: str) -> np.ndarray:
        """The ids of `text` alone (no special tokens), int32."""
        return np.asarray(self.tokenizer.encode(text, add_special_tokens=False).ids, np.int32)

    def decode(self, ids_N) -> str:
        return self.tokenizer.decode(np.asarray(ids_N).tolist(), skip_special_tokens=False)


class ByteTokenizer:
    """The byte-level tokenizer (`data.tokenizer="bytes"`): token id = UTF-8 byte value."""

    def encode_text(self, text: str) -> np.ndarray:
        return np.frombuffer(text.encode("utf-8"), np.uint8).astype(np.int32)

    def decode(self, ids_N) -> str:
        return bytes(np.asarray(ids_N, np.uint8)).decode("utf-8", errors="replace")


@functools.lru_cache(maxsize=4)
def tokenizer(name: str) -> ByteTokenizer | HFTokenizer:
    """The tokenizer `data.tokenizer` names ("bytes" or a tokenizer.json path), with `encode_text(str)` and
    `decode(ids)`, for code that builds prompts (zoo.tasks)."""
    return ByteTokenizer() if name == "bytes" else HFTokenizer(name)


def _read(files: list[str]) -> list[bytes]:
    out = []
    for f in files:
        with open(f, "rb") as fh:
            out.append(fh.read())
    return out


def _read_tokens(files: list[str], token_dtype: str) -> list[np.ndarray]:
    if token_dtype not in TOKEN_DTYPES:
        raise ValueError(f"unknown data.token_dtype {token_dtype!r}; expected one of {sorted(TOKEN_DTYPES)}")
    dtype = TOKEN_DTYPES[token_dtype]
    out = []
    for f in files:
        size = os.path.getsize(f)
        if size % dtype.itemsize:
            raise ValueError(f"token file {f} has {size} bytes, not a multiple of {dtype.itemsize} "
                             f"({token_dtype}); is data.token_dtype right?")
        out.append(np.fromfile(f, dtype=dtype))
    return out


@functools.lru_cache(maxsize=4)
def _load(source: str, paths: str, tokenizer: str, val_fraction: float, token_dtype: str) -> Corpus:
    if source not in SOURCES:
        raise ValueError(f"unknown data.source {source!r}; expected one of {SOURCES}")
    files = stdlib_files() if source == "stdlib" else expand_paths(paths)
    hf = None if tokenizer == "bytes" else HFTokenizer(tokenizer)
    if source == "tokens":
        docs, doc_bytes = _read_tokens(files, token_dtype), None
    else:
        raw = _read(files)
        docs = hf.encode(raw) if hf else [np.frombuffer(r, np.uint8) for r in raw]
        doc_bytes = [len(r) for r in raw]
    train_files, val_files = split_files(files, val_fraction)
    if train_files and val_files:
        index = {f: i for i, f in enumerate(files)}
        train_N = np.concatenate([docs[index[f]] for f in train_files])
        val_N = np.concatenate([docs[index[f]] for f in val_files])
        val_bytes = sum(doc_bytes[index[f]] for f in val_files) if doc_bytes else None
    else:
        stream_N = np.concatenate(docs)
        cut = int(len(stream_N) * (1.0 - val_fraction))
        train_N, val_N = stream_N[:cut], stream_N[cut:]
        train_files = val_files = files
        val_bytes = None
    if hf is None:
        bytes_per_token = 1.0
    else:
        bytes_per_token = (val_bytes or hf.decoded_bytes(val_N)) / max(len(val_N), 1)
    return Corpus(train_N, val_N, bytes_per_token, tuple(train_files), tuple(val_files))


def load_corpus(data_cfg) -> Corpus:
    """The corpus a `config.data` names, read once per process and kept in memory."""
    return _load(data_cfg.source, data_cfg.get("paths", ""), data_cfg.get("tokenizer", "bytes"),
                 float(data_cfg.val_fraction), data_cfg.get("token_dtype", "uint16"))


def check_fits(corpus: Corpus, vocab_size: int, seq_len: int) -> None:
    """Fails with the reason when the model cannot read the corpus or a window does not fit a split."""
    highest = max(int(corpus.train_N.max(initial=0)), int(corpus.val_N.max(initial=0)))
    if highest >= vocab_size:
        raise ValueError(f"the data has token id {highest} but model.vocab_size is {vocab_size}")
    for name, tokens_N in (("training", corpus.train_N), ("validation", corpus.val_N)):
        if len(tokens_N) < seq_len + 1:
            raise ValueError(f"the {name} split has {len(tokens_N)} tokens, fewer than seq_len + 1 = "
                             f"{seq_len + 1}")


def _windows(tokens_N: np.ndarray, rng: np.random.Generator, batch_size: int, seq_len: int):
    starts_B = rng.integers(0, len(tokens_N) - seq_len, size=batch_size)
    window_BW = tokens_N[starts_B[:, None] + np.arange(seq_len + 1)].astype(np.int32)
    return window_BW[:, :-1], window_BW[:, 1:]


def train_batch(corpus: Corpus, *, seed: int, step: int, batch_size: int, seq_len: int
                ) -> tuple[np.ndarray, np.ndarray]:
    """(inputs_BT, targets_BT) int32 for training step `step`: random windows drawn by
    `default_rng([seed, step])`, so the batch depends on nothing else."""
    return _windows(corpus.train_N, np.random.default_rng([seed, step]), batch_size, seq_len)


def val_batch(corpus: Corpus, *, index: int, batch_size: int, seq_len: int) -> tuple[np.ndarray, np.ndarray]:
    """(inputs_BT, targets_BT) int32: the fixed validation batch number `index`."""
    return _windows(corpus.val_N, np.random.default_rng([VAL_STREAM, index]), batch_size, seq_len)
