"""The Mosaic GPU (Hopper) CSA and HCA forwards in the Mosaic GPU interpreter, against the pure-JAX reference:
output and log-sum-exp (what the backward consumes), heads padded to the 64-row tile, segments with padding,
unused (-1), repeated and trailing top-k slots, a token that selects nothing; HCA's entry blocks from the
segment's first entry to the visible count. The interpreter (jax 0.10) runs the TMA copies, the per-row
gather, the re-tiling, the barriers and the softmax; it has no run_state and its wgmma takes neither a
transposed nor a register operand, so the kernel's two matmuls run there as plain dots
(`compressed_hopper._scores_interpreted`, `_accumulate_interpreted`); the lead checks the wgmma path on an
H100 (benchmarks/compressed_hopper.py)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams

from pallas_kernels import compressed_hopper
from pallas_kernels.common import F32, HIGHEST, window_start
from pallas_kernels.compressed import (csa_attention_reference, csa_slot_counts, gather_rows,
                                       window_keys_reference)

N, H, C, W, BLOCK_K = 40, 128, 9, 70, 64


def make_inputs(B, T, K, seed=0):
    ks = jax.random.split(jax.random.key(seed), 5)
    q = jax.random.normal(ks[0], (B, T, N, H), F32).astype(jnp.bfloat16)
    kv = jax.random.normal(ks[1], (B, T, H), F32).astype(jnp.bfloat16)
    kv_comp = jax.random.normal(ks[2], (B, C, H), F32).astype(jnp.bfloat16)
    sinks = jax.random.normal(ks[3], (N,), F32)
    indices = jax.random.randint(ks[4], (B, T, K), -1, C, jnp.int32)
    indices = indices.at[0, 3, :4].set(jnp.array([2, -1, 2, 0]))      # a repeated row and an unused slot
    indices = indices.at[0, 2, 10:].set(-1)                          # trailing unused slots (fewer blocks)
    indices = indices.at[0, 0].set(-1)                               # nothing selected at all
    segment_ids = jnp.ones((B, T), jnp.int32)
    segment_ids = segment_ids.at[-1, 3:].set(2).at[-1, -1].set(0)    # two segments, then padding
    return q, kv, kv_comp, indices, sinks, segment_ids


def lse_reference(q, kv, kv_comp, indices, sinks, segment_ids, scale):
    """log(sum over visible keys of exp(logit) + exp(sink)), float32, from the gathered keys."""
    B, T = q.shape[:2]
    keys_BTWH, visible_BTW = window_keys_reference(kv, W, window_start(segment_ids, B, T))
    keys_BTKH = gather_rows(kv_comp, jnp.maximum(indices, 0))
    logits = lambda keys: jnp.einsum("BTNH,BTXH->BTNX", q, keys, precision=HIGHEST, preferred_element_type=F32)
    parts = [jnp.where(visible_BTW[:, :, None], logits(keys_BTWH) * scale, -jnp.inf),
             jnp.where((indices >= 0)[:, :, None], logits(keys_BTKH) * scale, -jnp.inf),
             jnp.broadcast_to(sinks[:, None], (B, T, N, 1))]
    return jax.nn.logsumexp(jnp.concatenate(parts, axis=-1), axis=-1)


def _check_forward(B, T, K, assert_close, split_scores=False):
    q, kv, kv_comp, indices, sinks, segment_ids = make_inputs(B, T, K)
    scale = 0.3
    lo = window_start(segment_ids, B, T)
    count = csa_slot_counts(indices)
    o, lse = compressed_hopper.forward(q, kv, kv_comp, indices, sinks, lo, count, window=W, scale=scale,
                                       block_k=BLOCK_K, stages=1, split_scores=split_scores,
                                       interpret=InterpretGPUParams())
    ref = csa_attention_reference(q, kv, kv_comp, indices, sinks, window=W, scale=scale,
                                  segment_ids_BT=segment_ids)
    assert o.shape == ref.shape and o.dtype == ref.dtype and lse.shape == (B, T, N)
    assert_close(o, ref, 1e-2, "o")
    assert_close(lse, lse_reference(q, kv, kv_comp, indices, sinks, segment_ids, scale), 1e-4, "lse")


def test_forward_matches_reference_in_the_interpreter(assert_close):
    """Two top-k blocks through a one-slot ring (it wraps), one window block per token. (The split-scores
    variant, windows over several key blocks and the gradients through the Triton backward are checked by
    benchmarks/compressed_hopper.py on the GPU: in the interpreter they take minutes.)"""
    _check_forward(1, 5, 70, assert_close, False)


def test_hca_forward_matches_reference_in_the_interpreter(assert_close):
    """HCA (ratio 1): the visible entries [lo // ratio, count) in whole 64-entry blocks through a one-slot
    ring: two and three blocks, a second segment whose first entry lies inside a block, a token that sees no
    entry, one that sees exactly a block and one more. The reference is CSA's with every visible entry
    listed as a top-k row (count is passed directly, so the tokens need not be 64 * ratio long)."""
    T, C_ = 5, 150
    q, kv, _, _, sinks, _ = make_inputs(1, T, 8)
    kv_comp = jax.random.normal(jax.random.key(7), (1, C_, H), F32).astype(jnp.bfloat16)
    segment_ids = jnp.array([[1, 1, 2, 2, 2]], jnp.int32)
    lo = window_start(segment_ids, 1, T)
    count = jnp.array([[70, 0, 150, 2, 65]], jnp.int32)
    scale = 0.3
    o, lse = compressed_hopper.forward(q, kv, kv_comp, None, sinks, lo, count, window=W, scale=scale, ratio=1,
                                       block_k=BLOCK_K, stages=1, interpret=InterpretGPUParams())
    c = jnp.arange(C_, dtype=jnp.int32)
    visible = (c >= lo[..., None]) & (c < count[..., None])
    indices = jnp.where(visible, c, -1)
    ref = csa_attention_reference(q, kv, kv_comp, indices, sinks, window=W, scale=scale, segment_ids_BT=segment_ids)
    assert_close(o, ref, 1e-2, "o")
    assert_close(lse, lse_reference(q, kv, kv_comp, indices, sinks, segment_ids, scale), 1e-4, "lse")


@pytest.mark.parametrize("head_dim,split_scores,hca", [(512, False, False), (512, True, False), (256, False, False),
                                                       (512, False, True), (512, True, True)])
def test_lowers_to_mosaic_gpu_at_v4_flash_shapes(head_dim, split_scores, hca):
    """The compiled (not interpreted) kernel lowers through Mosaic GPU on CPU at 64 heads x 512 (and x 256),
    window 128, CSA top-k 512 or HCA over 200 entries, default tiles: TMA copy sizes, tilings,
    bank-conflict-free transfer plans and wgmma shapes are checked there; the final compilation needs the
    H100."""
    B, T, N_, H_, C_, K_ = 1, 256, 64, head_dim, 200, 512
    sd = jax.ShapeDtypeStruct
    idx = None if hca else sd((B, T, K_), jnp.int32)
    args = [sd((B, T, N_, H_), jnp.bfloat16), sd((B, T, H_), jnp.bfloat16), sd((B, C_, H_), jnp.bfloat16), idx,
            sd((N_,), F32), sd((B, T), jnp.int32), sd((B, T), jnp.int32)]
    forward = jax.jit(lambda *a: compressed_hopper.forward(*a, window=128, scale=H_ ** -0.5, ratio=1 if hca else None,
                                                           split_scores=split_scores))
    text = jax.export.export(forward, platforms=["cuda"])(*args).mlir_module()
    assert "mosaic_gpu" in text


def test_bad_inputs_name_the_problem():
    q, kv, kv_comp, indices, sinks, _ = make_inputs(1, 4, 8)
    with pytest.raises(ValueError, match="head dim in"):
        compressed_hopper.csa_attention_hopper(q[..., :64], kv[..., :64], kv_comp[..., :64], indices, sinks,
                                               window=W)
    with pytest.raises(ValueError, match="indices has shape"):
        compressed_hopper.csa_attention_hopper(q, kv, kv_comp, indices[:, :3], sinks, window=W)
    with pytest.raises(ValueError, match="block_k must be a multiple of 64"):
        compressed_hopper.forward(q, kv, kv_comp, indices, sinks, None, None, window=W, scale=1.0, block_k=32)
    with pytest.raises(ValueError, match="a ratio and no indices for HCA"):
        compressed_hopper.forward(q, kv, kv_comp, indices, sinks, None, None, window=W, scale=1.0, ratio=4)
    with pytest.raises(ValueError, match="hca_attention_hopper takes 16-bit q"):
        compressed_hopper.hca_attention_hopper(q.astype(F32), kv.astype(F32), kv_comp.astype(F32), sinks, window=W,
                                               ratio=4)
    with pytest.raises(ValueError, match="interpret must be False or"):
        compressed_hopper.forward(q, kv, kv_comp, indices, sinks, None, None, window=W, scale=1.0, interpret=True)
    np.testing.assert_equal(compressed_hopper.flops_per_token(64, 512, 128, 512), 4 * 64 * 512 * 640)
