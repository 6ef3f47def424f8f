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
