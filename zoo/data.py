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

Task mix (`data.task_mix_rate` > 0): that fraction of training windows, on average, holds a `zoo.tasks`
example instead of plain text, so a replica learns retrieval while it trains. Such a window is training
text, then the task's prompt, then its answer, ending at the window's end: `seq_len + 1` tokens, the
answer's tokens being the last targets. The loss is the usual next-token loss over the whole window, so
it covers the answer tokens (and the prompt: haystack text, template and needles; this needs no change
to the training step and keeps the answer in the ordinary objective). Each example's length (prompt +
answer) comes from `data.task_lengths` (default: the whole window); with `data.task_curriculum_steps` N
> 0 the lengths, sorted, unlock one by one over the first N steps (step s may draw the first
`1 + floor(s * k / N)` of k lengths, uniformly), so retrieval is learnt short before long. Task, length,
depth and example seed come from `default_rng([seed, step, TASK_STREAM])`: a batch is still a pure
function of `(seed, step)`, and the plain-text rows are those of the batch without the mix. The haystack
is the training split (the evaluation sweeps use the validation split). The mix travels with the corpus
(`Corpus.task_mix`, set by `load_corpus`), so the training loop needs no change; rate 0 (the default)
leaves every batch bit for bit as before.
"""
from __future__ import annotations

import dataclasses
import functools
import glob
import hashlib
import os
import sysconfig

import numpy as np

from zoo import tasks

SOURCES = ("stdlib", "text", "tokens")
TOKEN_DTYPES = {"uint16": np.dtype("<u2"), "uint32": np.dtype("<u4")}
SKIPPED_DIRS = frozenset({"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"})
VAL_STREAM = 0x76616C  # the validation windows' own random stream, independent of train.seed
TASK_STREAM = 0x7461736B  # the task mix's draws, apart from the text windows' own


@dataclasses.dataclass(frozen=True)
class TaskMix:
    """The `data.task_*` settings (module docstring, "Task mix")."""
    rate: float
    names: tuple[str, ...]
    lengths: tuple[int, ...]       # example lengths, ascending; empty: the whole window
    curriculum_steps: int
    tokenizer: str


@dataclasses.dataclass(frozen=True)
class Corpus:
    """Token streams of the two splits (documents concatenated) and what is needed to report bits/byte."""
    train_N: np.ndarray
    val_N: np.ndarray
    bytes_per_token: float       # UTF-8 bytes per validation token: bits/byte = nats / ln 2 / this
    train_files: tuple[str, ...]
    val_files: tuple[str, ...]
    task_mix: TaskMix | None = None   # training windows that hold zoo.tasks examples (None: none)


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
    """The corpus a `config.data` names, read once per process and kept in memory; with the task mix on,
    the same token streams carrying it."""
    corpus = _load(data_cfg.source, data_cfg.get("paths", ""), data_cfg.get("tokenizer", "bytes"),
                   float(data_cfg.val_fraction), data_cfg.get("token_dtype", "uint16"))
    mix = task_mix(data_cfg)
    return corpus if mix is None else dataclasses.replace(corpus, task_mix=mix)


def task_mix(data_cfg) -> TaskMix | None:
    """The task mix `data.task_*` asks for (None when `task_mix_rate` is 0 or absent), validated."""
    rate = float(data_cfg.get("task_mix_rate", 0.0))
    if not 0.0 <= rate <= 1.0:
        raise ValueError(f"data.task_mix_rate must be in [0, 1], got {rate}")
    if rate == 0.0:
        return None
    names = tasks.check_task_names(str(data_cfg.get("task_names", ",".join(tasks.TASKS))).split(","))
    try:
        lengths = sorted(int(n) for n in str(data_cfg.get("task_lengths", "")).split(",") if n.strip())
    except ValueError:
        raise ValueError(f"data.task_lengths must be comma-separated integers, got {data_cfg.task_lengths!r}"
                         ) from None
    steps = int(data_cfg.get("task_curriculum_steps", 0))
    if steps < 0:
        raise ValueError(f"data.task_curriculum_steps must be >= 0, got {steps}")
    tokenizer_name = data_cfg.get("tokenizer", "bytes")
    if data_cfg.source == "tokens" and tokenizer_name == "bytes":
        raise ValueError("data.task_mix_rate > 0 with data.source='tokens' needs data.tokenizer (the "
                         "tokenizer.json of the token files) to write the task prompts")
    return TaskMix(rate, tuple(names), tuple(lengths), steps, tokenizer_name)


def check_fits(corpus: Corpus, vocab_size: int, seq_len: int) -> None:
    """Fails with the reason when the model cannot read the corpus or a window does not fit a split."""
    highest = max(int(corpus.train_N.max(initial=0)), int(corpus.val_N.max(initial=0)))
    if highest >= vocab_size:
        raise ValueError(f"the data has token id {highest} but model.vocab_size is {vocab_size}")
    for name, tokens_N in (("training", corpus.train_N), ("validation", corpus.val_N)):
        if len(tokens_N) < seq_len + 1:
            raise ValueError(f"the {name} split has {len(tokens_N)} tokens, fewer than seq_len + 1 = "
                             f"{seq_len + 1}")
    mix = corpus.task_mix
    if mix is not None:
        lengths = mix.lengths or (seq_len + 1,)
        if lengths[-1] > seq_len + 1:
            raise ValueError(f"data.task_lengths: {lengths[-1]} is longer than a training window (seq_len + 1 = "
                             f"{seq_len + 1})")
        for name in mix.names:   # the shortest length must hold every task (else a one-line error now)
            _task_window(corpus, name, lengths[0], 0.5, 0, seq_len + 1, np.random.default_rng(0))


def _windows(tokens_N: np.ndarray, rng: np.random.Generator, batch_size: int, seq_len: int):
    starts_B = rng.integers(0, len(tokens_N) - seq_len, size=batch_size)
    window_BW = tokens_N[starts_B[:, None] + np.arange(seq_len + 1)].astype(np.int32)
    return window_BW[:, :-1], window_BW[:, 1:]


def train_batch(corpus: Corpus, *, seed: int, step: int, batch_size: int, seq_len: int
                ) -> tuple[np.ndarray, np.ndarray]:
    """(inputs_BT, targets_BT) int32 for training step `step`: random windows drawn by
    `default_rng([seed, step])`, so the batch depends on nothing else."""
    inputs_BT, targets_BT = _windows(corpus.train_N, np.random.default_rng([seed, step]), batch_size, seq_len)
    for row, (name, length, depth, example_seed) in task_rows(corpus.task_mix, seed=seed, step=step,
                                                                  batch_size=batch_size, seq_len=seq_len).items():
        window_W = _task_window(corpus, name, length, depth, example_seed, seq_len + 1,
                                np.random.default_rng([seed, step, TASK_STREAM, row]))
        inputs_BT[row], targets_BT[row] = window_W[:-1], window_W[1:]
    return inputs_BT, targets_BT


def task_rows(mix: TaskMix | None, *, seed: int, step: int, batch_size: int, seq_len: int
              ) -> dict[int, tuple[str, int, float, int]]:
    """The rows of training batch `step` that hold task examples: row -> (task, length, depth, example
    seed), drawn from `default_rng([seed, step, TASK_STREAM])` (module docstring, "Task mix")."""
    if mix is None:
        return {}
    rng = np.random.default_rng([seed, step, TASK_STREAM])
    use_B = rng.random(batch_size) < mix.rate
    task_B = rng.integers(0, len(mix.names), size=batch_size)
    pick_B, depth_B = rng.random(batch_size), rng.random(batch_size)
    seed_B = rng.integers(0, 2 ** 31, size=batch_size)
    lengths = mix.lengths or (seq_len + 1,)
    unlocked = len(lengths)
    if mix.curriculum_steps:
        unlocked = min(len(lengths), 1 + step * len(lengths) // mix.curriculum_steps)
    return {b: (mix.names[task_B[b]], lengths[int(pick_B[b] * unlocked)], float(depth_B[b]), int(seed_B[b]))
            for b in range(batch_size) if use_B[b]}


def _task_window(corpus: Corpus, name: str, length: int, depth: float, example_seed: int, window: int,
                 rng: np.random.Generator) -> np.ndarray:
    """`window` tokens: training text, then the task example (prompt + answer, `length` tokens) at the end.
    A task's answer does not depend on the prompt length (zoo.tasks), so one probe gives its size."""
    tok, haystack_N = tokenizer(corpus.task_mix.tokenizer), corpus.train_N
    try:
        answer = len(tasks.generate(name, seed=example_seed, length=length, depth=depth, tokenizer=tok,
                                    haystack_N=haystack_N).answer_ids_A)
        example = tasks.generate(name, seed=example_seed, length=length - answer, depth=depth, tokenizer=tok,
                                 haystack_N=haystack_N)
    except ValueError as e:
        raise ValueError(f"data.task_lengths: {e}") from None
    example_N = np.concatenate([example.prompt_ids_T, example.answer_ids_A])
    n = window - len(example_N)
    start = int(rng.integers(0, len(corpus.train_N) - n + 1))
    return np.concatenate([corpus.train_N[start:start + n].astype(np.int32), example_N]).astype(np.int32)


def val_batch(corpus: Corpus, *, index: int, batch_size: int, seq_len: int) -> tuple[np.ndarray, np.ndarray]:
    """(inputs_BT, targets_BT) int32: the fixed validation batch number `index`."""
    return _windows(corpus.val_N, np.random.default_rng([VAL_STREAM, index]), batch_size, seq_len)
