"""Synthetic long-context tasks (passkey, RULER's needle-in-a-haystack variants, variable tracking, MQAR)
and their scorers.

Every generator builds one `Example` from `(seed, length, depth, tokenizer, haystack)`: a prompt of
exactly `length` token ids (instruction, a context of haystack text with needles inserted, a question),
the answer the model should continue with (text and ids), the gold strings a generation must contain,
and where each needle sits. The haystack is a token stream (evaluation: the corpus' validation split;
training: its training split); the prompt is assembled in token space, piece by piece, so the length is
exact with any tokenizer. The needle that carries the (first) gold answer starts after
`round(depth * F)` of the context's F haystack tokens (`mqar`: at the nearest key-value boundary at or
before that point); any other needles go to depths drawn from the seed. Everything the generator draws
comes from `np.random.default_rng([seed, ...])`, keys and values first, so the same seed gives the same
example and the same answer at every length.

Scoring: `string_match_all` as RULER scores generations (the fraction of gold strings found,
case-insensitively, in the generated text; RULER reports it x100), and `answer_loglik`, a generation-free
score: the answer's total log-probability under teacher forcing and whether greedy argmax reproduces
every answer token.
"""
from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Callable, Sequence

import numpy as np

ADJECTIVES = ("amber", "brave", "calm", "dusty", "eager", "fuzzy", "gentle", "hollow", "icy", "jolly", "keen",
              "lucky", "misty", "noble", "odd", "proud", "quiet", "rapid", "silent", "tidy", "upper", "vivid",
              "wild", "young", "zesty", "bold", "crisp", "dark", "early", "fancy")
NOUNS = ("anchor", "badger", "canyon", "dolphin", "ember", "falcon", "glacier", "harbor", "island", "jungle",
         "kettle", "lantern", "meadow", "nectar", "orchid", "pepper", "quarry", "river", "saddle", "thunder",
         "umbrella", "violin", "walnut", "yarrow", "zephyr", "beacon", "cobalt", "dune", "engine", "forest")
NUM_KEYS = 4        # niah_multikey: needles (one gold); niah_multivalue: values; niah_multiquery, mqar: queries
NUM_HOPS = 4        # variable_tracking: assignments after the first in each chain


@dataclasses.dataclass(frozen=True)
class Needle:
    position: int       # index in the prompt where the needle's first token sits
    text: str
    gold: bool          # it holds a gold string (else a distractor)


@dataclasses.dataclass(frozen=True)
class Example:
    task: str
    length: int
    depth: float
    seed: int
    prompt_ids_T: np.ndarray      # int32, exactly `length` tokens
    answer_ids_A: np.ndarray      # int32: what should follow the prompt
    answer: str
    gold: tuple[str, ...]         # what string_match_all looks for in a generation
    needles: tuple[Needle, ...]   # in prompt order
    depth_needle: int             # index into `needles` of the one placed at `depth`
    context: tuple[int, int]      # prompt[start:end] is the haystack with the needles inside
    filler_tokens: int            # haystack tokens in the context (the F of round(depth * F))


@dataclasses.dataclass
class _Spec:
    """What a task draws: text pieces, needles as (text, depth, gold); needle 0 sits at the asked depth."""
    header: str
    needles: list[tuple[str, float, bool]]
    question: str
    answer: str
    gold: tuple[str, ...]
    filler: Callable | None = None    # (rng, tok, haystack_N, n) -> (ids_N, boundaries); None: haystack text


def _distinct(draw: Callable[[], object], n: int) -> list:
    """n different values of `draw()`, in the order drawn."""
    out, seen = [], set()
    while len(out) < n:
        v = draw()
        if v not in seen:
            seen.add(v)
            out.append(v)
    return out


def _word_key(rng) -> str:
    return f"{ADJECTIVES[rng.integers(len(ADJECTIVES))]}-{NOUNS[rng.integers(len(NOUNS))]}"


def _number(rng, digits: int) -> str:
    return str(rng.integers(10 ** (digits - 1), 10 ** digits))


def _letters(rng, n: int, upper: bool) -> str:
    base = ord("A") if upper else ord("a")
    return "".join(chr(base + int(c)) for c in rng.integers(0, 26, size=n))


NIAH_HEADER = ("A few special magic numbers are hidden in the text below. Memorize them: you will be asked "
               "about them at the end.\n")


def _niah_needle(key: str, value: str) -> str:
    return f"\nThe special magic number for {key} is {value}.\n"


def passkey(rng, depth: float) -> _Spec:
    """Passkey retrieval (Mohtashami & Jaggi, 2023): one 5-digit pass key in the haystack."""
    key = _number(rng, 5)
    return _Spec("There is an important piece of information hidden in a lot of irrelevant text below. "
                 "Find it and remember it; you will be asked about it.\n",
                 [(f"\nThe pass key is {key}. Remember it. {key} is the pass key.\n", depth, True)],
                 "\nWhat is the pass key? The pass key is", f" {key}", (key,))


def niah_single(rng, depth: float) -> _Spec:
    """RULER's single needle: one key with a 7-digit value; the question names the key."""
    key, value = _word_key(rng), _number(rng, 7)
    return _Spec(NIAH_HEADER, [(_niah_needle(key, value), depth, True)],
                 f"\nWhat is the special magic number for {key}? The special magic number for {key} is",
                 f" {value}", (value,))


def niah_multikey(rng, depth: float) -> _Spec:
    """RULER's multi-key needle: NUM_KEYS needles with distinct keys and values; one key is asked."""
    keys = _distinct(lambda: _word_key(rng), NUM_KEYS)
    values = _distinct(lambda: _number(rng, 7), NUM_KEYS)
    depths = [depth] + list(rng.random(NUM_KEYS - 1))
    needles = [(_niah_needle(k, v), d, i == 0) for i, (k, v, d) in enumerate(zip(keys, values, depths))]
    return _Spec(NIAH_HEADER, needles,
                 f"\nWhat is the special magic number for {keys[0]}? The special magic number for {keys[0]} is",
                 f" {values[0]}", (values[0],))


def niah_multivalue(rng, depth: float) -> _Spec:
    """RULER's multi-value needle: one key with NUM_KEYS values, all of them asked (answer in text order)."""
    key = _word_key(rng)
    values = _distinct(lambda: _number(rng, 7), NUM_KEYS)
    depths = [depth] + list(rng.random(NUM_KEYS - 1))
    in_order = [v for _, _, v in sorted(zip(depths, range(NUM_KEYS), values))]
    return _Spec(NIAH_HEADER, [(_niah_needle(key, v), d, True) for v, d in zip(values, depths)],
                 f"\nWhat are all the special magic numbers for {key}? The special magic numbers for {key} are",
                 " " + ", ".join(in_order), tuple(values))


def niah_multiquery(rng, depth: float) -> _Spec:
    """RULER's multi-query needle: NUM_KEYS keys, each with a value, all asked in one question."""
    keys = _distinct(lambda: _word_key(rng), NUM_KEYS)
    values = _distinct(lambda: _number(rng, 7), NUM_KEYS)
    depths = [depth] + list(rng.random(NUM_KEYS - 1))
    named = ", ".join(keys[:-1]) + f" and {keys[-1]}"
    return _Spec(NIAH_HEADER, [(_niah_needle(k, v), d, True) for k, v, d in zip(keys, values, depths)],
                 f"\nWhat are the special magic numbers for {named}? The special magic numbers for {named} are",
                 " " + ", ".join(values), tuple(values))


def variable_tracking(rng, depth: float) -> _Spec:
    """RULER's variable tracking: a chain `VAR A = 12345`, `VAR B = VAR A`, ... (NUM_HOPS hops) and a
    distractor chain with another value; asked for every variable that holds the first chain's value."""
    names = _distinct(lambda: _letters(rng, 5, upper=True), 2 * (NUM_HOPS + 1))
    values = _distinct(lambda: _number(rng, 5), 2)
    gold_names, other_names = names[:NUM_HOPS + 1], names[NUM_HOPS + 1:]
    gold_depths = [depth] + list(depth + (1.0 - depth) * np.sort(rng.random(NUM_HOPS)))
    other_depths = list(np.sort(rng.random(NUM_HOPS + 1)))
    needles = []
    for chain, value, depths, gold in ((gold_names, values[0], gold_depths, True),
                                       (other_names, values[1], other_depths, False)):
        sources = [value] + [f"VAR {n}" for n in chain[:-1]]
        needles += [(f"\nVAR {n} = {s}.\n", d, gold) for n, s, d in zip(chain, sources, depths)]
    return _Spec("Memorize the variable assignments hidden in the text below; you will be asked to trace "
                 "them.\n", needles,
                 f"\nWhich variables are assigned the value {values[0]}, directly or through other variables? "
                 f"The variables assigned the value {values[0]} are:", " " + " ".join(gold_names),
                 tuple(gold_names))


def mqar(rng, depth: float) -> _Spec:
    """Multi-query associative recall (Arora et al., 2023, Zoology) in text: a long list of `key: value`
    lines (4 lowercase letters, 6 digits; all keys and values distinct) fills the context; NUM_KEYS keys
    are asked at once. The corpus text only pads the list's start to the exact length."""
    keys = _distinct(lambda: _letters(rng, 4, upper=False), NUM_KEYS)
    values = _distinct(lambda: _number(rng, 6), NUM_KEYS)
    depths = [depth] + list(rng.random(NUM_KEYS - 1))

    def filler(rng, tok, haystack_N, n):
        pairs_ids, total = [], 0
        taken_keys, taken_values = set(keys), set(values)
        while True:
            key, value = _letters(rng, 4, upper=False), _number(rng, 6)
            if key in taken_keys or value in taken_values:
                continue
            ids = tok.encode_text(f"\n{key}: {value}")
            if total + len(ids) > n:
                break
            taken_keys.add(key)
            taken_values.add(value)
            pairs_ids.append(ids)
            total += len(ids)
        pad_N = _haystack_slice(rng, haystack_N, n - total)
        boundaries = np.cumsum([len(pad_N)] + [len(p) for p in pairs_ids])
        return np.concatenate([pad_N, *pairs_ids]).astype(np.int32), np.concatenate([[0], boundaries])

    named = ", ".join(keys)
    return _Spec("Below is a list of keys and their values. Memorize it; you will be asked to look up some "
                 "of the keys.\n", [(f"\n{k}: {v}", d, True) for k, v, d in zip(keys, values, depths)],
                 f"\nThe values of the keys {named} are", " " + ", ".join(values), tuple(values), filler)


TASKS: dict[str, Callable] = {f.__name__: f for f in (passkey, niah_single, niah_multikey, niah_multivalue,
                                                       niah_multiquery, variable_tracking, mqar)}


def check_task_names(names: Sequence[str]) -> list[str]:
    """The names as a list, failing on an unknown or missing one."""
    names = [n.strip() for n in names if n.strip()]
    if not names:
        raise ValueError(f"no task names given; expected some of {', '.join(TASKS)}")
    for n in names:
        if n not in TASKS:
            raise ValueError(f"unknown task {n!r}; expected one of {', '.join(TASKS)}")
    return names


def check_depth(depth: float) -> float:
    if not 0.0 <= float(depth) <= 1.0:
        raise ValueError(f"depth {depth} is outside [0, 1]")
    return float(depth)


def _haystack_slice(rng, haystack_N: np.ndarray, n: int) -> np.ndarray:
    """n consecutive haystack tokens from a random start (the stream repeated if shorter than n)."""
    if n == 0:
        return np.zeros((0,), np.int32)
    if len(haystack_N) < n:
        haystack_N = np.tile(haystack_N, n // len(haystack_N) + 1)
    start = int(rng.integers(0, len(haystack_N) - n + 1))
    return np.asarray(haystack_N[start:start + n], np.int32)


def _text_filler(rng, tok, haystack_N, n, gold: Sequence[str], tries: int = 20):
    """Haystack text of n tokens in which no gold string occurs (case-insensitively): a slice that
    happens to hold one is drawn again."""
    for _ in range(tries):
        ids_N = _haystack_slice(rng, haystack_N, n)
        text = tok.decode(ids_N).lower()
        if not any(g.lower() in text for g in gold):
            return ids_N, np.arange(n + 1)
    raise ValueError(f"the haystack holds a gold string {gold} in each of {tries} slices; use other text")


def task_seed(seed: int, task: str) -> int:
    """A stable number for (seed, task name), so each task draws its own examples."""
    return int.from_bytes(hashlib.sha256(f"{seed}/{task}".encode()).digest()[:4], "big")


def generate(task: str, *, seed: int, length: int, depth: float, tokenizer, haystack_N: np.ndarray) -> Example:
    """One example of `task` whose prompt is exactly `length` tokens: drawn by
    `default_rng([task_seed(seed, task), ...])` alone, the haystack text from `haystack_N` (token ids),
    pieces encoded with `tokenizer.encode_text` (`zoo.data.tokenizer`)."""
    check_task_names([task])
    depth = check_depth(depth)
    if int(length) != length or length < 1:
        raise ValueError(f"length must be a positive integer, got {length}")
    haystack_N = np.asarray(haystack_N)
    if haystack_N.ndim != 1 or not len(haystack_N):
        raise ValueError(f"haystack_N must be a non-empty 1-D token array, got shape {haystack_N.shape}")
    rng = np.random.default_rng([task_seed(seed, task)])
    spec = TASKS[task](rng, depth)
    tok = tokenizer
    header_N, question_N = tok.encode_text(spec.header), tok.encode_text(spec.question)
    needles_N = [tok.encode_text(text) for text, _, _ in spec.needles]
    fixed = len(header_N) + len(question_N) + sum(map(len, needles_N))
    free = length - fixed
    if free < 0:
        raise ValueError(f"task {task}: length {length} is too short; its instruction, needles and question "
                         f"take {fixed} tokens")
    if spec.filler is None:
        filler_N, boundaries = _text_filler(rng, tok, haystack_N, free, spec.gold)
    else:
        filler_N, boundaries = spec.filler(rng, tok, haystack_N, free)
    # Each needle goes to the last allowed boundary at or before round(depth * free).
    offsets = [int(boundaries[np.searchsorted(boundaries, round(d * free), side="right") - 1])
               for _, d, _ in spec.needles]
    order = sorted(range(len(spec.needles)), key=lambda i: (offsets[i], spec.needles[i][1], i))
    pieces, needles, position, done = [header_N], [], len(header_N), 0
    for i in order:
        pieces.append(filler_N[done:offsets[i]])
        position += offsets[i] - done
        done = offsets[i]
        needles.append(Needle(position, spec.needles[i][0], spec.needles[i][2]))
        pieces.append(needles_N[i])
        position += len(needles_N[i])
    pieces += [filler_N[done:], question_N]
    prompt_T = np.concatenate(pieces).astype(np.int32)
    assert len(prompt_T) == length, (len(prompt_T), length)
    return Example(task, int(length), depth, int(seed), prompt_T, tok.encode_text(spec.answer).astype(np.int32),
                   spec.answer, spec.gold, tuple(needles), order.index(0),
                   (len(header_N), length - len(question_N)), free)


# ---------------------------------------------------------------------------------------------- scoring

def string_match_fraction(prediction: str, gold: Sequence[str]) -> float:
    """The fraction of the gold strings found in `prediction`, ignoring case (one example of RULER's
    `string_match_all`)."""
    if not gold:
        raise ValueError("gold must hold at least one string")
    text = prediction.lower()
    return sum(g.lower() in text for g in gold) / len(gold)


def string_match_all(predictions: Sequence[str], golds: Sequence[Sequence[str]]) -> float:
    """RULER's `string_match_all`: the mean over examples of the fraction of gold strings found in the
    generation (case-insensitive), x100, rounded to 2 decimals."""
    if len(predictions) != len(golds) or not predictions:
        raise ValueError(f"need as many predictions as gold lists, at least one; got {len(predictions)} and "
                         f"{len(golds)}")
    score = sum(string_match_fraction(p, g) for p, g in zip(predictions, golds)) / len(predictions) * 100
    return round(score, 2)


ANSWER_BUCKET = 32   # answer and generation lengths are rounded up to this (one compilation per prompt length)


def bucket(n: int) -> int:
    """n rounded up to a multiple of ANSWER_BUCKET."""
    return -(-n // ANSWER_BUCKET) * ANSWER_BUCKET


def answer_loglik(logits_fn: Callable, examples: Sequence[Example]) -> list[dict]:
    """For each example, `{"logprob": total log-probability of the answer tokens given the prompt (nats),
    "tokens": answer tokens, "exact": greedy argmax reproduces every answer token}`, from one call of
    `logits_fn(tokens_BT) -> logits_BTV` on prompt + answer (teacher forcing). The examples must share a
    prompt length; shorter answers are padded, to a multiple of ANSWER_BUCKET tokens so that cells of one
    length share a compiled program (the pad is causal-invisible to the tokens scored)."""
    if not examples:
        raise ValueError("answer_loglik needs at least one example")
    T = len(examples[0].prompt_ids_T)
    if any(len(e.prompt_ids_T) != T for e in examples):
        raise ValueError(f"examples must share a prompt length; got {sorted({len(e.prompt_ids_T) for e in examples})}")
    A = max(len(e.answer_ids_A) for e in examples)
    if A == 0:
        raise ValueError("the examples' answers are empty")
    tokens_BS = np.zeros((len(examples), T + bucket(A) - 1), np.int32)
    answers_BA = np.zeros((len(examples), A), np.int32)
    mask_BA = np.zeros((len(examples), A), bool)
    for b, e in enumerate(examples):
        a = len(e.answer_ids_A)
        tokens_BS[b, :T] = e.prompt_ids_T
        tokens_BS[b, T:T + a - 1] = e.answer_ids_A[:-1]
        answers_BA[b, :a], mask_BA[b, :a] = e.answer_ids_A, True
    logits_BSV = logits_fn(tokens_BS)
    if logits_BSV.shape[:2] != tokens_BS.shape:
        raise ValueError(f"logits_fn returned shape {logits_BSV.shape} for tokens of shape {tokens_BS.shape}")
    logits_BAV = np.asarray(logits_BSV[:, T - 1:T - 1 + A], np.float64)   # row T-1+i predicts answer token i
    logprobs_BAV = logits_BAV - _logsumexp(logits_BAV)
    picked_BA = np.take_along_axis(logprobs_BAV, answers_BA[..., None], axis=-1)[..., 0]
    hits_BA = logits_BAV.argmax(-1) == answers_BA
    return [{"logprob": float(picked_BA[b][mask_BA[b]].sum()), "tokens": int(mask_BA[b].sum()),
             "exact": bool(hits_BA[b][mask_BA[b]].all())} for b in range(len(examples))]


def _logsumexp(x_BAV: np.ndarray) -> np.ndarray:
    m = x_BAV.max(-1, keepdims=True)
    return m + np.log(np.exp(x_BAV - m).sum(-1, keepdims=True))
