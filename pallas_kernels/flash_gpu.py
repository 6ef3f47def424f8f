"""Triton (Pallas GPU) kernels of dense causal flash attention (see `flash_attention.py` for the layout).

Operands arrive in the row layout: q/dO/O [B, K, R, Hp] with R = padded (token, group-head) rows, token
major (row r is token r // G, head g = r % G of kv head k), keys/values [B, K, Sp, Hp], per-row segment ids
and sinks, per-key segment ids. Because the G query heads of one kv head are adjacent rows, one K/V block
serves all of them (GQA costs no extra K/V traffic).

  _forward_kernel  one program per (batch, kv head, row block): online softmax over the key blocks that
                   hold a visible key (future blocks and blocks left of the window are never visited),
                   seeded with the sink logit (m = sink, l = 1); writes O and the log-sum-exp.
  _dq_kernel       the same walk recomputing P: dQ.
  _dkv_kernel      one program per (batch, kv head, key block), walking the row blocks that can see it:
                   dK and dV (all G heads of the kv head summed in the matmuls, no atomics).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.common import dot, dot_nt, dot_tn
from pallas_kernels.flash_blocks import (key_block_range, row_block_range, walk_blocks, whole_key_blocks,
                                         whole_row_blocks)

_F32 = jnp.float32


def _visible(t_r, s_k, qseg_r, kvseg_k, window: int):
    """Causal (and window) visibility of keys s_k to rows of tokens t_r; with segment ids (not None), only
    within equal non-zero ids."""
    vis = s_k[None, :] <= t_r[:, None]
    if qseg_r is not None:
        vis &= (qseg_r[:, None] == kvseg_k[None, :]) & (kvseg_k[None, :] != 0)
    if window:
        vis &= t_r[:, None] - s_k[None, :] < window
    return vis


def _key_block_scores(q, k_ref, v_ref, kvseg_ref, j, t_r, qseg_r, *, masked: bool, scale, bk, window, segmented):
    """Key block j's keys, values and scale * q k^T, -inf where invisible on a `masked` block."""
    keys = k_ref[pl.ds(j * bk, bk), :]
    vals = v_ref[pl.ds(j * bk, bk), :]
    s = dot_nt(q, keys) * scale
    if masked:
        s_k = j * bk + lax.broadcasted_iota(jnp.int32, (bk,), 0)
        kvseg_k = kvseg_ref[pl.ds(j * bk, bk)] if segmented else None
        s = jnp.where(_visible(t_r, s_k, qseg_r, kvseg_k, window), s, -jnp.inf)
    return keys, vals, s


def _forward_kernel(qseg_ref, sink_ref, q_ref, k_ref, v_ref, kvseg_ref, o_ref, lse_ref, *, scale, bq, bk,
                    groups, tokens, window, segmented):
    i = pl.program_id(2)
    q = q_ref[...]
    t_r = lax.div(i * bq + lax.broadcasted_iota(jnp.int32, (bq,), 0), groups)
    qseg_r = qseg_ref[...] if segmented else None
    lo, hi = key_block_range(i, bq=bq, bk=bk, groups=groups, tokens=tokens, window=window)

    def step(j, carry, masked):
        acc, m, l = carry
        keys, vals, s = _key_block_scores(q, k_ref, v_ref, kvseg_ref, j, t_r, qseg_r, masked=masked, scale=scale,
                                          bk=bk, window=window, segmented=segmented)
        m_new = jnp.maximum(m, jnp.max(s, axis=1))
        alpha = jnp.exp(m - m_new)
        p = jnp.exp(s - m_new[:, None])
        acc = acc * alpha[:, None] + dot(p.astype(vals.dtype), vals)
        return acc, m_new, l * alpha + jnp.sum(p, axis=1)

    carry = (jnp.zeros(q.shape, _F32), sink_ref[...], jnp.ones((bq,), _F32))
    whole = whole_key_blocks(i, lo, hi, bq=bq, bk=bk, groups=groups, window=window)
    acc, m, l = walk_blocks(lo, hi, whole, step, carry, segmented)
    o_ref[...] = (acc / l[:, None]).astype(o_ref.dtype)
    lse_ref[...] = m + jnp.log(l)


def _dq_kernel(qseg_ref, q_ref, do_ref, lse_ref, delta_ref, k_ref, v_ref, kvseg_ref, dq_ref, *, scale, bq, bk,
               groups, tokens, window, segmented):
    i = pl.program_id(2)
    q, do = q_ref[...], do_ref[...]
    lse, delta = lse_ref[...], delta_ref[...]
    t_r = lax.div(i * bq + lax.broadcasted_iota(jnp.int32, (bq,), 0), groups)
    qseg_r = qseg_ref[...] if segmented else None
    lo, hi = key_block_range(i, bq=bq, bk=bk, groups=groups, tokens=tokens, window=window)

    def step(j, dq, masked):
        keys, vals, s = _key_block_scores(q, k_ref, v_ref, kvseg_ref, j, t_r, qseg_r, masked=masked, scale=scale,
                                          bk=bk, window=window, segmented=segmented)
        p = jnp.exp(s - lse[:, None])
        ds = p * (dot_nt(do, vals) - delta[:, None])
        return dq + dot(ds.astype(keys.dtype), keys)

    whole = whole_key_blocks(i, lo, hi, bq=bq, bk=bk, groups=groups, window=window)
    dq = walk_blocks(lo, hi, whole, step, jnp.zeros(q.shape, _F32), segmented)
    dq_ref[...] = (dq * scale).astype(dq_ref.dtype)


def _dkv_kernel(k_ref, v_ref, kvseg_ref, qseg_ref, q_ref, do_ref, lse_ref, delta_ref, dk_ref, dv_ref, *, scale,
                bq, bk, groups, tokens, window, n_row_blocks, segmented):
    j = pl.program_id(2)
    keys, vals = k_ref[...], v_ref[...]
    s_k = j * bk + lax.broadcasted_iota(jnp.int32, (bk,), 0)
    kvseg_k = kvseg_ref[...] if segmented else None
    lo, hi = row_block_range(j, bq=bq, bk=bk, groups=groups, tokens=tokens, window=window,
                             n_row_blocks=n_row_blocks)

    def step(i, carry, masked):
        dk, dv = carry
        rows = pl.ds(i * bq, bq)
        q, do = q_ref[rows, :], do_ref[rows, :]
        s = dot_nt(q, keys) * scale
        if masked:
            t_r = lax.div(i * bq + lax.broadcasted_iota(jnp.int32, (bq,), 0), groups)
            qseg_r = qseg_ref[rows] if segmented else None
            s = jnp.where(_visible(t_r, s_k, qseg_r, kvseg_k, window), s, -jnp.inf)
        p = jnp.exp(s - lse_ref[rows][:, None])
        dv = dv + dot_tn(p.astype(do.dtype), do)
        ds = p * (dot_nt(do, vals) - delta_ref[rows][:, None])
        return dk + dot_tn(ds.astype(q.dtype), q), dv

    zeros = jnp.zeros(keys.shape, _F32)
    whole = whole_row_blocks(j, lo, hi, bq=bq, bk=bk, groups=groups, window=window)
    dk, dv = walk_blocks(lo, hi, whole, step, (zeros, zeros), segmented)
    dk_ref[...] = (dk * scale).astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


def forward(p, *, scale, window, blocks, interpret):
    """p: the padded row-layout operands (flash_attention._Prepared). Returns O [B, K, R, Hp], lse [B, K, R].
    Without segment ids (p.segmented False) the kernels never read them, and mask only the blocks that
    hold an invisible key."""
    B, K, R, Hp = p.q.shape
    Sp = p.k.shape[2]
    bq, bk = blocks.block_q, blocks.block_kv
    kw = dict(scale=scale, bq=bq, bk=bk, groups=p.groups, tokens=p.tokens, window=window, segmented=p.segmented)
    rows = pl.BlockSpec((None, None, bq, Hp), lambda b, k, i: (b, k, i, 0))
    row_vec = pl.BlockSpec((None, None, bq), lambda b, k, i: (b, k, i))
    whole = pl.BlockSpec((None, None, Sp, Hp), lambda b, k, i: (b, k, 0, 0))
    o, lse = pl.pallas_call(
        functools.partial(_forward_kernel, **kw), grid=(B, K, R // bq),
        in_specs=[pl.BlockSpec((None, bq), lambda b, k, i: (b, i)),
                  pl.BlockSpec((None, bq), lambda b, k, i: (k, i)), rows, whole, whole,
                  pl.BlockSpec((None, Sp), lambda b, k, i: (b, 0))],
        out_specs=[rows, row_vec],
        out_shape=[jax.ShapeDtypeStruct(p.q.shape, p.q.dtype), jax.ShapeDtypeStruct((B, K, R), _F32)],
        compiler_params=plgpu.CompilerParams(num_warps=blocks.num_warps, num_stages=blocks.num_stages),
        interpret=interpret, name="flash_attention_forward",
    )(p.qseg, p.sinks, p.q, p.k, p.v, p.kvseg)
    return o, lse


def backward(p, do, lse, delta, *, scale, window, blocks, interpret):
    """dQ [B, K, R, Hp], dK and dV [B, K, Sp, Hp] (input dtypes)."""
    B, K, R, Hp = p.q.shape
    Sp = p.k.shape[2]
    bq, bk = blocks.block_q, blocks.block_kv
    kw = dict(scale=scale, bq=bq, bk=bk, groups=p.groups, tokens=p.tokens, window=window, segmented=p.segmented)
    params = plgpu.CompilerParams(num_warps=blocks.num_warps, num_stages=blocks.num_stages)
    rows = pl.BlockSpec((None, None, bq, Hp), lambda b, k, i: (b, k, i, 0))
    row_vec = pl.BlockSpec((None, None, bq), lambda b, k, i: (b, k, i))
    whole = pl.BlockSpec((None, None, Sp, Hp), lambda b, k, i: (b, k, 0, 0))
    dq = pl.pallas_call(
        functools.partial(_dq_kernel, **kw), grid=(B, K, R // bq),
        in_specs=[pl.BlockSpec((None, bq), lambda b, k, i: (b, i)), rows, rows, row_vec, row_vec, whole, whole,
                  pl.BlockSpec((None, Sp), lambda b, k, i: (b, 0))],
        out_specs=rows, out_shape=jax.ShapeDtypeStruct(p.q.shape, p.q.dtype),
        compiler_params=params, interpret=interpret, name="flash_attention_dq",
    )(p.qseg, p.q, do, lse, delta, p.k, p.v, p.kvseg)

    keys = pl.BlockSpec((None, None, bk, Hp), lambda b, k, j: (b, k, j, 0))
    all_rows = pl.BlockSpec((None, None, R, Hp), lambda b, k, j: (b, k, 0, 0))
    all_vec = pl.BlockSpec((None, None, R), lambda b, k, j: (b, k, 0))
    dk, dv = pl.pallas_call(
        functools.partial(_dkv_kernel, n_row_blocks=R // bq, **kw), grid=(B, K, Sp // bk),
        in_specs=[keys, keys, pl.BlockSpec((None, bk), lambda b, k, j: (b, j)),
                  pl.BlockSpec((None, R), lambda b, k, j: (b, 0)), all_rows, all_rows, all_vec, all_vec],
        out_specs=[keys, keys],
        out_shape=[jax.ShapeDtypeStruct(p.k.shape, p.k.dtype), jax.ShapeDtypeStruct(p.v.shape, p.v.dtype)],
        compiler_params=params, interpret=interpret, name="flash_attention_dkv",
    )(p.k, p.v, p.kvseg, p.qseg, p.q, do, lse, delta)
    return dq, dk, dv
