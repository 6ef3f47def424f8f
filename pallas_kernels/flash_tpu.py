"""Mosaic TPU kernels of dense causal flash attention (see `flash_attention.py` for the row layout).

The key loop is the last grid axis ("arbitrary"), with the online-softmax state in VMEM scratch. Key
blocks outside a row block's visible range [lo, hi) (the future, or left of the window) are skipped: the
index map clamps the block index into the range, so the pipeline re-uses the block already in VMEM (no
DMA), and `pl.when` skips the compute. The dK/dV kernel does the same over row blocks. Per-row vectors
are [.., R, 1] and per-key ones [.., 1, S] so that every block is (8, 128)-legal.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.common import dot, dot_nt, dot_tn
from pallas_kernels.flash_blocks import key_block_range, row_block_range

_F32 = jnp.float32


def _visible(i, j, qseg_r1, kvseg_1k, *, bq, bk, groups, window):
    t_r1 = lax.div(i * bq + lax.broadcasted_iota(jnp.int32, (bq, 1), 0), groups)
    s_1k = j * bk + lax.broadcasted_iota(jnp.int32, (1, bk), 1)
    vis = (s_1k <= t_r1) & (qseg_r1 == kvseg_1k) & (kvseg_1k != 0)
    if window:
        vis &= t_r1 - s_1k < window
    return vis


def _forward_kernel(qseg_ref, sink_ref, q_ref, k_ref, v_ref, kvseg_ref, o_ref, lse_ref, acc_ref, m_ref, l_ref,
                    *, scale, bq, bk, groups, tokens, window):
    i, j = pl.program_id(2), pl.program_id(3)
    lo, hi = key_block_range(i, bq=bq, bk=bk, groups=groups, tokens=tokens, window=window)

    @pl.when(j == 0)
    def _init():
        acc_ref[...] = jnp.zeros(acc_ref.shape, _F32)
        m_ref[...] = sink_ref[...]
        l_ref[...] = jnp.ones(l_ref.shape, _F32)

    @pl.when((j >= lo) & (j < hi))
    def _step():
        vis = _visible(i, j, qseg_ref[...], kvseg_ref[...], bq=bq, bk=bk, groups=groups, window=window)
        s = jnp.where(vis, dot_nt(q_ref[...], k_ref[...]) * scale, -jnp.inf)
        m = m_ref[...]
        m_new = jnp.maximum(m, jnp.max(s, axis=1, keepdims=True))
        alpha = jnp.exp(m - m_new)
        p = jnp.exp(s - m_new)
        acc_ref[...] = acc_ref[...] * alpha + dot(p.astype(v_ref.dtype), v_ref[...])
        l_ref[...] = l_ref[...] * alpha + jnp.sum(p, axis=1, keepdims=True)
        m_ref[...] = m_new

    @pl.when(j == pl.num_programs(3) - 1)
    def _finish():
        o_ref[...] = (acc_ref[...] / l_ref[...]).astype(o_ref.dtype)
        lse_ref[...] = m_ref[...] + jnp.log(l_ref[...])


def _dq_kernel(qseg_ref, q_ref, do_ref, lse_ref, delta_ref, k_ref, v_ref, kvseg_ref, dq_ref, acc_ref, *, scale,
               bq, bk, groups, tokens, window):
    i, j = pl.program_id(2), pl.program_id(3)
    lo, hi = key_block_range(i, bq=bq, bk=bk, groups=groups, tokens=tokens, window=window)

    @pl.when(j == 0)
    def _init():
        acc_ref[...] = jnp.zeros(acc_ref.shape, _F32)

    @pl.when((j >= lo) & (j < hi))
    def _step():
        vis = _visible(i, j, qseg_ref[...], kvseg_ref[...], bq=bq, bk=bk, groups=groups, window=window)
        keys = k_ref[...]
        s = jnp.where(vis, dot_nt(q_ref[...], keys) * scale, -jnp.inf)
        p = jnp.exp(s - lse_ref[...])
        ds = p * (dot_nt(do_ref[...], v_ref[...]) - delta_ref[...])
        acc_ref[...] += dot(ds.astype(keys.dtype), keys)

    @pl.when(j == pl.num_programs(3) - 1)
    def _finish():
        dq_ref[...] = (acc_ref[...] * scale).astype(dq_ref.dtype)


def _dkv_kernel(k_ref, v_ref, kvseg_ref, qseg_ref, q_ref, do_ref, lse_ref, delta_ref, dk_ref, dv_ref, dk_acc,
                dv_acc, *, scale, bq, bk, groups, tokens, window, n_row_blocks):
    j, i = pl.program_id(2), pl.program_id(3)
    lo, hi = row_block_range(j, bq=bq, bk=bk, groups=groups, tokens=tokens, window=window,
                             n_row_blocks=n_row_blocks)

    @pl.when(i == 0)
    def _init():
        dk_acc[...] = jnp.zeros(dk_acc.shape, _F32)
        dv_acc[...] = jnp.zeros(dv_acc.shape, _F32)

    @pl.when((i >= lo) & (i < hi))
    def _step():
        vis = _visible(i, j, qseg_ref[...], kvseg_ref[...], bq=bq, bk=bk, groups=groups, window=window)
        q, do = q_ref[...], do_ref[...]
        s = jnp.where(vis, dot_nt(q, k_ref[...]) * scale, -jnp.inf)
        p = jnp.exp(s - lse_ref[...])
        dv_acc[...] += dot_tn(p.astype(do.dtype), do)
        ds = p * (dot_nt(do, v_ref[...]) - delta_ref[...])
        dk_acc[...] += dot_tn(ds.astype(q.dtype), q)

    @pl.when(i == pl.num_programs(3) - 1)
    def _finish():
        dk_ref[...] = (dk_acc[...] * scale).astype(dk_ref.dtype)
        dv_ref[...] = dv_acc[...].astype(dv_ref.dtype)


def _layouts(p):
    return p.qseg[..., None], p.kvseg[:, None, :], p.sinks[..., None]


def forward(p, *, scale, window, blocks, interpret):
    B, K, R, Hp = p.q.shape
    Sp = p.k.shape[2]
    bq, bk = blocks.block_q, blocks.block_kv
    kw = dict(scale=scale, bq=bq, bk=bk, groups=p.groups, tokens=p.tokens, window=window)
    qseg, kvseg, sinks = _layouts(p)

    def kv_block(b, k, i, j):
        lo, hi = key_block_range(i, bq=bq, bk=bk, groups=p.groups, tokens=p.tokens, window=window)
        return jnp.clip(j, lo, jnp.maximum(hi - 1, lo))

    rows = pl.BlockSpec((None, None, bq, Hp), lambda b, k, i, j: (b, k, i, 0))
    row_vec = pl.BlockSpec((None, None, bq, 1), lambda b, k, i, j: (b, k, i, 0))
    keys = pl.BlockSpec((None, None, bk, Hp), lambda b, k, i, j: (b, k, kv_block(b, k, i, j), 0))
    o, lse = pl.pallas_call(
        functools.partial(_forward_kernel, **kw), grid=(B, K, R // bq, Sp // bk),
        in_specs=[pl.BlockSpec((None, bq, 1), lambda b, k, i, j: (b, i, 0)),
                  pl.BlockSpec((None, bq, 1), lambda b, k, i, j: (k, i, 0)), rows, keys, keys,
                  pl.BlockSpec((None, 1, bk), lambda b, k, i, j: (b, 0, kv_block(b, k, i, j)))],
        out_specs=[rows, row_vec],
        out_shape=[jax.ShapeDtypeStruct(p.q.shape, p.q.dtype), jax.ShapeDtypeStruct((B, K, R, 1), _F32)],
        scratch_shapes=[pltpu.VMEM((bq, Hp), _F32), pltpu.VMEM((bq, 1), _F32), pltpu.VMEM((bq, 1), _F32)],
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", "parallel", "arbitrary")),
        interpret=interpret, name="flash_attention_forward",
    )(qseg, sinks, p.q, p.k, p.v, kvseg)
    return o, lse[..., 0]


def backward(p, do, lse, delta, *, scale, window, blocks, interpret):
    B, K, R, Hp = p.q.shape
    Sp = p.k.shape[2]
    bq, bk = blocks.block_q, blocks.block_kv
    n_rb = R // bq
    kw = dict(scale=scale, bq=bq, bk=bk, groups=p.groups, tokens=p.tokens, window=window)
    qseg, kvseg, _ = _layouts(p)
    lse, delta = lse[..., None], delta[..., None]
    semantics = pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "parallel", "arbitrary"))

    def kv_block(i, j):
        lo, hi = key_block_range(i, bq=bq, bk=bk, groups=p.groups, tokens=p.tokens, window=window)
        return jnp.clip(j, lo, jnp.maximum(hi - 1, lo))

    rows = pl.BlockSpec((None, None, bq, Hp), lambda b, k, i, j: (b, k, i, 0))
    row_vec = pl.BlockSpec((None, None, bq, 1), lambda b, k, i, j: (b, k, i, 0))
    keys = pl.BlockSpec((None, None, bk, Hp), lambda b, k, i, j: (b, k, kv_block(i, j), 0))
    dq = pl.pallas_call(
        functools.partial(_dq_kernel, **kw), grid=(B, K, n_rb, Sp // bk),
        in_specs=[pl.BlockSpec((None, bq, 1), lambda b, k, i, j: (b, i, 0)), rows, rows, row_vec, row_vec,
                  keys, keys, pl.BlockSpec((None, 1, bk), lambda b, k, i, j: (b, 0, kv_block(i, j)))],
        out_specs=rows, out_shape=jax.ShapeDtypeStruct(p.q.shape, p.q.dtype),
        scratch_shapes=[pltpu.VMEM((bq, Hp), _F32)], compiler_params=semantics,
        interpret=interpret, name="flash_attention_dq",
    )(qseg, p.q, do, lse, delta, p.k, p.v, kvseg)

    def row_block(j, i):
        lo, hi = row_block_range(j, bq=bq, bk=bk, groups=p.groups, tokens=p.tokens, window=window,
                                 n_row_blocks=n_rb)
        return jnp.clip(i, lo, jnp.maximum(hi - 1, lo))

    keys_j = pl.BlockSpec((None, None, bk, Hp), lambda b, k, j, i: (b, k, j, 0))
    rows_i = pl.BlockSpec((None, None, bq, Hp), lambda b, k, j, i: (b, k, row_block(j, i), 0))
    vec_i = pl.BlockSpec((None, None, bq, 1), lambda b, k, j, i: (b, k, row_block(j, i), 0))
    dk, dv = pl.pallas_call(
        functools.partial(_dkv_kernel, n_row_blocks=n_rb, **kw), grid=(B, K, Sp // bk, n_rb),
        in_specs=[keys_j, keys_j, pl.BlockSpec((None, 1, bk), lambda b, k, j, i: (b, 0, j)),
                  pl.BlockSpec((None, bq, 1), lambda b, k, j, i: (b, row_block(j, i), 0)),
                  rows_i, rows_i, vec_i, vec_i],
        out_specs=[keys_j, keys_j],
        out_shape=[jax.ShapeDtypeStruct(p.k.shape, p.k.dtype), jax.ShapeDtypeStruct(p.v.shape, p.v.dtype)],
        scratch_shapes=[pltpu.VMEM((bk, Hp), _F32), pltpu.VMEM((bk, Hp), _F32)], compiler_params=semantics,
        interpret=interpret, name="flash_attention_dkv",
    )(p.k, p.v, kvseg, qseg, p.q, do, lse, delta)
    return dq, dk, dv
