"""Decoding with each layer kind's cache (zoo.inference): prefill in chunks plus token-by-token decode give
the logits of one full forward pass, for every family and every hybrid preset; the caches hold what their
kinds promise (a ring of `window` slots, nothing for a KV-shared layer); `generate` gives each row of a
batch the tokens it gets alone, samples reproducibly, and rejects bad input with one clear error."""
from __future__ import annotations

import functools
import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import zoo
from configs.gemma4 import get_config as get_gemma4
from configs.hybrid import get_config as hybrid_config
from layers import attention, sparse_attention
from layers.kinds import option
from zoo import analysis, inference

T, PROMPT, CHUNK, WINDOW = 29, 13, 5, 8   # ring of 8 wraps; chunks of 5 split ratio-4 and ratio-8 windows


def _small(family: str, preset: str = "tiny"):
    """The family's tiny preset (or a hybrid preset) with 8-token windows, ratio-8 heavy compression and a
    64-token vocabulary, so a 29-token sequence wraps every ring and crosses several compression windows."""
    if family == "hybrid":
        m = hybrid_config(preset).model
    else:
        m = importlib.import_module(f"configs.{family}").get_config(preset).model
    m.vocab_size = 64
    if "windows" in m:
        m.windows = tuple(WINDOW if w else 0 for w in m.windows) if isinstance(m.windows, tuple) else WINDOW
    if "window" in m:
        m.window = WINDOW
    if "hca_ratio" in m:
        m.hca_ratio = 8
    if "index_heads" in m:   # >= 6 index heads: no exact ReLU ties among the indexer's scores
        m.index_heads, m.index_top_k = 8, 3
    if family == "gemma4":
        m.k_eq_v = tuple(t == "full" for t in m.attention_types)
    if "mtp_depth" in m:
        m.mtp_depth = 0
    return m


CASES = [("gemma4", "tiny"), ("laguna", "tiny"), ("zaya1", "tiny"), ("deepseek_v4", "tiny"),
         ("hybrid", "laguna_cca"), ("hybrid", "deepseek_shared"), ("hybrid", "gemma_hca")]


def _jitted_extend(model):
    graphdef, state = nnx.split(model)

    @jax.jit
    def run(state, tokens_BT, cache, new_B):
        return nnx.merge(graphdef, state).extend(tokens_BT, cache, new_B)

    return functools.partial(run, state)


def _decode_logits(model, tokens_BT, prompt: int = PROMPT):
    """Logits of the first `prompt` tokens prefilled in chunks of 5 (the last padded), then token by token;
    checks the cache lengths."""
    extend = _jitted_extend(model)
    cache = inference.init_cache(model, batch_size=2, max_len=T)
    got = []
    for start in range(0, prompt, CHUNK):   # the last chunk is padded: 3 real tokens of 5
        chunk_BT = jnp.pad(tokens_BT[:, start:start + CHUNK], [(0, 0), (0, max(0, start + CHUNK - PROMPT))])
        n = min(CHUNK, prompt - start)
        logits_BTV, cache = extend(chunk_BT, cache, jnp.full((2,), n, jnp.int32))
        got.append(logits_BTV[:, :n])
    for t in range(prompt, T):
        logits_BTV, cache = extend(tokens_BT[:, t:t + 1], cache, jnp.ones((2,), jnp.int32))
        got.append(logits_BTV)
    np.testing.assert_array_equal(np.asarray(cache["lengths_B"]), [T, T])
    return jnp.concatenate(got, axis=1)


@pytest.mark.parametrize("family,preset", CASES)
def test_prefill_and_decode_equal_the_forward_pass(family, preset):
    m = _small(family, preset)
    model = zoo.build(m, seed=1)
    tokens_BT = jnp.asarray(np.random.default_rng(0).integers(0, m.vocab_size, (2, T)), jnp.int32)
    want_BTV = jax.jit(lambda t: model(t))(tokens_BT)
    diff = float(jnp.max(jnp.abs(_decode_logits(model, tokens_BT) - want_BTV)))
    assert diff <= 1e-4, f"{family}:{preset}: decode differs from the forward pass by {diff}"


@pytest.mark.parametrize("family", ["gemma4", "deepseek_v4"])
def test_decode_kernels_equal_the_forward_pass(family):
    """attention_impl="pallas": every decode step attends through the decode kernels (Triton lowering in
    interpret mode here; DeepSeek-V4's indexer top-k, HCA and CSA too), against the pure-JAX forward pass
    of the same weights. Token by token from the first (one compiled step; chunks of several tokens are
    the kernel tests' business)."""
    m = _small(family)
    reference = zoo.build(m, seed=1)
    m.attention_impl = "pallas"
    model = zoo.build(m, seed=1)
    tokens_BT = jnp.asarray(np.random.default_rng(0).integers(0, m.vocab_size, (2, T)), jnp.int32)
    want_BTV = jax.jit(lambda t: reference(t))(tokens_BT)
    diff = float(jnp.max(jnp.abs(_decode_logits(model, tokens_BT, prompt=0) - want_BTV)))
    assert diff <= 1e-4, f"{family}: kernel decode differs from the forward pass by {diff}"


@pytest.mark.parametrize("family", ["gemma4", "zaya1", "deepseek_v4"])
def test_prefill_kernel_equals_the_forward_pass(family, monkeypatch):
    """attention_impl="pallas", prefill chunks longer than the decode kernel takes, then decode steps:
    full-attention layers (Gemma-4's k_eq_v ones, ZAYA1's CCA) attend over [cache; chunk] through the fused
    kernel, sliding ones over [ring; chunk] through the flash kernel, DeepSeek-V4's SWA, CSA and HCA layers
    over [ring; chunk] and the cached entries through the flash and CSA kernels (20-token windows: rings
    empty, partly and wholly filled), chunks after the first seeing a non-empty cache, rows of different
    lengths; the logits equal the pure-JAX forward pass."""
    targets = {"full": (attention, "_prefill_attention"), "window": (attention, "_window_prefill_attention"),
               "compressed": (sparse_attention.CompressedAttention, "_prefill_attention")}
    calls = dict.fromkeys(targets, 0)
    for kind, (owner, name) in targets.items():
        original = getattr(owner, name)

        def counted(*a, kind=kind, original=original, **k):
            calls[kind] += 1
            return original(*a, **k)
        monkeypatch.setattr(owner, name, counted)
    m = _small(family)
    if family == "zaya1":   # CCA layers of both kinds
        m.attention_types, m.windows = ("cca", "cca_sliding") * 2, (0, 20) * 2
    elif family == "deepseek_v4":
        m.window = 20
    else:
        m.windows = tuple(20 if w else 0 for w in m.windows)
    reference = zoo.build(m, seed=1)
    m.attention_impl = "pallas"
    model = zoo.build(m, seed=1)
    S, chunk, lengths = 42, 17, np.array([42, 37])
    tokens_BT = jnp.asarray(np.random.default_rng(3).integers(0, m.vocab_size, (2, S)), jnp.int32)
    want_BTV = np.asarray(jax.jit(lambda t: reference(t))(tokens_BT))
    extend = _jitted_extend(model)
    cache, got = inference.init_cache(model, batch_size=2, max_len=S), []
    for start in range(0, S - 2, chunk):    # chunks of 17 tokens up to 40, then two decode steps
        new_B = jnp.asarray(np.clip(lengths - 2 - start, 0, chunk), jnp.int32)
        piece_BT = jnp.pad(tokens_BT[:, start:start + chunk], [(0, 0), (0, max(0, start + chunk - S))])
        logits_BTV, cache = extend(piece_BT, cache, new_B)
        got.append(np.asarray(logits_BTV)[:, :min(chunk, S - 2 - start)])
    for step in range(2):
        pos_B = np.asarray(cache["lengths_B"])
        logits_BTV, cache = extend(tokens_BT[np.arange(2), pos_B][:, None], cache, jnp.ones((2,), jnp.int32))
        got.append(np.asarray(logits_BTV))
    if family == "deepseek_v4":   # every layer (SWA, CSA, HCA), traced once (one chunk shape)
        assert calls["compressed"] == len(m.attention_types), calls
    else:
        assert calls["full"] and calls["window"], f"chunks through the prefill kernels: {calls}"
    np.testing.assert_array_equal(np.asarray(cache["lengths_B"]), lengths)
    for b, n in enumerate(lengths):
        got_TV = np.concatenate([g[b] for g in got[:-2]], axis=0)[:n - 2]
        want_TV = want_BTV[b, :n - 2]
        diff = float(np.abs(got_TV - want_TV).max())
        assert diff <= 1e-4, f"{family} row {b}: prefill through the kernel differs from the forward pass by {diff}"
        for step in range(2):
            diff = float(np.abs(got[-2 + step][b, 0] - want_BTV[b, n - 2 + step]).max())
            assert diff <= 1e-4, f"{family} row {b}: decode step {step} differs from the forward pass by {diff}"


@pytest.fixture(scope="module")
def gemma():
    """A tiny Gemma-4 stack: sliding rings, a full layer, KV-shared layers of both kinds."""
    m = _small("gemma4")
    return m, zoo.build(m, seed=2)


def test_caches_hold_what_their_kinds_promise(gemma):
    m, _ = gemma
    spec = jax.eval_shape(lambda: zoo.init_cache(m, batch_size=3, max_len=100, dtype="bfloat16"))
    for i, (kind, src, layer) in enumerate(zip(m.attention_types, m.kv_sources, spec["layers"])):
        if src >= 0:
            assert layer == {} and inference.cache_bytes(layer) == 0, i
            continue
        slots = WINDOW if kind == "sliding" else 100
        shape = (3, slots, m.num_kv_heads[i], m.head_dims[i])
        if m.k_eq_v[i]:   # one tensor (the raw key projection): half of a K and V cache
            assert set(layer) == {"kv_BSKH"} and layer["kv_BSKH"].shape == shape, i
            assert inference.cache_bytes(layer) == np.prod(shape) * 2, i
        else:
            assert layer["k_BSKH"].shape == shape and layer["v_BSKH"].dtype == jnp.bfloat16, i
            assert inference.cache_bytes(layer) == 2 * np.prod(shape) * 2, i
    assert any(m.k_eq_v) and spec["lengths_B"].shape == (3,)
    full = jax.eval_shape(lambda: zoo.init_cache(get_gemma4("tiny"), batch_size=3, max_len=100))   # a full config
    assert inference.cache_bytes(full) > 0


def test_a_batch_of_prompts_gives_each_row_its_own_tokens(gemma):
    m, model = gemma
    rng = np.random.default_rng(5)
    long, short = rng.integers(3, m.vocab_size, 11), rng.integers(3, m.vocab_size, 6)
    alone = [np.asarray(zoo.generate(model, p[None], max_new_tokens=12, prefill_chunk=4))[0] for p in (long, short)]
    batch_BT = np.stack([long, np.pad(short, (0, 5), constant_values=7)])   # the padding must not matter
    got = np.asarray(zoo.generate(model, batch_BT, prompt_lengths=[11, 6], max_new_tokens=12, prefill_chunk=4))
    np.testing.assert_array_equal(got, np.stack(alone))
    # a stop token ends its row (pad_id after it) and leaves the other row alone up to its own stop
    stop = int(alone[0][3])
    got = np.asarray(zoo.generate(model, batch_BT, prompt_lengths=[11, 6], max_new_tokens=12, prefill_chunk=4,
                                  stop_tokens=[stop], pad_id=0))
    for row, want in zip(got, alone):
        end = int(np.argmax(want == stop)) + 1 if (want == stop).any() else len(want)
        np.testing.assert_array_equal(row[:end], want[:end])
        assert (row[end:] == 0).all()


def test_separate_prefill_and_decode_programs_give_generate_tokens(gemma):
    """inference.prefill_program + decode_program (what benchmarks/decode.py times: a donated cache, no
    host callback) give zoo.generate's greedy tokens, and compile once for repeated calls of one shape."""
    m, model = gemma
    graphdef, state = nnx.split(model)
    prompt_BT = jnp.asarray(np.random.default_rng(6).integers(3, m.vocab_size, (2, 11)), jnp.int32)
    lengths_B = jnp.full((2,), 11, jnp.int32)
    want = np.asarray(zoo.generate(model, prompt_BT, max_new_tokens=9, prefill_chunk=4))
    for _ in range(2):
        cache = inference.init_cache(model, batch_size=2, max_len=11 + 9)
        logits_BV, cache = inference.prefill_program(graphdef, state, cache, prompt_BT, lengths_B, chunk=4)
        tokens_BN, cache = inference.decode_program(graphdef, state, cache, logits_BV, jax.random.key(0),
                                                    max_new_tokens=9)
        np.testing.assert_array_equal(np.asarray(tokens_BN), want)
        np.testing.assert_array_equal(np.asarray(cache["lengths_B"]), [11 + 8, 11 + 8])
    assert inference.prefill_program._cache_size() == 1 and inference.decode_program._cache_size() == 1


def test_sampling_is_seeded_and_top_k_1_is_greedy(gemma):
    m, model = gemma
    prompt = np.random.default_rng(6).integers(3, m.vocab_size, (2, 9))
    draw = lambda **kw: np.asarray(zoo.generate(model, prompt, max_new_tokens=10, **kw))
    hot = dict(temperature=1.5, top_p=0.9)
    first, again, other = draw(seed=1, **hot), draw(seed=1, **hot), draw(seed=2, **hot)
    np.testing.assert_array_equal(first, again)
    assert (first != other).any()
    np.testing.assert_array_equal(draw(temperature=1.0, top_k=1, seed=3), draw())


def test_sample_keeps_the_top_k_and_the_top_p_nucleus():
    logits_BV = jnp.log(jnp.asarray([[0.5, 0.3, 0.15, 0.05]] * 2000))
    draws = np.asarray(inference.sample(logits_BV, jax.random.key(0), temperature=1.0, top_p=0.75))
    assert set(draws) == {0, 1}          # 0.5 + 0.3 reaches 0.75: the nucleus is the first two
    draws = np.asarray(inference.sample(logits_BV, jax.random.key(0), temperature=1.0, top_k=3))
    assert set(draws) == {0, 1, 2}
    assert abs((draws == 0).mean() - 0.5 / 0.95) < 0.05


@pytest.mark.parametrize("kwargs,message", [
    (dict(prompt_ids=np.zeros((1, 0), int)), "non-empty"),
    (dict(prompt_ids=[[3, 64]]), "outside the vocabulary"),
    (dict(prompt_ids=[[3, -1]]), "outside the vocabulary"),
    (dict(max_new_tokens=0), "max_new_tokens must be positive"),
    (dict(top_p=0.0), "top_p must lie in"),
    (dict(top_p=1.5), "top_p must lie in"),
    (dict(max_len=3), "more than max_len"),
    (dict(max_len=6), "do not fit max_len"),
])
def test_bad_input_gets_one_clear_error(gemma, kwargs, message):
    _, model = gemma
    args = {"prompt_ids": [[3, 4, 5, 6]], "max_new_tokens": 4, **kwargs}
    with pytest.raises(ValueError, match=message):
        zoo.generate(model, args.pop("prompt_ids"), **args)


def test_generate_cli_fails_in_one_line_on_a_missing_workdir(tmp_path):
    import subprocess
    import sys

    from tests.conftest import ROOT
    result = subprocess.run([sys.executable, "generate.py", f"--workdir={tmp_path / 'none'}"], cwd=ROOT,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [f"error: no such checkpoint directory: {tmp_path / 'none'}"]


PRESETS = [(f, p) for f in ("gemma4", "laguna", "zaya1", "deepseek_v4", "hybrid")
           for p in importlib.import_module(f"configs.{f}").PRESETS]


@pytest.mark.parametrize("family,preset", PRESETS)
def test_allocated_cache_is_the_analysis_figure(family, preset):
    """At 128K tokens every preset's allocated cache (shapes only) is zoo.analysis's arithmetic
    kv_cache_bytes plus the per-sequence state that is not keys, values or entries."""
    cfg = importlib.import_module(f"configs.{family}").get_config(preset).model
    kv = analysis.kv_cache(cfg, 131_072, "bfloat16", batch=2)
    spec = inference.cache_spec(cfg, batch_size=2, max_len=131_072, dtype="bfloat16")
    assert kv["kv_cache_bytes_measured"] == inference.cache_bytes(spec)
    assert kv["kv_cache_bytes_measured"] - kv["kv_cache_bytes_measured_state"] == kv["kv_cache_bytes"]
    for i, layer in enumerate(spec["layers"]):   # a KV-shared layer allocates nothing
        if option(cfg, "kv_sources", i) >= 0:
            assert inference.cache_bytes(layer) == 0


def test_packed_entries_round_off_as_fp8_and_fp4_do():
    """layers.kv_cache.pack/unpack: each fp8 value within half an e4m3 step of x (relative 2^-4, or the
    subnormal step 2^-9 of its block scale), the RoPE part bf16-rounded, each fp4 value on the e2m1 grid
    within half its widest gap (1 x scale)."""
    from layers import kv_cache
    x = np.asarray(jax.random.normal(jax.random.key(0), (3, 5, 160)) * np.logspace(-3, 2, 160), np.float32)
    packed = kv_cache.pack(jnp.asarray(x), kv_cache.packed_spec((3, 5), 160, rope_dim=32))
    assert packed["values_fp8"].shape == (3, 5, 128) and packed["scales_e8m0"].shape == (3, 5, 8)
    y = np.asarray(kv_cache.unpack(packed, jnp.float32))
    scale = np.repeat(2.0 ** (np.asarray(packed["scales_e8m0"][..., :2], np.float32) - 127), 64, axis=-1)
    assert np.all(np.abs(y[..., :128] - x[..., :128]) <= 2 ** -4 * np.abs(x[..., :128]) + 2 ** -10 * scale)
    np.testing.assert_allclose(y[..., 128:], x[..., 128:], rtol=2 ** -8)
    packed = kv_cache.pack(jnp.asarray(x), kv_cache.packed_spec((3, 5), 160, fp4=True))
    assert packed["codes_fp4x2"].shape == (3, 5, 80) and packed["scales_e8m0"].shape == (3, 5, 5)
    y = np.asarray(kv_cache.unpack(packed, jnp.float32))
    scale = np.repeat(2.0 ** (np.asarray(packed["scales_e8m0"], np.float32) - 127), 32, axis=-1)
    assert np.all(np.isin(np.abs(y / scale), [0, 0.5, 1, 1.5, 2, 3, 4, 6]))
    assert np.all(np.abs(y - x) <= scale)


def test_fp8_cache_is_the_native_figure_and_close_to_the_bf16_cache():
    """cache_dtype float8_e4m3fn on DeepSeek-V4 layers allocates exactly zoo.analysis's native bytes (the
    tiny test config, and the flash preset at 128K: head_dim 512, 448 fp8 channels in 7 scaled blocks), and
    its logits after prefill + decode stay within the README's tolerance of the bf16 cache's: median
    per-position relative L2 error < 0.1 (most positions 2-5 %; a flipped top-k or MoE route moves a few
    positions further)."""
    m = _small("deepseek_v4")
    for cfg, length in ((m, T), (importlib.import_module("configs.deepseek_v4").get_config("flash").model, 131_072)):
        spec = inference.cache_spec(cfg, batch_size=2, max_len=length, dtype="float8_e4m3fn")
        assert (inference.cache_bytes_by_part(spec)["kv"]
                == analysis.kv_cache(cfg, length, batch=2)["kv_cache_bytes_native"])
    model = zoo.build(m, seed=1)
    extend = _jitted_extend(model)
    tokens_BT = jnp.asarray(np.random.default_rng(0).integers(0, m.vocab_size, (2, T)), jnp.int32)
    logits = {}
    for dtype in ("bfloat16", "float8_e4m3fn"):
        cache = inference.init_cache(model, batch_size=2, max_len=T, dtype=dtype)
        first_BTV, cache = extend(tokens_BT[:, :PROMPT], cache, jnp.full((2,), PROMPT, jnp.int32))
        got = [first_BTV]
        for t in range(PROMPT, T):
            step_BTV, cache = extend(tokens_BT[:, t:t + 1], cache, jnp.ones((2,), jnp.int32))
            got.append(step_BTV)
        logits[dtype] = np.asarray(jnp.concatenate(got, axis=1))
    error_BT = (np.linalg.norm(logits["float8_e4m3fn"] - logits["bfloat16"], axis=-1)
                / np.linalg.norm(logits["bfloat16"], axis=-1))
    assert np.median(error_BT) < 0.1 and 0 < np.min(error_BT), np.round(error_BT, 3)
    with pytest.raises(ValueError, match="float8_e4m3fn needs every attention kind"):
        inference.cache_spec(_small("gemma4"), batch_size=1, max_len=8, dtype="float8_e4m3fn")
