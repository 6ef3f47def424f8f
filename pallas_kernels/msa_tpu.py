"""Mosaic TPU lowering of Memory Sparse Attention (`msa.py`).

The reduction axis of every kernel is the last grid axis ("arbitrary"), its running state in VMEM scratch:

  _route_kernel    grid (batch, chunk block, token block): per tile [bt, H] x [H, bc] dots of the query sets
                   of `msa_gpu.route_queries` (heads for max, group-mean queries for mean), reduced over
                   sets and tokens into the running (max, arg-max token, arg-max head) of the chunk block
                   (the tile math is `msa_gpu.route_tile`'s). Token blocks past the row's valid
                   length are skipped and their index clamped onto the last valid block (no DMA).
  _forward_kernel  grid (batch, kv head, row block, key step): steps [0, n_mem) are memory blocks, the rest
                   own key blocks; blocks that are not visible (past the count, the future, left of the
                   window) are skipped with their index clamped into the visible range, so nothing is fetched.
  _dq_kernel       the same walk: dQ.
  _dkv_kernel      grid (batch, kv head, key block, row block) for the memory or the own keys: dK, dV.

Per-row vectors are [.., R, 1] so that every block is (8, 128)-legal. Shapes: B batch, T tokens, N query
heads, K kv heads, G = N // K, H head dim, C chunks (padded to Cp), S own keys (padded to Sp), R rows.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.common import F32, cdiv, dot, dot_nt, dot_tn, pad_axis, round_up, tpu_precision
from pallas_kernels.flash_blocks import key_block_range, row_block_range
from pallas_kernels.msa_gpu import merge_best, own_visible, route_queries, route_tile

_ARBITRARY_LAST = pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "parallel", "arbitrary"))


# ---------------------------------------------------------------------------------------------- routing
def _route_kernel(valid_ref, q_ref, k_ref, score_ref, argt_ref, argn_ref, best_acc, argt_acc, argn_acc, *, bt,
                  heads_of_kv, reduce_max):
    b, tb = pl.program_id(0), pl.program_id(2)
    valid = valid_ref[b]

    @pl.when(tb == 0)
    def _init():
        best_acc[...] = jnp.full(best_acc.shape, -jnp.inf, F32)
        argt_acc[...] = jnp.zeros(argt_acc.shape, jnp.int32)
        argn_acc[...] = jnp.zeros(argn_acc.shape, jnp.int32)

    @pl.when(tb * bt < valid)
    def _step():
        precision = tpu_precision(q_ref.dtype)
        t_t1 = tb * bt + lax.broadcasted_iota(jnp.int32, (bt, 1), 0)
        block = route_tile(lambda x: q_ref[x], lambda kv: k_ref[kv], t_t1, valid, heads_of_kv=heads_of_kv,
                           reduce_max=reduce_max, dot_nt=functools.partial(dot_nt, precision=precision))
        best, arg_t, arg_n = merge_best((best_acc[...], argt_acc[...], argn_acc[...]), block)
        best_acc[...], argt_acc[...], argn_acc[...] = best, arg_t, arg_n

    @pl.when(tb == pl.num_programs(2) - 1)
    def _finish():
        score_ref[...], argt_ref[...], argn_ref[...] = best_acc[...], argt_acc[...], argn_acc[...]


def route_forward(q_BTNH, k_CKH, valid_B, *, mean: bool, blocks, interpret):
    """(scores f32 [B, C], arg-max token int32 [B, C], arg-max head int32 [B, C] (meaningless for mean))."""
    B, T, N, H = q_BTNH.shape
    C, K, _ = k_CKH.shape
    bt, bc = blocks.block_t, blocks.block_c
    Tp, Cp = round_up(T, bt), round_up(C, bc)
    q_BXTH, heads_of_kv = route_queries(q_BTNH, K, mean)
    q = pad_axis(q_BXTH, 2, Tp)                              # [B, X, Tp, H]
    k = pad_axis(k_CKH.transpose(1, 0, 2), 1, Cp)            # [K, Cp, H]

    def token_block(b, cb, tb, valid_ref):
        return jnp.minimum(tb, jnp.maximum(cdiv(valid_ref[b], bt) - 1, 0))

    out = pl.BlockSpec((None, 1, bc), lambda b, cb, tb, valid_ref: (b, 0, cb))
    scores, arg_t, arg_n = pl.pallas_call(
        functools.partial(_route_kernel, bt=bt, heads_of_kv=heads_of_kv, reduce_max=not mean),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=1, grid=(B, Cp // bc, Tp // bt),
            in_specs=[pl.BlockSpec((None, q.shape[1], bt, H), lambda b, cb, tb, v: (b, 0, token_block(b, cb, tb, v), 0)),
                      pl.BlockSpec((K, bc, H), lambda b, cb, tb, v: (0, cb, 0))],
            out_specs=[out, out, out],
            scratch_shapes=[pltpu.VMEM((1, bc), F32), pltpu.VMEM((1, bc), jnp.int32),
                            pltpu.VMEM((1, bc), jnp.int32)]),
        out_shape=[jax.ShapeDtypeStruct((B, 1, Cp), F32), jax.ShapeDtypeStruct((B, 1, Cp), jnp.int32),
                   jax.ShapeDtypeStruct((B, 1, Cp), jnp.int32)],
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary")),
        interpret=interpret, name="msa_chunk_scores",
    )(valid_B, q, k)
    return scores[:, 0, :C], arg_t[:, 0, :C], arg_n[:, 0, :C]


# -------------------------------------------------------------------------------------------- attention
class _Walk:
    """The forward / dQ key steps of row block i: memory blocks [0, n_mem) then own blocks; the visible
    ranges and the clamped block indices (an invisible step re-uses the block already in VMEM)."""

    def __init__(self, p, blocks, window):
        self.bq, self.bk, self.window = blocks.block_q, blocks.block_kv, window
        self.groups, self.tokens = p.groups, p.tokens
        self.n_mem = p.mem_k.shape[2] // self.bk
        self.n_steps = self.n_mem + p.k.shape[2] // self.bk

    def mem_blocks(self, count):
        return cdiv(count, self.bk)

    def own_range(self, i):
        return key_block_range(i, bq=self.bq, bk=self.bk, groups=self.groups, tokens=self.tokens,
                               window=self.window)

    def mem_index(self, j, count):
        return jnp.minimum(j, jnp.maximum(self.mem_blocks(count) - 1, 0))

    def own_index(self, i, j):
        lo, hi = self.own_range(i)
        return jnp.clip(j - self.n_mem, lo, jnp.maximum(hi - 1, lo))

    def visit(self, i, j, count, q, mk_ref, mv_ref, k_ref, v_ref, body):
        """body(keys, values, visible [bq, bk]) on a visible memory or own step."""
        bq, bk = self.bq, self.bk
        s_1k = lax.broadcasted_iota(jnp.int32, (1, bk), 1)

        @pl.when(j < self.mem_blocks(count))
        def _memory():
            body(mk_ref[...], mv_ref[...], jnp.broadcast_to(j * bk + s_1k < count, (bq, bk)))

        lo, hi = self.own_range(i)
        jo = j - self.n_mem

        @pl.when((jo >= lo) & (jo < hi))
        def _own():
            t_r1 = lax.div(i * bq + lax.broadcasted_iota(jnp.int32, (bq, 1), 0), self.groups)
            body(k_ref[...], v_ref[...], own_visible(t_r1, jo * bk + s_1k, self.window))


def _forward_kernel(count_ref, sink_ref, q_ref, mk_ref, mv_ref, k_ref, v_ref, o_ref, lse_ref, acc_ref, m_ref,
                    l_ref, *, walk: _Walk, scale):
    b, i, j = pl.program_id(0), pl.program_id(2), pl.program_id(3)
    q = q_ref[...]
    precision = tpu_precision(q.dtype)

    @pl.when(j == 0)
    def _init():
        acc_ref[...] = jnp.zeros(acc_ref.shape, F32)
        m_ref[...] = sink_ref[...]
        l_ref[...] = jnp.ones(l_ref.shape, F32)

    def online_softmax(keys, vals, vis):
        s = jnp.where(vis, dot_nt(q, keys, precision) * scale, -jnp.inf)
        m = m_ref[...]
        m_new = jnp.maximum(m, jnp.max(s, axis=1, keepdims=True))
        alpha = jnp.exp(m - m_new)
        p = jnp.exp(s - m_new)
        acc_ref[...] = acc_ref[...] * alpha + dot(p.astype(vals.dtype), vals, precision)
        l_ref[...] = l_ref[...] * alpha + jnp.sum(p, axis=1, keepdims=True)
        m_ref[...] = m_new

    walk.visit(i, j, count_ref[b], q, mk_ref, mv_ref, k_ref, v_ref, online_softmax)

    @pl.when(j == pl.num_programs(3) - 1)
    def _finish():
        o_ref[...] = (acc_ref[...] / l_ref[...]).astype(o_ref.dtype)
        lse_ref[...] = m_ref[...] + jnp.log(l_ref[...])


def _dq_kernel(count_ref, q_ref, do_ref, lse_ref, delta_ref, mk_ref, mv_ref, k_ref, v_ref, dq_ref, acc_ref, *,
               walk: _Walk, scale):
    b, i, j = pl.program_id(0), pl.program_id(2), pl.program_id(3)
    q, do = q_ref[...], do_ref[...]
    precision = tpu_precision(q.dtype)

    @pl.when(j == 0)
    def _init():
        acc_ref[...] = jnp.zeros(acc_ref.shape, F32)

    def accumulate(keys, vals, vis):
        s = jnp.where(vis, dot_nt(q, keys, precision) * scale, -jnp.inf)
        p = jnp.exp(s - lse_ref[...])
        ds = p * (dot_nt(do, vals, precision) - delta_ref[...])
        acc_ref[...] += dot(ds.astype(keys.dtype), keys, precision)

    walk.visit(i, j, count_ref[b], q, mk_ref, mv_ref, k_ref, v_ref, accumulate)

    @pl.when(j == pl.num_programs(3) - 1)
    def _finish():
        dq_ref[...] = (acc_ref[...] * scale).astype(dq_ref.dtype)


def _row_range(j, count, *, memory, bq, bk, groups, tokens, window, n_row_blocks):
    """[lo, hi) row blocks that see key block j (memory: all rows, if the block holds a visible entry)."""
    if memory:
        return 0, jnp.where(j * bk < count, n_row_blocks, 0)
    return row_block_range(j, bq=bq, bk=bk, groups=groups, tokens=tokens, window=window, n_row_blocks=n_row_blocks)


def _dkv_kernel(count_ref, k_ref, v_ref, q_ref, do_ref, lse_ref, delta_ref, dk_ref, dv_ref, dk_acc, dv_acc, *,
                memory: bool, scale, bq, bk, groups, tokens, window, n_row_blocks):
    b, j, i = pl.program_id(0), pl.program_id(2), pl.program_id(3)
    count = count_ref[b]
    lo, hi = _row_range(j, count, memory=memory, bq=bq, bk=bk, groups=groups, tokens=tokens, window=window,
                        n_row_blocks=n_row_blocks)

    @pl.when(i == 0)
    def _init():
        dk_acc[...] = jnp.zeros(dk_acc.shape, F32)
        dv_acc[...] = jnp.zeros(dv_acc.shape, F32)

    @pl.when((i >= lo) & (i < hi))
    def _step():
        q, do, keys, vals = q_ref[...], do_ref[...], k_ref[...], v_ref[...]
        precision = tpu_precision(q.dtype)
        s_1k = j * bk + lax.broadcasted_iota(jnp.int32, (1, bk), 1)
        if memory:
            vis = jnp.broadcast_to(s_1k < count, (bq, bk))
        else:
            vis = own_visible(lax.div(i * bq + lax.broadcasted_iota(jnp.int32, (bq, 1), 0), groups), s_1k, window)
        s = jnp.where(vis, dot_nt(q, keys, precision) * scale, -jnp.inf)
        p = jnp.exp(s - lse_ref[...])
        dv_acc[...] += dot_tn(p.astype(do.dtype), do, precision)
        ds = p * (dot_nt(do, vals, precision) - delta_ref[...])
        dk_acc[...] += dot_tn(ds.astype(q.dtype), q, precision)

    @pl.when(i == pl.num_programs(3) - 1)
    def _finish():
        dk_ref[...] = (dk_acc[...] * scale).astype(dk_ref.dtype)
        dv_ref[...] = dv_acc[...].astype(dv_ref.dtype)


def _key_walk_specs(p, walk: _Walk):
    """Row, per-row vector, memory key and own key BlockSpecs of the grid (B, K, row block, key step)."""
    Hp, bq, bk = p.q.shape[3], walk.bq, walk.bk
    rows = pl.BlockSpec((None, None, bq, Hp), lambda b, k, i, j, c: (b, k, i, 0))
    row_vec = pl.BlockSpec((None, None, bq, 1), lambda b, k, i, j, c: (b, k, i, 0))
    mem = pl.BlockSpec((None, None, bk, Hp), lambda b, k, i, j, c: (b, k, walk.mem_index(j, c[b]), 0))
    own = pl.BlockSpec((None, None, bk, Hp), lambda b, k, i, j, c: (b, k, walk.own_index(i, j), 0))
    return rows, row_vec, [mem, mem, own, own]


def attention_forward(p, *, scale, window, blocks, interpret):
    """p: msa.Prepared. Returns O [B, K, R, Hp] and the log-sum-exp [B, K, R] (float32, sink included)."""
    B, K, R, Hp = p.q.shape
    walk = _Walk(p, blocks, window)
    rows, row_vec, keys = _key_walk_specs(p, walk)
    o, lse = pl.pallas_call(
        functools.partial(_forward_kernel, walk=walk, scale=scale),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=1, grid=(B, K, R // walk.bq, walk.n_steps),
            in_specs=[pl.BlockSpec((None, walk.bq, 1), lambda b, k, i, j, c: (k, i, 0)), rows, *keys],
            out_specs=[rows, row_vec],
            scratch_shapes=[pltpu.VMEM((walk.bq, Hp), F32), pltpu.VMEM((walk.bq, 1), F32),
                            pltpu.VMEM((walk.bq, 1), F32)]),
        out_shape=[jax.ShapeDtypeStruct(p.q.shape, p.q.dtype), jax.ShapeDtypeStruct((B, K, R, 1), F32)],
        compiler_params=_ARBITRARY_LAST, interpret=interpret, name="msa_attention_forward",
    )(p.count, p.sinks[..., None], p.q, p.mem_k, p.mem_v, p.k, p.v)
    return o, lse[..., 0]


def attention_backward(p, do, lse, delta, *, scale, window, blocks, interpret):
    """dQ [B, K, R, Hp]; dK, dV [B, K, Sp, Hp]; dK, dV of the memory [B, K, Cp, Hp] (input dtypes)."""
    B, K, R, Hp = p.q.shape
    walk = _Walk(p, blocks, window)
    bq, bk = walk.bq, walk.bk
    lse, delta = lse[..., None], delta[..., None]
    rows, row_vec, keys = _key_walk_specs(p, walk)
    dq = pl.pallas_call(
        functools.partial(_dq_kernel, walk=walk, scale=scale),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=1, grid=(B, K, R // bq, walk.n_steps),
            in_specs=[rows, rows, row_vec, row_vec, *keys], out_specs=rows,
            scratch_shapes=[pltpu.VMEM((bq, Hp), F32)]),
        out_shape=jax.ShapeDtypeStruct(p.q.shape, p.q.dtype),
        compiler_params=_ARBITRARY_LAST, interpret=interpret, name="msa_attention_dq",
    )(p.count, p.q, do, lse, delta, p.mem_k, p.mem_v, p.k, p.v)

    n_rb = R // bq
    kw = dict(bq=bq, bk=bk, groups=p.groups, tokens=p.tokens, window=window, n_row_blocks=n_rb)

    def key_major(k, v, memory: bool):
        def row_block(b, j, i, c):
            lo, hi = _row_range(j, c[b], memory=memory, **kw)
            return jnp.clip(i, lo, jnp.maximum(hi - 1, lo))

        key_block = pl.BlockSpec((None, None, bk, Hp), lambda b, h, j, i, c: (b, h, j, 0))
        rows_i = pl.BlockSpec((None, None, bq, Hp), lambda b, h, j, i, c: (b, h, row_block(b, j, i, c), 0))
        vec_i = pl.BlockSpec((None, None, bq, 1), lambda b, h, j, i, c: (b, h, row_block(b, j, i, c), 0))
        return pl.pallas_call(
            functools.partial(_dkv_kernel, memory=memory, scale=scale, **kw),
            grid_spec=pltpu.PrefetchScalarGridSpec(
                num_scalar_prefetch=1, grid=(B, K, k.shape[2] // bk, n_rb),
                in_specs=[key_block, key_block, rows_i, rows_i, vec_i, vec_i], out_specs=[key_block, key_block],
                scratch_shapes=[pltpu.VMEM((bk, Hp), F32), pltpu.VMEM((bk, Hp), F32)]),
            out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
            compiler_params=_ARBITRARY_LAST, interpret=interpret,
            name="msa_attention_dkv_memory" if memory else "msa_attention_dkv",
        )(p.count, k, v, p.q, do, lse, delta)

    dk, dv = key_major(p.k, p.v, memory=False)
    dmem_k, dmem_v = key_major(p.mem_k, p.mem_v, memory=True)
    return dq, dk, dv, dmem_k, dmem_v
