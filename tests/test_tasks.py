"""zoo.tasks: every generator's prompt (exact length, the gold needle where the depth says, distractors
free of the gold strings, determinism) with the byte tokenizer and a tokenizer.json, and the scorers."""
from __future__ import annotations

import ml_collections
import numpy as np
import pytest

from zoo import data, tasks

LENGTH = 700
HAYSTACK = ("def walk(top, onerror=None):\n    '''Directory tree generator.'''\n    for name in listdir(top):\n"
            "        yield join(top, name)\n# the grass is green, the sky is blue.\n") * 40


def word_tokenizer(tmp_path):
    """A tiny BPE tokenizer.json: one token per character the texts use, plus a few merges so that token
    and character positions differ (`the`, `key`, `VAR`, ...); it decodes back to the exact text."""
    from tokenizers import Tokenizer, decoders, models

    chars = sorted(set(HAYSTACK) | set("".join(tasks.ADJECTIVES + tasks.NOUNS)) | set(
        "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 \n.,:;?!'-=()_\"#"))
    vocab = {"[UNK]": 0, **{c: i + 1 for i, c in enumerate(chars)}}
    merges = [("t", "h"), ("th", "e"), ("i", "s"), ("V", "A"), ("VA", "R"), ("k", "e"), ("ke", "y"), (" ", "is")]
    for a, b in merges:
        vocab.setdefault(a + b, len(vocab))
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="[UNK]"))
    tok.decoder = decoders.Fuse()
    path = tmp_path / "tokenizer.json"
    tok.save(str(path))
    return data.tokenizer(str(path))


@pytest.fixture(scope="module", params=["bytes", "tokenizer.json"])
def tokenizer_and_haystack(request, tmp_path_factory):
    tok = data.tokenizer("bytes") if request.param == "bytes" else word_tokenizer(tmp_path_factory.mktemp("tok"))
    haystack_N = tok.encode_text(HAYSTACK)
    assert tok.decode(haystack_N) == HAYSTACK      # the tokenizer round-trips the text
    return tok, haystack_N


@pytest.mark.parametrize("task", list(tasks.TASKS))
@pytest.mark.parametrize("depth", [0.0, 0.3, 1.0])
def test_generator(task, depth, tokenizer_and_haystack):
    tok, haystack_N = tokenizer_and_haystack
    e = tasks.generate(task, seed=5, length=LENGTH, depth=depth, tokenizer=tok, haystack_N=haystack_N)
    prompt = e.prompt_ids_T
    assert prompt.shape == (LENGTH,) and prompt.dtype == np.int32
    assert e.answer_ids_A.tolist() == tok.encode_text(e.answer).tolist() and e.gold
    for g in e.gold:
        assert g in e.answer

    # Each needle's tokens are in the prompt where it says; the needles sit inside the context.
    start, end = e.context
    lengths = [len(tok.encode_text(n.text)) for n in e.needles]
    for n, k in zip(e.needles, lengths):
        assert start <= n.position and n.position + k <= end
        assert prompt[n.position:n.position + k].tolist() == tok.encode_text(n.text).tolist()
    assert [n.position for n in e.needles] == sorted(n.position for n in e.needles)
    assert e.filler_tokens == (end - start) - sum(lengths)

    # The needle placed at the depth holds a gold string, after round(depth * F) haystack tokens
    # (mqar: the key-value line boundary at or before it, lines being at most 16 tokens).
    anchor = e.needles[e.depth_needle]
    assert anchor.gold and any(g in anchor.text for g in e.gold)
    before = anchor.position - start - sum(lengths[:e.depth_needle])
    target = round(depth * e.filler_tokens)
    if task == "mqar":
        assert target - 16 < before <= target
    else:
        assert before == target

    # Every gold string is in some gold needle; no distractor needle and no haystack text holds one.
    gold_text = "".join(n.text for n in e.needles if n.gold)
    assert all(g in gold_text for g in e.gold)
    assert any(not n.gold for n in e.needles) == (task in ("niah_multikey", "variable_tracking"))
    for n in e.needles:
        if not n.gold:
            assert not any(g.lower() in n.text.lower() for g in e.gold), (n.text, e.gold)
    haystack_only = np.concatenate([prompt[start:n.position] if i == 0 else
                                    prompt[e.needles[i - 1].position + lengths[i - 1]:n.position]
                                    for i, n in enumerate(e.needles)]
                                   + [prompt[e.needles[-1].position + lengths[-1]:end]])
    if task != "mqar":    # mqar's other lines are distractor pairs, checked by value below
        assert not any(g.lower() in tok.decode(haystack_only).lower() for g in e.gold)
    else:
        text = tok.decode(haystack_only)
        assert text.count(":") > 10 and not any(g in text for g in e.gold)

    # The same seed gives the same example; another seed another one.
    again = tasks.generate(task, seed=5, length=LENGTH, depth=depth, tokenizer=tok, haystack_N=haystack_N)
    assert again.prompt_ids_T.tolist() == prompt.tolist() and again.answer == e.answer
    assert again.needles == e.needles
    other = tasks.generate(task, seed=6, length=LENGTH, depth=depth, tokenizer=tok, haystack_N=haystack_N)
    assert other.answer != e.answer


def test_answer_does_not_depend_on_length():
    """The training mix relies on it: keys and values are drawn before anything length-dependent."""
    tok, hay = data.tokenizer("bytes"), data.tokenizer("bytes").encode_text(HAYSTACK)
    for task in tasks.TASKS:
        answers = {tasks.generate(task, seed=1, length=n, depth=0.5, tokenizer=tok, haystack_N=hay).answer
                   for n in (700, 1200, 3000)}
        assert len(answers) == 1, task


def test_variable_tracking_chain_order():
    tok, hay = data.tokenizer("bytes"), data.tokenizer("bytes").encode_text(HAYSTACK)
    e = tasks.generate("variable_tracking", seed=2, length=900, depth=0.4, tokenizer=tok, haystack_N=hay)
    names = e.answer.split()
    chain = [n.text for n in e.needles if n.gold]
    assert [c.split()[1] for c in chain] == names       # assignments in chain order
    for prev, line in zip(names, chain[1:]):
        assert line.strip() == f"VAR {line.split()[1]} = VAR {prev}."


def test_bad_input_is_named():
    tok, hay = data.tokenizer("bytes"), np.arange(100) % 256
    kw = dict(seed=0, tokenizer=tok, haystack_N=hay)
    with pytest.raises(ValueError, match="unknown task 'needle'; expected one of passkey, niah_single"):
        tasks.generate("needle", length=500, depth=0.5, **kw)
    with pytest.raises(ValueError, match=r"depth 1.5 is outside \[0, 1\]"):
        tasks.generate("passkey", length=500, depth=1.5, **kw)
    with pytest.raises(ValueError, match="task niah_multiquery: length 100 is too short"):
        tasks.generate("niah_multiquery", length=100, depth=0.5, **kw)
    with pytest.raises(ValueError, match="haystack_N must be a non-empty"):
        tasks.generate("passkey", length=500, depth=0.5, seed=0, tokenizer=tok, haystack_N=np.zeros(0))


def test_short_haystack_is_repeated():
    tok = data.tokenizer("bytes")
    e = tasks.generate("passkey", seed=0, length=2000, depth=0.5, tokenizer=tok,
                       haystack_N=tok.encode_text("just a few words. "))
    assert len(e.prompt_ids_T) == 2000


def test_string_match_all_matches_ruler():
    """Hand-made cases worked out by RULER's formula: mean over examples of the found fraction, x100,
    rounded to 2 decimals; case-insensitive substring matching."""
    assert tasks.string_match_all(["The pass key is 12345."], [["12345"]]) == 100.0
    assert tasks.string_match_all(["no idea"], [["12345"]]) == 0.0
    assert tasks.string_match_all(["1234"], [["12345"]]) == 0.0            # a prefix is not a match
    assert tasks.string_match_all(["values: 11, 33"], [["11", "22", "33"]]) == 66.67
    assert tasks.string_match_all(["vars: abcde QWERT", "x"], [["ABCDE", "QWERT"], ["x", "y"]]) == 75.0
    assert tasks.string_match_all(["a", "b", "c"], [["a"], ["a"], ["a"]]) == 33.33
    assert tasks.string_match_fraction("7 and 8", ["8", "7", "9", "10"]) == 0.5
    with pytest.raises(ValueError, match="as many predictions as gold lists"):
        tasks.string_match_all(["a"], [["a"], ["b"]])


def test_answer_loglik_against_hand_computed_logits():
    """A fake model whose logits are known: log-probabilities summed over the answer, exact match only when
    every answer token is the argmax, and the positions read are those just before each answer token."""
    tok, hay = data.tokenizer("bytes"), data.tokenizer("bytes").encode_text(HAYSTACK)
    examples = [tasks.generate("passkey", seed=s, length=300, depth=0.5, tokenizer=tok, haystack_N=hay)
                for s in range(2)]
    V = 256

    def logits_fn(tokens_BT):
        # Row t favours the token at t + 1 of example 0's prompt + answer (so example 0 is always right),
        # by 3 nats over a uniform rest.
        target_S = np.concatenate([examples[0].prompt_ids_T, examples[0].answer_ids_A])[1:]
        logits_BTV = np.zeros((tokens_BT.shape[0], tokens_BT.shape[1], V), np.float32)
        n = min(len(target_S), tokens_BT.shape[1])   # rows past the answer (bucket padding) stay uniform
        logits_BTV[:, np.arange(n), target_S[:n]] = 3.0
        return logits_BTV

    s0, s1 = tasks.answer_loglik(logits_fn, examples)
    A = len(examples[0].answer_ids_A)
    hit = 3.0 - np.log(np.exp(3.0) + V - 1)
    miss = -np.log(np.exp(3.0) + V - 1)
    assert s0["exact"] and s0["tokens"] == A and s0["logprob"] == pytest.approx(A * hit)
    a0, a1 = examples[0].answer_ids_A, examples[1].answer_ids_A
    same = int((a0 == a1).sum())
    assert not s1["exact"] and s1["logprob"] == pytest.approx(same * hit + (A - same) * miss)
    with pytest.raises(ValueError, match="share a prompt length"):
        tasks.answer_loglik(logits_fn, [examples[0], tasks.generate("passkey", seed=0, length=301, depth=0.5,
                                                                    tokenizer=tok, haystack_N=hay)])


# --------------------------------------------------------------------------- the training mix (zoo.data)

def mix_config(tmp_path, **kw):
    for i in range(20):
        (tmp_path / f"doc{i:02d}.py").write_text(HAYSTACK.replace("walk", f"walk{i}"))
    cfg = ml_collections.ConfigDict(dict(source="text", paths=str(tmp_path / "*.py"), tokenizer="bytes",
                                         val_fraction=0.2, token_dtype="uint16", task_mix_rate=0.0,
                                         task_names=",".join(tasks.TASKS), task_lengths="",
                                         task_curriculum_steps=0))
    cfg.update(kw)
    return cfg


def test_mix_off_leaves_batches_unchanged(tmp_path):
    plain = data.load_corpus(mix_config(tmp_path))
    assert plain.task_mix is None
    inputs_BT, targets_BT = data.train_batch(plain, seed=3, step=4, batch_size=4, seq_len=64)
    rng = np.random.default_rng([3, 4])        # the batch as data.train_batch has always drawn it
    starts_B = rng.integers(0, len(plain.train_N) - 64, size=4)
    np.testing.assert_array_equal(inputs_BT, plain.train_N[starts_B[:, None] + np.arange(64)])
    np.testing.assert_array_equal(targets_BT, plain.train_N[starts_B[:, None] + np.arange(1, 65)])


def test_mix_windows_end_with_the_task_answer(tmp_path):
    plain = data.load_corpus(mix_config(tmp_path))
    corpus = data.load_corpus(mix_config(tmp_path, task_mix_rate=0.5, task_lengths="600,800"))
    assert corpus.train_N is plain.train_N and corpus.task_mix.lengths == (600, 800)
    data.check_fits(corpus, 256, seq_len=1023)
    tok, seen = data.tokenizer("bytes"), set()
    for step in range(1, 6):
        inputs_BT, targets_BT = data.train_batch(corpus, seed=0, step=step, batch_size=8, seq_len=1023)
        again = data.train_batch(corpus, seed=0, step=step, batch_size=8, seq_len=1023)
        np.testing.assert_array_equal(inputs_BT, again[0])           # a pure function of (seed, step)
        np.testing.assert_array_equal(inputs_BT[:, 1:], targets_BT[:, :-1])
        plain_BT = data.train_batch(plain, seed=0, step=step, batch_size=8, seq_len=1023)[0]
        rows = data.task_rows(corpus.task_mix, seed=0, step=step, batch_size=8, seq_len=1023)
        for b in range(8):
            if b not in rows:
                np.testing.assert_array_equal(inputs_BT[b], plain_BT[b])    # text rows as without the mix
                continue
            name, length, depth, example_seed = rows[b]
            seen.add(name)
            answer = tasks.generate(name, seed=example_seed, length=length, depth=depth, tokenizer=tok,
                                    haystack_N=corpus.train_N).answer_ids_A
            e = tasks.generate(name, seed=example_seed, length=length - len(answer), depth=depth, tokenizer=tok,
                               haystack_N=corpus.train_N)
            window_W = np.concatenate([inputs_BT[b], targets_BT[b, -1:]])
            # The window ends with prompt + answer, `length` tokens; the answer is the last targets.
            assert window_W[-length:].tolist() == e.prompt_ids_T.tolist() + e.answer_ids_A.tolist()
            assert targets_BT[b, -len(answer):].tolist() == e.answer_ids_A.tolist()
            assert tok.decode(window_W[:-length]) in tok.decode(corpus.train_N)   # training text before it
    assert len(seen) >= 4      # 5 steps x 8 rows x 0.5: several tasks drawn


def test_mix_curriculum_and_errors(tmp_path):
    corpus = data.load_corpus(mix_config(tmp_path, task_mix_rate=1.0, task_lengths="900,600,700",
                                         task_curriculum_steps=30))
    lengths = lambda step: {r[1] for r in data.task_rows(corpus.task_mix, seed=0, step=step, batch_size=64,
                                                         seq_len=1023).values()}
    assert lengths(1) == lengths(9) == {600} and lengths(10) == {600, 700} and lengths(30) == {600, 700, 900}
    with pytest.raises(ValueError, match=r"data.task_lengths: 900 is longer than a training window \(seq_len "
                                         r"\+ 1 = 513\)"):
        data.check_fits(corpus, 256, seq_len=512)
    short = data.load_corpus(mix_config(tmp_path, task_mix_rate=0.1, task_lengths="200"))
    with pytest.raises(ValueError, match="data.task_lengths: task passkey: length 200 is too short"):
        data.check_fits(short, 256, seq_len=512)
    with pytest.raises(ValueError, match="unknown task 'needle'"):
        data.load_corpus(mix_config(tmp_path, task_mix_rate=0.1, task_names="passkey,needle"))
    with pytest.raises(ValueError, match=r"data.task_mix_rate must be in \[0, 1\], got 1.5"):
        data.load_corpus(mix_config(tmp_path, task_mix_rate=1.5))
