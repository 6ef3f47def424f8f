"""Lightning-indexer kernels against the pure-JAX reference: scores (-inf exactly where invisible) and
their gradients w.r.t. q, k and the head weights for both lowerings, fp32 and bf16, odd lengths, batch 2;
top-k causality (no future entry is ever selected) and its -1 padding."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import IndexerBlockSizes, indexer_scores, indexer_scores_reference, indexer_topk

TOL = {jnp.float32: 1e-5, jnp.bfloat16: 1e-2}
SMALL_BLOCKS = {"pallas_gpu": IndexerBlockSizes(block_t=4, block_s=16),
                "pallas_tpu": IndexerBlockSizes(block_t=8, block_s=4)}
# fused top-k: candidate lists of 32 slots for top-5 or top-6, compacted 8 slots at a time
FUSED_BLOCKS = IndexerBlockSizes(block_t=4, block_s=16, topk_part=8)


def make_inputs(dtype, *, B=2, T=37, H=4, D=16, ratio=4, seed=0):
    ks = jax.random.split(jax.random.key(seed), 3)
    q = jax.random.normal(ks[0], (B, T, H, D), jnp.float32).astype(dtype)
    k = jax.random.normal(ks[1], (B, T // ratio, D), jnp.float32).astype(dtype)
    w = jax.random.normal(ks[2], (B, T, H), jnp.float32)
    return q, k, w


def _scores_and_grads(impl, blocks, ratio):
    """One jitted program: the scores and the VJP of a random probe (zero where a score is -inf)."""
    @jax.jit
    def run(q, k, w, probe):
        scores, vjp = jax.vjp(lambda *a: indexer_scores(*a, ratio=ratio, impl=impl, block_sizes=blocks), q, k, w)
        return scores, vjp(jnp.where(jnp.isfinite(scores), probe, 0.0))
    return run


@pytest.mark.parametrize("impl,dtype", [("pallas_gpu", jnp.float32), ("pallas_gpu", jnp.bfloat16),
                                        ("pallas_tpu", jnp.float32)])
def test_scores_match_reference(impl, dtype, assert_close):
    q, k, w = make_inputs(dtype)
    probe = jax.random.normal(jax.random.key(7), (q.shape[0], q.shape[1], k.shape[1]))
    scores, grads = _scores_and_grads(impl, SMALL_BLOCKS[impl], 4)(q, k, w, probe)
    ref, ref_grads = _scores_and_grads("xla", None, 4)(q, k, w, probe)
    assert scores.dtype == jnp.float32 and scores.shape == (2, 37, 9)
    assert_close(scores, ref, TOL[dtype], "scores")           # also: -inf exactly where the reference has it
    for name, g, r in zip(("dq", "dk", "dw"), grads, ref_grads):
        assert g.dtype == r.dtype, name
        assert_close(g, r, TOL[dtype], name)


def test_topk_is_causal_and_matches_reference():
    q, k, w = make_inputs(jnp.float32, T=45, ratio=4, H=8, D=32, seed=1)
    topk = 5
    idx = np.asarray(indexer_topk(q, k, w, ratio=4, topk=topk, impl="pallas_gpu",
                                  block_sizes=SMALL_BLOCKS["pallas_gpu"]))
    ref = np.asarray(indexer_topk(q, k, w, ratio=4, topk=topk, impl="xla"))
    np.testing.assert_array_equal(idx, ref)
    n_visible_T = np.minimum((np.arange(45) + 1) // 4, k.shape[1])
    assert idx.shape == (2, 45, topk) and idx.dtype == np.int32
    assert np.all(idx < n_visible_T[None, :, None]), "a future entry was selected"
    np.testing.assert_array_equal((idx >= 0).sum(-1), np.minimum(n_visible_T, topk)[None].repeat(2, 0))
    assert np.all(np.diff((idx >= 0).astype(int), axis=-1) <= 0), "-1 slots must come last"
    scores = np.asarray(indexer_scores_reference(q, k, w, ratio=4))
    picked = np.take_along_axis(scores, np.maximum(idx, 0), -1)
    assert np.all(np.diff(np.where(idx >= 0, picked, -1e30), axis=-1) <= 0), "best first"


@pytest.mark.parametrize("impl", ["pallas_gpu", "pallas_tpu", "xla"])
def test_topk_in_chunks_of_tokens_matches_one_sort_of_all_scores(impl, monkeypatch):
    """A tiny chunk budget forces 16-token chunks (3 of them for T=45): each chunk's runtime token offset
    must give the same sets as sorting the whole [B, T, S] reference scores at once."""
    import pallas_kernels.indexer as indexer_module
    monkeypatch.setattr(indexer_module, "_TOPK_CHUNK_BYTES", 1)
    q, k, w = make_inputs(jnp.float32, T=45, ratio=2, H=4, D=16, seed=3)
    topk = 6
    blocks = SMALL_BLOCKS.get(impl)
    idx = np.asarray(jax.jit(lambda *a: indexer_topk(*a, ratio=2, topk=topk, impl=impl, block_sizes=blocks))(q, k, w))
    scores = np.asarray(indexer_scores_reference(q, k, w, ratio=2))
    n_visible_T = np.minimum((np.arange(45) + 1) // 2, k.shape[1])
    expected = np.full(idx.shape, -1)
    for b in range(2):
        for t in range(45):
            best = np.argsort(-scores[b, t, :n_visible_T[t]], kind="stable")[:topk]
            expected[b, t, :len(best)] = best
    np.testing.assert_array_equal(idx, expected)


def test_topk_wider_than_the_entries_pads_with_minus_one():
    q, k, w = make_inputs(jnp.float32, T=11)
    idx = indexer_topk(q, k, w, ratio=4, topk=8, impl="pallas_tpu", block_sizes=SMALL_BLOCKS["pallas_tpu"])
    assert idx.shape == (2, 11, 8)
    np.testing.assert_array_equal(np.sort(np.asarray(idx[:, -1]), axis=-1)[:, ::-1][:, 2:], -1)
    np.testing.assert_array_equal(np.sort(np.asarray(idx[:, -1]), axis=-1)[:, -2:], [[0, 1], [0, 1]])


@pytest.mark.parametrize("bad,message", [
    (dict(q_BTNH=jnp.zeros((2, 37, 4))), "q must be 4-d"),
    (dict(k_BCH=jnp.zeros((2, 9, 8))), "k has shape"),
    (dict(weights_BTN=jnp.zeros((2, 37, 5))), "weights has shape"),
])
def test_bad_inputs_name_the_tensor(bad, message):
    q, k, w = make_inputs(jnp.float32)
    args = dict(q_BTNH=q, k_BCH=k, weights_BTN=w) | bad
    with pytest.raises(ValueError, match=message):
        indexer_scores(**args, ratio=4)
    with pytest.raises(ValueError, match="topk must be a positive int"):
        indexer_topk(q, k, w, ratio=4, topk=0)


def _expected_topk(scores_BTC, n_visible_T, first_BT, topk):
    """numpy: per token the `topk` visible entries in [first, n_visible) by descending float32 total order
    (-0.0 below +0.0, as jax.lax.top_k ranks), lowest index first among equal scores; -1 beyond."""
    bits = scores_BTC.astype(np.float32).view(np.int32).astype(np.int64)
    keys = np.where(bits < 0, -(bits & 0x7FFFFFFF), bits)
    B, T, _ = scores_BTC.shape
    expected = np.full((B, T, topk), -1)
    for b in range(B):
        for t in range(T):
            entries = np.arange(first_BT[b, t], n_visible_T[t])
            best = entries[np.lexsort((entries, -keys[b, t, entries]))][:topk]
            expected[b, t, :len(best)] = best
    return expected


def test_fused_topk_matches_a_sort_of_the_reference_scores(monkeypatch):
    """The fused Triton top-k (interpret mode) with candidate lists of 32 slots for top-5, so a token's list
    is compacted (in 4 parts) several times over its up to 50 entries; two segments and padding per batch
    row (segment ids), and a chunk budget that forces 16-token chunks (runtime token offsets). Same indices
    as a numpy sort of the reference scores."""
    import pallas_kernels.indexer as indexer_module
    monkeypatch.setattr(indexer_module, "_TOPK_CHUNK_BYTES", 1)
    B, T, ratio, topk = 2, 100, 2, 5
    q, k, w = make_inputs(jnp.float32, B=B, T=T, ratio=ratio, H=4, D=16, seed=5)
    runs = ([27, 66, 7], [40, 52, 8])                  # per batch row: segment 1, segment 2, padding
    segments = jnp.asarray([np.repeat([1, 2, 0], r) for r in runs], jnp.int32)
    idx = np.asarray(jax.jit(lambda *a: indexer_topk(*a, ratio=ratio, topk=topk, segment_ids_BT=segments,
                                                     impl="pallas_gpu", block_sizes=FUSED_BLOCKS,
                                                     fused=True))(q, k, w))
    first_BT = np.stack([np.repeat([0, r[0] // ratio, T], r) for r in runs])     # padding sees no entry
    scores = np.asarray(indexer_scores_reference(q, k, w, ratio=ratio))
    n_visible_T = np.minimum((np.arange(T) + 1) // ratio, k.shape[1])
    np.testing.assert_array_equal(idx, _expected_topk(scores, n_visible_T, first_BT, topk))


def test_fused_topk_breaks_exact_ties_by_lowest_index():
    """Small-integer q and k with power-of-two weights give exact scores with many ties, also across the
    top-k cut, and fewer visible entries than top-k early on: the fused path must keep the lowest indices
    among equal scores and pad with -1, as jax.lax.top_k over all scores does."""
    B, T, N, H, ratio, topk = 1, 64, 2, 16, 1, 6
    ks = jax.random.split(jax.random.key(11), 3)
    q = jax.random.randint(ks[0], (B, T, N, H), -1, 2).astype(jnp.float32)
    k = jax.random.randint(ks[1], (B, T, H), -1, 2).astype(jnp.float32)
    w = 2.0 ** jax.random.randint(ks[2], (B, T, N), -1, 2) * jnp.where(jnp.arange(T)[:, None] % 3 == 0, -1.0, 1.0)
    idx = np.asarray(indexer_topk(q, k, w, ratio=ratio, topk=topk, impl="pallas_gpu", fused=True,
                                  block_sizes=FUSED_BLOCKS))
    scores = np.asarray(indexer_scores_reference(q, k, w, ratio=ratio))
    sorted_scores = -np.sort(-scores[0, topk:], axis=-1)
    assert np.sum(sorted_scores[:, topk - 1] == sorted_scores[:, topk]) > 10, "too few ties at the cut"
    np.testing.assert_array_equal(idx, _expected_topk(scores, np.arange(T) + 1, np.zeros((B, T), int), topk))


def test_fused_topk_lowers_for_triton():
    """The fused kernel goes through the Triton lowering (scatter stores, scans, barriers) at V4-Flash
    indexer shapes; compiling to PTX needs the GPU (benchmarks/indexer_topk.py checks it there)."""
    spec = jax.ShapeDtypeStruct
    fused = lambda q, k, w: indexer_topk(q, k, w, ratio=4, topk=512, impl="pallas_gpu", interpret=False, fused=True)
    exported = jax.export.export(
        jax.jit(fused), platforms=["cuda"],
        disabled_checks=[jax.export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")],
    )(spec((1, 1024, 64, 128), jnp.bfloat16), spec((1, 256, 128), jnp.bfloat16), spec((1, 1024, 64), jnp.float32))
    assert "__gpu$xla.gpu.triton" in exported.mlir_module()
