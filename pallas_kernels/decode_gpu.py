"""Triton (Pallas GPU) lowering of decode attention's partial step (`decode.py`).

One program per (slot split, kv head and row block, batch row): its rows (the query tokens x the query
heads of one kv head) walk the split's slots in blocks of `block_s`, online softmax from a running max of
-1e30 (no sink: the combine step adds it), and write the unnormalised accumulator, the max and the sum.
Only the slots [lo, hi) some query of the row can see are walked. A block never reads past the cache: the
last one is loaded from S - block_s and masks the slots an earlier block already took, so the cache is
read in place (no padded copy).

Shapes: B batch, S slots, K kv heads, H head dim (a power of two >= 16), R rows per kv head (padded to
Rp), P slot splits. Tiles: r rows, s slots, h head dim.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.common import F32, cdiv, dot, dot_nt

NEG = -1e30   # the running max before any visible key: finite, so a fully masked block adds exactly 0


def _partials_kernel(bounds_ref, qpos_ref, q_ref, kpos_ref, k_ref, *refs, k_is_v: bool, window: int,
                     scale: float, bs: int, chunk: int, n_slots: int):
    if k_is_v:
        v_ref, (acc_ref, m_ref, l_ref) = k_ref, refs
    else:
        v_ref, acc_ref, m_ref, l_ref = refs
    split = pl.program_id(0)
    lo = jnp.maximum(bounds_ref[0], split * chunk)
    hi = jnp.minimum(bounds_ref[1], split * chunk + chunk)
    q_rh, qpos_r = q_ref[...], qpos_ref[...]

    def step(i, carry):
        acc_rh, m_r, l_r = carry
        start = lo + i * bs
        at = jnp.minimum(start, n_slots - bs)           # the last block ends at the cache's end
        slot_s = at + lax.broadcasted_iota(jnp.int32, (bs,), 0)
        kpos_s = kpos_ref[pl.ds(at, bs)]
        visible_rs = (((slot_s >= start) & (slot_s < hi))[None, :]
                      & (kpos_s[None, :] <= qpos_r[:, None]))
        if window:
            visible_rs &= qpos_r[:, None] - kpos_s[None, :] < window
        keys_sh = k_ref[pl.ds(at, bs), :]
        s_rs = jnp.where(visible_rs, dot_nt(q_rh, keys_sh) * scale, -jnp.inf)
        m_new = jnp.maximum(m_r, jnp.max(s_rs, axis=1))
        alpha_r = jnp.exp(m_r - m_new)
        p_rs = jnp.exp(s_rs - m_new[:, None])
        values_sh = keys_sh if k_is_v else v_ref[pl.ds(at, bs), :]
        acc_rh = acc_rh * alpha_r[:, None] + dot(p_rs.astype(values_sh.dtype), values_sh)
        return acc_rh, m_new, l_r * alpha_r + jnp.sum(p_rs, axis=1)

    rows = q_rh.shape[0]
    carry = (jnp.zeros(q_rh.shape, F32), jnp.full((rows,), NEG, F32), jnp.zeros((rows,), F32))
    acc_rh, m_r, l_r = lax.fori_loop(0, cdiv(jnp.maximum(hi - lo, 0), bs), step, carry)
    acc_ref[...] = acc_rh
    m_ref[...] = m_r
    l_ref[...] = l_r


def partials(q_BKRH, qpos_BR, k_BSF, v_BSF, kpos_BS, bounds_B2, *, window: int, scale: float, blocks,
             splits: int, interpret: bool):
    """(acc [B, K, P, Rp, H], max [B, K, P, Rp], sum [B, K, P, Rp]) in float32 of the split slots.

    q [B, K, Rp, H] (Rp a multiple of block_r); qpos [B, Rp]; k, v [B, S, K * H] (v None: K = V), S >= block_s;
    kpos [B, S]; bounds [B, 2] the slot range [lo, hi) worth walking; blocks: DecodeBlockSizes; splits:
    how many programs share a row's slots (each takes `chunk` slots, a multiple of block_s).
    """
    B, K, Rp, H = q_BKRH.shape
    S = k_BSF.shape[1]
    block_s, block_r = blocks.block_s, min(blocks.block_r, Rp)
    n_rb = Rp // block_r
    chunk = -(-S // (splits * block_s)) * block_s
    P = -(-S // chunk)
    grid = (P, K * n_rb, B)
    rows = pl.BlockSpec((None, None, block_r, H), lambda p, kr, b: (b, kr // n_rb, kr % n_rb, 0))
    slots = pl.BlockSpec((None, S, H), lambda p, kr, b: (b, 0, kr // n_rb))
    in_specs = [pl.BlockSpec((None, 2), lambda p, kr, b: (b, 0)),
                pl.BlockSpec((None, block_r), lambda p, kr, b: (b, kr % n_rb)), rows,
                pl.BlockSpec((None, S), lambda p, kr, b: (b, 0)), slots] + ([] if v_BSF is None else [slots])
    acc_spec = pl.BlockSpec((None, None, None, block_r, H), lambda p, kr, b: (b, kr // n_rb, p, kr % n_rb, 0))
    vec_spec = pl.BlockSpec((None, None, None, block_r), lambda p, kr, b: (b, kr // n_rb, p, kr % n_rb))
    kernel = functools.partial(_partials_kernel, k_is_v=v_BSF is None, window=window, scale=scale, bs=block_s,
                               chunk=chunk, n_slots=S)
    return pl.pallas_call(
        kernel, grid=grid, in_specs=in_specs, out_specs=[acc_spec, vec_spec, vec_spec],
        out_shape=[jax.ShapeDtypeStruct((B, K, P, Rp, H), F32), jax.ShapeDtypeStruct((B, K, P, Rp), F32),
                   jax.ShapeDtypeStruct((B, K, P, Rp), F32)],
        compiler_params=plgpu.CompilerParams(num_warps=blocks.num_warps, num_stages=blocks.num_stages),
        interpret=interpret, name="decode_attention_partials",
    )(bounds_B2, qpos_BR, q_BKRH, kpos_BS, k_BSF, *([] if v_BSF is None else [v_BSF]))
