"""Decode attention kernels against their pure-JAX references: the Triton lowering (interpret mode on CPU,
compiled on a GPU) and the Mosaic lowering (TPU interpreter) for dense GQA decode over a full cache and a
wrapped ring with empty slots, sinks and a window, DeepSeek-V4's HCA and CSA decode (window ring + compressed
entries in one softmax) and the indexer's decode top-k. Inputs are random (never zeros); the interpreters
fill outputs with NaN first, so an element a kernel never wrote fails `assert_close`."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import (DecodeBlockSizes, compressed_decode_attention, decode_attention, indexer_decode_topk)
from pallas_kernels.decode import EMPTY_POSITION
from tests.pallas_kernels.conftest import TOL

SMALL = {"pallas_gpu": DecodeBlockSizes(block_s=16, block_r=16, min_programs=8, min_split_blocks=1),
         "pallas_tpu": DecodeBlockSizes(block_s=8, block_r=8, min_programs=4, min_split_blocks=2)}
IMPLS = ["pallas_gpu", "pallas_tpu"]


def _ring_positions(lengths_B, size):
    """What layers.kv_cache.ring_positions says, written out: slot j holds the largest p < L with p % W == j."""
    out = np.full((len(lengths_B), size), EMPTY_POSITION, np.int32)
    for b, L in enumerate(lengths_B):
        for p in range(max(0, L - size), L):
            out[b, p % size] = p
    return jnp.asarray(out)


def _normal(key, shape, dtype=jnp.float32):
    return jax.random.normal(key, shape, jnp.float32).astype(dtype)


@pytest.mark.parametrize("impl,dtype", [("pallas_gpu", jnp.float32), ("pallas_gpu", jnp.bfloat16),
                                        ("pallas_tpu", jnp.float32)])
def test_dense_decode_over_a_full_cache(impl, dtype, assert_close):
    """S = 77 slots (odd: the last slot block is partial), rows of lengths 5 and 77 - 3, T = 3 new tokens,
    GQA 6 heads on 2 kv heads, sinks: slots past a row's tokens hold random stale values never seen."""
    B, T, S, N, K, H = 2, 3, 77, 6, 2, 32
    ks = jax.random.split(jax.random.key(0), 4)
    q, k, v = _normal(ks[0], (B, T, N, H), dtype), _normal(ks[1], (B, S, K, H), dtype), _normal(ks[2], (B, S, K, H), dtype)
    sinks = _normal(ks[3], (N,))
    q_pos = jnp.asarray([[2, 3, 4], [S - 3, S - 2, S - 1]], jnp.int32)
    kv_pos = jnp.broadcast_to(jnp.arange(S, dtype=jnp.int32), (B, S))
    run = lambda impl, blocks: jax.jit(lambda *a: decode_attention(*a, sinks_N=sinks, impl=impl, block_sizes=blocks))(
        q, k, v, q_pos, kv_pos)
    out, ref = run(impl, SMALL[impl]), run("xla", None)
    assert out.dtype == dtype
    assert_close(out, ref, TOL[dtype], "out")


@pytest.mark.parametrize("impl", IMPLS)
def test_dense_decode_over_a_wrapped_ring_with_a_window(impl, assert_close):
    """A ring of W = 11 slots (+ T = 2 chunk slots) at lengths 4 (7 empty slots) and 30 (wrapped), window
    11, K = V (k_eq_v) and no sinks. 13 slots: shorter than the GPU's 16-slot block (padded with empty
    slots), a full and a partial 8-slot block on the TPU."""
    B, T, W, N, K, H = 2, 2, 11, 4, 1, 16
    ks = jax.random.split(jax.random.key(1), 2)
    q, kv = _normal(ks[0], (B, T, N, H)), _normal(ks[1], (B, W + T, K, H))
    lengths = [4, 30]
    kv_pos = jnp.concatenate([_ring_positions(lengths, W), jnp.asarray([[L, L + 1] for L in lengths], jnp.int32)], 1)
    q_pos = jnp.asarray([[L, L + 1] for L in lengths], jnp.int32)
    run = jax.jit(lambda q, kv, q_pos: decode_attention(q, kv, None, q_pos, kv_pos, window=W, impl=impl,
                                                        block_sizes=SMALL[impl]))
    ref = decode_attention(q, kv, None, q_pos, kv_pos, window=W, impl="xla")
    assert_close(run(q, kv, q_pos), ref, 1e-5, "out")


def _compressed_inputs(B=2, T=2, W=9, N=4, H=32, C=13, ratio=4, seed=2):
    ks = jax.random.split(jax.random.key(seed), 4)
    lengths = [21, 50]
    q_pos = jnp.asarray([[L + t for t in range(T)] for L in lengths], jnp.int32)
    win_pos = jnp.concatenate([_ring_positions(lengths, W), q_pos], axis=1)
    return (_normal(ks[0], (B, T, N, H)), _normal(ks[1], (B, W + T, H)), win_pos, q_pos,
            _normal(ks[2], (B, C, H)), _normal(ks[3], (N,)))


@pytest.mark.parametrize("impl", ["pallas_gpu"])   # the TPU kernel is the one the CSA test runs
def test_hca_decode(impl, assert_close):
    """Ratio 4, 13 cached entries: the rows see 5 and 12-13 of them; window ring of 9 wrapped."""
    q, win, win_pos, q_pos, entries, sinks = _compressed_inputs()
    run = lambda impl, blocks: jax.jit(lambda *a: compressed_decode_attention(
        *a, window=9, ratio=4, impl=impl, block_sizes=blocks))(q, win, win_pos, q_pos, entries, sinks)
    assert_close(run(impl, SMALL[impl]), run("xla", None), 1e-5, "out")


@pytest.mark.parametrize("impl", IMPLS)
def test_csa_decode_with_indexer_topk(impl, assert_close):
    """The indexer's top-5 of each token (the first row sees 5 entries, the second 12-13) against its
    reference, then CSA over the window ring + those entries, unused (-1) slots included."""
    q, win, win_pos, q_pos, entries, sinks = _compressed_inputs()
    ks = jax.random.split(jax.random.key(3), 3)
    iq, ik, w = _normal(ks[0], (2, 2, 8, 16)), _normal(ks[1], (2, 13, 16)), _normal(ks[2], (2, 2, 8))

    def run(impl, blocks):
        @jax.jit
        def indexer_then_csa(iq, ik, w, q, win, entries):
            idx = indexer_decode_topk(iq, ik, w, q_pos - 16, ratio=4, topk=5, impl=impl)
            return idx, compressed_decode_attention(q, win, win_pos, q_pos, entries, sinks, window=9,
                                                    indices_BTK=idx, impl=impl, block_sizes=blocks)
        return indexer_then_csa(iq, ik, w, q, win, entries)

    (idx, out), (idx_ref, ref) = run(impl, SMALL[impl]), run("xla", None)
    np.testing.assert_array_equal(idx, idx_ref)
    assert (idx[0] == -1).any() and (idx[1] >= 0).all()   # row 0 (positions 5, 6) sees only 1 entry
    assert_close(out, ref, 1e-5, "out")


def test_bad_input_gets_one_clear_error():
    q, k = jnp.ones((1, 1, 4, 8)), jnp.ones((1, 5, 3, 8))
    pos = jnp.zeros((1, 1), jnp.int32)
    with pytest.raises(ValueError, match="not a multiple of 3 kv heads"):
        decode_attention(q, k, None, pos, jnp.zeros((1, 5), jnp.int32))
    with pytest.raises(ValueError, match="kv_positions must have dtype"):
        decode_attention(q, k[:, :, :1], None, pos, jnp.zeros((1, 5), jnp.float32))
