"""Mosaic TPU lowering of decode attention's partial step (`decode.py`).

Grid (batch row, kv head, row block, slot split, slot block): the slot blocks of a split are the last
("arbitrary") axis, with the online-softmax state in VMEM scratch, written out at the split's last block
(no sink: the combine step adds it). Blocks outside the row's slot range [lo, hi) (scalar-prefetched) are
skipped: the index map clamps them into the range, so the pipeline re-uses the block already in VMEM (no
DMA), and `pl.when` skips the compute. The cache is read in place: a trailing partial block's rows past
S are masked, its values zeroed. Per-row vectors are [.., R, 1], per-slot ones [.., 1, S].

Shapes: B batch, S slots, K kv heads, H head dim, R rows per kv head (padded to Rp), P slot splits.
Tiles: r rows, s slots, h head dim.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.common import F32, dot, dot_nt, tpu_precision

NEG = -1e30   # the running max before any visible key: finite, so a fully masked block adds exactly 0


def _partials_kernel(bounds_ref, qpos_ref, q_ref, kpos_ref, k_ref, *refs, k_is_v: bool, window: int,
                     scale: float, bs: int, blocks_per_split: int, n_slots: int):
    if k_is_v:
        v_ref, (acc_ref, m_ref, l_ref, acc_scr, m_scr, l_scr) = k_ref, refs
    else:
        v_ref, acc_ref, m_ref, l_ref, acc_scr, m_scr, l_scr = refs
    b, i = pl.program_id(0), pl.program_id(4)
    block = pl.program_id(3) * blocks_per_split + i
    lo, hi = bounds_ref[2 * b], bounds_ref[2 * b + 1]

    @pl.when(i == 0)
    def _init():
        acc_scr[...] = jnp.zeros(acc_scr.shape, F32)
        m_scr[...] = jnp.full(m_scr.shape, NEG, F32)
        l_scr[...] = jnp.zeros(l_scr.shape, F32)

    @pl.when((block * bs < hi) & (block * bs + bs > lo))
    def _step():
        slot_1s = block * bs + lax.broadcasted_iota(jnp.int32, (1, bs), 1)
        kpos_1s, qpos_r1 = kpos_ref[...], qpos_ref[...]
        visible_rs = (slot_1s >= lo) & (slot_1s < hi) & (kpos_1s <= qpos_r1)
        if window:
            visible_rs &= qpos_r1 - kpos_1s < window
        q_rh, keys_sh = q_ref[...], k_ref[...]
        precision = tpu_precision(q_rh.dtype)
        s_rs = jnp.where(visible_rs, dot_nt(q_rh, keys_sh, precision) * scale, -jnp.inf)
        m_r1 = m_scr[...]
        m_new = jnp.maximum(m_r1, jnp.max(s_rs, axis=1, keepdims=True))
        alpha_r1 = jnp.exp(m_r1 - m_new)
        p_rs = jnp.exp(s_rs - m_new)
        values_sh = keys_sh if k_is_v else v_ref[...]
        in_cache_s1 = block * bs + lax.broadcasted_iota(jnp.int32, (bs, 1), 0) < n_slots
        values_sh = jnp.where(in_cache_s1, values_sh, jnp.zeros_like(values_sh))   # past S: unwritten memory
        acc_scr[...] = acc_scr[...] * alpha_r1 + dot(p_rs.astype(values_sh.dtype), values_sh, precision)
        l_scr[...] = l_scr[...] * alpha_r1 + jnp.sum(p_rs, axis=1, keepdims=True)
        m_scr[...] = m_new

    @pl.when(i == blocks_per_split - 1)
    def _finish():
        acc_ref[...] = acc_scr[...]
        m_ref[...] = m_scr[...]
        l_ref[...] = l_scr[...]


def partials(q_BKRH, qpos_BR, k_BSF, v_BSF, kpos_BS, bounds_B2, *, window: int, scale: float, blocks,
             splits: int, interpret):
    """(acc [B, K, P, Rp, H], max [B, K, P, Rp], sum [B, K, P, Rp]) in float32 of the split slots.

    q [B, K, Rp, H] (Rp a multiple of block_r); qpos [B, Rp]; k, v [B, S, K * H] (v None: K = V), S >= block_s;
    kpos [B, S]; bounds [B, 2] the slot range [lo, hi) worth walking; blocks: DecodeBlockSizes; splits:
    how many grid rows share a row's slots.
    """
    B, K, Rp, H = q_BKRH.shape
    S = k_BSF.shape[1]
    bs, br = blocks.block_s, min(blocks.block_r, Rp)
    n_blocks = -(-S // bs)
    per_split = -(-n_blocks // splits)
    P = -(-n_blocks // per_split)
    lo_hi = bounds_B2.reshape(-1)

    def slot_block(b, p, i, bounds):
        first = lax.div(bounds[2 * b], bs)
        last = jnp.maximum(lax.div(bounds[2 * b + 1] + bs - 1, bs) - 1, first)
        return jnp.clip(p * per_split + i, first, last)

    rows = pl.BlockSpec((None, None, br, H), lambda b, k, r, p, i, bounds: (b, k, r, 0))
    slots = pl.BlockSpec((None, bs, H), lambda b, k, r, p, i, bounds: (b, slot_block(b, p, i, bounds), k))
    in_specs = [pl.BlockSpec((None, br, 1), lambda b, k, r, p, i, bounds: (b, r, 0)), rows,
                pl.BlockSpec((None, 1, bs), lambda b, k, r, p, i, bounds: (b, 0, slot_block(b, p, i, bounds))),
                slots] + ([] if v_BSF is None else [slots])
    acc_spec = pl.BlockSpec((None, None, None, br, H), lambda b, k, r, p, i, bounds: (b, k, p, r, 0))
    vec_spec = pl.BlockSpec((None, None, None, br, 1), lambda b, k, r, p, i, bounds: (b, k, p, r, 0))
    kernel = functools.partial(_partials_kernel, k_is_v=v_BSF is None, window=window, scale=scale, bs=bs,
                               blocks_per_split=per_split, n_slots=S)
    acc, m, l = pl.pallas_call(
        kernel,
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=1, grid=(B, K, Rp // br, P, per_split), in_specs=in_specs,
            out_specs=[acc_spec, vec_spec, vec_spec],
            scratch_shapes=[pltpu.VMEM((br, H), F32), pltpu.VMEM((br, 1), F32), pltpu.VMEM((br, 1), F32)]),
        out_shape=[jax.ShapeDtypeStruct((B, K, P, Rp, H), F32), jax.ShapeDtypeStruct((B, K, P, Rp, 1), F32),
                   jax.ShapeDtypeStruct((B, K, P, Rp, 1), F32)],
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", "parallel", "parallel", "arbitrary")),
        interpret=interpret, name="decode_attention_partials",
    )(lo_hi, qpos_BR[:, :, None], q_BKRH, kpos_BS[:, None, :], k_BSF, *([] if v_BSF is None else [v_BSF]))
    return acc, m[..., 0], l[..., 0]
