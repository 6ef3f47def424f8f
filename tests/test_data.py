"""The data pipeline: the embedded corpus, its deterministic split, other sources, and batches that are
pure functions of (seed, step)."""
from __future__ import annotations

import os
import sys
import sysconfig

import ml_collections
import numpy as np
import pytest

from zoo import data


def data_config(**kw) -> ml_collections.ConfigDict:
    cfg = ml_collections.ConfigDict(dict(source="stdlib", paths="", tokenizer="bytes", val_fraction=0.05,
                                         token_dtype="uint16"))
    cfg.update(kw)
    return cfg


@pytest.fixture(scope="module")
def stdlib_corpus():
    return data.load_corpus(data_config())


def test_stdlib_files_sorted_and_filtered():
    root = sysconfig.get_paths()["stdlib"]
    files = data.stdlib_files()
    rel = [os.path.relpath(f, root) for f in files]
    assert rel == sorted(rel) and len(rel) > 300
    assert all(f.endswith(".py") for f in files)
    assert not any(set(r.split(os.sep)[:-1]) & data.SKIPPED_DIRS for r in rel)
    assert "os.py" in rel and os.path.join("json", "decoder.py") in rel


def test_split_is_deterministic_disjoint_and_relative():
    files = data.stdlib_files()
    train, val = data.split_files(files, 0.05)
    assert set(train).isdisjoint(val) and set(train) | set(val) == set(files)
    assert 0.02 < len(val) / len(files) < 0.1
    assert [sorted(s) for s in data.split_files(list(reversed(files)), 0.05)] == [sorted(train), sorted(val)]
    # The split depends on paths relative to the files' common folder, not on where they live.
    root = sysconfig.get_paths()["stdlib"]
    moved = ["/elsewhere/lib/" + os.path.relpath(f, root) for f in files]
    moved_train, moved_val = data.split_files(moved, 0.05)
    assert [os.path.relpath(f, "/elsewhere/lib") for f in moved_val] == [os.path.relpath(f, root) for f in val]
    with pytest.raises(ValueError, match="val_fraction"):
        data.split_files(files, 1.5)


def test_stdlib_corpus_is_the_files_bytes(stdlib_corpus):
    c = stdlib_corpus
    assert c.bytes_per_token == 1.0 and c.train_N.dtype == np.uint8
    with open(c.train_files[0], "rb") as f:
        first = f.read()
    assert bytes(c.train_N[:len(first)]) == first
    assert len(c.val_N) == sum(os.path.getsize(f) for f in c.val_files)
    assert data.load_corpus(data_config()) is c   # read once, kept in memory


def test_train_batch_is_a_pure_function_of_seed_and_step(stdlib_corpus):
    kw = dict(batch_size=4, seq_len=64)
    x1, y1 = data.train_batch(stdlib_corpus, seed=0, step=7, **kw)
    x2, y2 = data.train_batch(stdlib_corpus, seed=0, step=7, **kw)
    assert x1.shape == y1.shape == (4, 64) and x1.dtype == np.int32
    np.testing.assert_array_equal(x1, x2)
    np.testing.assert_array_equal(y1, y2)
    np.testing.assert_array_equal(x1[:, 1:], y1[:, :-1])   # targets are the next tokens
    assert not np.array_equal(x1, data.train_batch(stdlib_corpus, seed=0, step=8, **kw)[0])
    assert not np.array_equal(x1, data.train_batch(stdlib_corpus, seed=1, step=7, **kw)[0])


def test_validation_batches_are_fixed_and_from_validation_files(stdlib_corpus):
    x1, y1 = data.val_batch(stdlib_corpus, index=3, batch_size=2, seq_len=32)
    x2, _ = data.val_batch(stdlib_corpus, index=3, batch_size=2, seq_len=32)
    np.testing.assert_array_equal(x1, x2)
    assert not np.array_equal(x1, data.val_batch(stdlib_corpus, index=4, batch_size=2, seq_len=32)[0])
    val_text = bytes(stdlib_corpus.val_N)
    for row, last in zip(x1, y1[:, -1]):
        assert bytes(row.astype(np.uint8)) + bytes([last]) in val_text


def test_text_files_by_glob(tmp_path):
    for i in range(40):
        (tmp_path / f"doc{i:02d}.txt").write_text(f"document {i}\n" * 20)
    corpus = data.load_corpus(data_config(source="text", paths=str(tmp_path / "*.txt"), val_fraction=0.2))
    assert corpus.val_files and corpus.train_files and set(corpus.val_files).isdisjoint(corpus.train_files)
    assert len(corpus.train_N) + len(corpus.val_N) == sum(f.stat().st_size for f in tmp_path.iterdir())


def test_single_text_file_holds_out_its_tail(tmp_path):
    (tmp_path / "only.txt").write_bytes(bytes(range(200)) * 5)
    corpus = data.load_corpus(data_config(source="text", paths=str(tmp_path / "only.txt"), val_fraction=0.1))
    assert len(corpus.val_N) == 100 and bytes(corpus.val_N) == (bytes(range(200)) * 5)[900:]


def test_missing_files_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing_here"):
        data.load_corpus(data_config(source="text", paths=str(tmp_path / "nothing_here/*.txt")))
    with pytest.raises(ValueError, match="data.paths is empty"):
        data.load_corpus(data_config(source="text"))
    with pytest.raises(ValueError, match="unknown data.source"):
        data.load_corpus(data_config(source="parquet"))


@pytest.mark.parametrize("token_dtype, vocab", [("uint16", 50_000), ("uint32", 100_000)])
def test_token_files(tmp_path, token_dtype, vocab):
    rng = np.random.default_rng(0)
    docs = [rng.integers(0, vocab, size=300 + i) for i in range(30)]
    for i, ids in enumerate(docs):
        np.asarray(ids, data.TOKEN_DTYPES[token_dtype]).tofile(tmp_path / f"part{i:02d}.bin")
    corpus = data.load_corpus(data_config(source="tokens", paths=str(tmp_path / "*.bin"), token_dtype=token_dtype,
                                          val_fraction=0.2))
    by_name = {f"part{i:02d}.bin": ids for i, ids in enumerate(docs)}
    expected = np.concatenate([by_name[os.path.basename(f)] for f in corpus.val_files])
    np.testing.assert_array_equal(corpus.val_N, expected)
    data.check_fits(corpus, vocab, seq_len=64)
    with pytest.raises(ValueError, match="model.vocab_size is 256"):
        data.check_fits(corpus, 256, seq_len=64)
    (tmp_path / "part00.bin").write_bytes(b"\x01\x02\x03")
    with pytest.raises(ValueError, match="not a multiple"):
        data.load_corpus(data_config(source="tokens", paths=str(tmp_path / "part00.bin"), token_dtype=token_dtype))


def test_hugging_face_tokenizer(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = ["def", "return", "x", "y", "(", ")", ":", "+", "import", "os"]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(["[UNK]"] + words)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(tmp_path / "tokenizer.json"))
    for i in range(30):
        (tmp_path / f"f{i:02d}.py").write_text("def f(x): return x + y\nimport os\n" * (i + 1))
    corpus = data.load_corpus(data_config(source="text", paths=str(tmp_path / "*.py"), val_fraction=0.2,
                                          tokenizer=str(tmp_path / "tokenizer.json")))
    val_bytes = sum(os.path.getsize(f) for f in corpus.val_files)
    assert corpus.bytes_per_token == pytest.approx(val_bytes / len(corpus.val_N))
    assert corpus.bytes_per_token > 2.0           # words, not bytes
    assert corpus.train_N.max() < 11 and corpus.train_N.dtype == np.uint32
    with pytest.raises(FileNotFoundError, match="no such tokenizer file"):
        data.load_corpus(data_config(source="text", paths=str(tmp_path / "*.py"),
                                     tokenizer=str(tmp_path / "missing.json")))


def test_missing_tokenizers_package_is_named(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "tokenizers", None)     # as if it were not installed
    with pytest.raises(ImportError, match="needs the `tokenizers` package: pip install tokenizers"):
        data.load_corpus(data_config(source="text", paths=__file__, tokenizer=str(tmp_path / "tokenizer.json")))


def test_check_fits_names_a_too_long_window(stdlib_corpus):
    with pytest.raises(ValueError, match="validation split has"):
        data.check_fits(stdlib_corpus, 256, seq_len=len(stdlib_corpus.val_N))
