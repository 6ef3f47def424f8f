"""Triton (Pallas GPU) lowering of Memory Sparse Attention (`msa.py`).

  _route_kernel    one program per (block of bank chunks, batch row): walks the row's valid query tokens in
                   blocks, [bt, H] x [H, bc] dots of query sets against their kv head's chunk keys (per head
                   for max; per kv head with the group-mean query for mean, `route_queries`), reduced over
                   the sets (sum or max) and then over the block's tokens into a running max; keeps the
                   arg-max token (and head). The chunk keys are read from HBM once per row.
  _forward_kernel  one program per (batch, kv head, row block): online softmax over the visible memory
                   blocks, then over the own key blocks the row block can see (causal, window), seeded
                   with the sink logit (m = sink, l = 1); writes O and the log-sum-exp.
  _dq_kernel       the same walk recomputing P: dQ.
  _dkv_kernel      one program per (batch, kv head, key block) of the memory or the own keys, walking the
                   row blocks that see it: dK and dV (the G heads of a kv head summed in the matmuls). Every
                   row sees a memory block, so when memory blocks are few their rows are split over
                   programs (float32 partial sums added after) to keep the GPU busy.

Rows are (token, group head) pairs, token major (row r is token r // G); tiles are padded to powers of two.
Shapes: B batch, T tokens, N query heads, K kv heads, G = N // K, H head dim (padded to Hp), C chunks
(padded to Cp), S own keys (padded to Sp), R rows. Tiles: t tokens, c chunks, r rows, k keys.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.common import F32, cdiv, dot, dot_nt, dot_tn, next_pow2, pad_axis, round_up
from pallas_kernels.flash_blocks import key_block_range, row_block_range

_BIG = 2 ** 30
_BUSY_PROGRAMS = 512     # the memory dK/dV kernel splits its rows until about this many programs run


# ---------------------------------------------------------------------------------------------- routing
def route_queries(q_BTNH, kv_heads: int, mean: bool):
    """The routing kernels' query sets [B, X, T, H] and which sets meet each kv head's keys.

    max: the N heads themselves (set n meets kv head n // G). mean: (1/N) sum_n q[n] . k[n // G] equals
    sum_kv qbar[kv] . k[kv] with qbar[kv] = (1/N) sum_g q[kv, g], G times fewer dots; qbar is formed in
    float32 and, for 16-bit inputs, kept as a 16-bit high part and a 16-bit remainder (two dots, sets kv
    and K + kv), so the scores keep float32 accuracy on the 16-bit tensor cores."""
    B, T, N, H = q_BTNH.shape
    G = N // kv_heads
    if not mean:
        return q_BTNH.transpose(0, 2, 1, 3), tuple(tuple(range(kv * G, (kv + 1) * G)) for kv in range(kv_heads))
    qbar_BTKH = q_BTNH.astype(F32).reshape(B, T, kv_heads, G, H).sum(axis=3) / N
    if q_BTNH.dtype == F32:
        return qbar_BTKH.transpose(0, 2, 1, 3), tuple((kv,) for kv in range(kv_heads))
    high = qbar_BTKH.astype(q_BTNH.dtype)
    low = (qbar_BTKH - high.astype(F32)).astype(q_BTNH.dtype)
    parts_BXTH = jnp.concatenate([high, low], axis=2).transpose(0, 2, 1, 3)
    return parts_BXTH, tuple((kv, kv_heads + kv) for kv in range(kv_heads))


def route_tile(q_at, keys_at, t_t1, valid, *, heads_of_kv, reduce_max: bool, dot_nt=dot_nt):
    """One token block against one chunk block: the block's best score, its token and its query set (the
    head, for max), each [1, c]. q_at(x) -> [t, Hp] queries of set x; keys_at(kv) -> [c, Hp] chunk keys of
    kv head kv; heads_of_kv[kv]: the sets that meet kv head kv, summed or maxed over (`route_queries`);
    t_t1 [t, 1] the block's token positions; valid the row's number of query tokens."""
    red_tc = arg_x_tc = None
    for kv, sets in enumerate(heads_of_kv):
        keys_ch = keys_at(kv)
        for x in sets:
            z_tc = dot_nt(q_at(x), keys_ch)
            if red_tc is None:
                red_tc, arg_x_tc = z_tc, jnp.full(z_tc.shape, x, jnp.int32)
            elif not reduce_max:
                red_tc = red_tc + z_tc
            else:
                take = z_tc > red_tc            # strict: the lowest head wins a tie
                arg_x_tc = jnp.where(take, x, arg_x_tc)
                red_tc = jnp.where(take, z_tc, red_tc)
    red_tc = jnp.where(t_t1 < valid, red_tc, -jnp.inf)
    best_1c = jnp.max(red_tc, axis=0, keepdims=True)
    arg_t_1c = jnp.min(jnp.where(red_tc == best_1c, t_t1, _BIG), axis=0, keepdims=True)
    arg_x_1c = jnp.sum(jnp.where(t_t1 == arg_t_1c, arg_x_tc, 0), axis=0, keepdims=True)
    return best_1c, arg_t_1c, arg_x_1c


def merge_best(carry, block):
    """Running (max, arg-max token, head): a later block replaces only a strictly better score."""
    best, arg_t, arg_n = carry
    new_best, new_t, new_n = block
    take = new_best > best
    return jnp.where(take, new_best, best), jnp.where(take, new_t, arg_t), jnp.where(take, new_n, arg_n)


def _route_kernel(valid_ref, q_ref, k_ref, score_ref, argt_ref, argn_ref, *, bt, bc, heads_of_kv, reduce_max):
    valid = valid_ref[pl.program_id(1)]

    def step(i, carry):
        t_t1 = (i * bt + lax.broadcasted_iota(jnp.int32, (bt,), 0))[:, None]
        block = route_tile(lambda x: q_ref[x, pl.ds(i * bt, bt), :], lambda kv: k_ref[kv, :, :], t_t1, valid,
                           heads_of_kv=heads_of_kv, reduce_max=reduce_max)
        return merge_best(carry, block)

    init = (jnp.full((1, bc), -jnp.inf, F32), jnp.zeros((1, bc), jnp.int32), jnp.zeros((1, bc), jnp.int32))
    best, arg_t, arg_n = lax.fori_loop(0, cdiv(valid, bt), step, init)
    score_ref[...], argt_ref[...], argn_ref[...] = best, arg_t, arg_n


def route_forward(q_BTNH, k_CKH, valid_B, *, mean: bool, blocks, interpret):
    """(scores f32 [B, C], arg-max token int32 [B, C], arg-max head int32 [B, C] (meaningless for mean))."""
    B, T, N, H = q_BTNH.shape
    C, K, _ = k_CKH.shape
    bt, bc, Hp = max(16, blocks.block_t), max(16, blocks.block_c), max(16, next_pow2(H))
    Tp, Cp = round_up(T, bt), round_up(C, bc)
    q_BXTH, heads_of_kv = route_queries(q_BTNH, K, mean)
    q = pad_axis(pad_axis(q_BXTH, 2, Tp), 3, Hp)                           # [B, X, Tp, Hp]
    k = pad_axis(pad_axis(k_CKH.transpose(1, 0, 2), 1, Cp), 2, Hp)         # [K, Cp, Hp]
    out = pl.BlockSpec((None, 1, bc), lambda c, b: (b, 0, c))
    scores, arg_t, arg_n = pl.pallas_call(
        functools.partial(_route_kernel, bt=bt, bc=bc, heads_of_kv=heads_of_kv, reduce_max=not mean),
        grid=(Cp // bc, B),
        in_specs=[pl.BlockSpec((B,), lambda c, b: (0,)),
                  pl.BlockSpec((None, q.shape[1], Tp, Hp), lambda c, b: (b, 0, 0, 0)),
                  pl.BlockSpec((K, bc, Hp), lambda c, b: (0, c, 0))],
        out_specs=[out, out, out],
        out_shape=[jax.ShapeDtypeStruct((B, 1, Cp), F32), jax.ShapeDtypeStruct((B, 1, Cp), jnp.int32),
                   jax.ShapeDtypeStruct((B, 1, Cp), jnp.int32)],
        compiler_params=plgpu.CompilerParams(num_warps=blocks.num_warps, num_stages=blocks.num_stages),
        interpret=interpret, name="msa_chunk_scores",
    )(valid_B, q, k)
    return scores[:, 0, :C], arg_t[:, 0, :C], arg_n[:, 0, :C]


# -------------------------------------------------------------------------------------------- attention
def own_visible(t_r1, s_1k, window: int):
    """[r, k]: own key s visible to the row's token t (s <= t, t - s < window); t_r1 [r, 1], s_1k [1, k]."""
    vis = s_1k <= t_r1
    if window:
        vis &= t_r1 - s_1k < window
    return vis


def _rows_of(i, bq, groups):
    return lax.div(i * bq + lax.broadcasted_iota(jnp.int32, (bq,), 0), groups)


def _walk_keys(count, t_r, i, mk_ref, mv_ref, k_ref, v_ref, body, carry, *, bq, bk, groups, tokens, window):
    """body(carry, keys, values, visible) over the visible memory blocks, then the own blocks row block i
    can see."""
    def mem_step(j, carry):
        s_k = j * bk + lax.broadcasted_iota(jnp.int32, (bk,), 0)
        blk = pl.ds(j * bk, bk)
        return body(carry, mk_ref[blk, :], mv_ref[blk, :], (s_k < count)[None, :])

    def own_step(j, carry):
        s_k = j * bk + lax.broadcasted_iota(jnp.int32, (bk,), 0)
        blk = pl.ds(j * bk, bk)
        return body(carry, k_ref[blk, :], v_ref[blk, :], own_visible(t_r[:, None], s_k[None, :], window))

    carry = lax.fori_loop(0, cdiv(count, bk), mem_step, carry)
    lo, hi = key_block_range(i, bq=bq, bk=bk, groups=groups, tokens=tokens, window=window)
    return lax.fori_loop(lo, hi, own_step, carry)


def _forward_kernel(count_ref, sink_ref, q_ref, mk_ref, mv_ref, k_ref, v_ref, o_ref, lse_ref, *, scale, bq, bk,
                    groups, tokens, window):
    i = pl.program_id(2)
    q = q_ref[...]

    def online_softmax(carry, keys, vals, vis):
        acc, m, l = carry
        s = jnp.where(vis, dot_nt(q, keys) * scale, -jnp.inf)
        m_new = jnp.maximum(m, jnp.max(s, axis=1))
        alpha = jnp.exp(m - m_new)
        p = jnp.exp(s - m_new[:, None])
        acc = acc * alpha[:, None] + dot(p.astype(vals.dtype), vals)
        return acc, m_new, l * alpha + jnp.sum(p, axis=1)

    carry = (jnp.zeros(q.shape, F32), sink_ref[...], jnp.ones((bq,), F32))
    acc, m, l = _walk_keys(count_ref[pl.program_id(0)], _rows_of(i, bq, groups), i, mk_ref, mv_ref, k_ref, v_ref,
                           online_softmax, carry, bq=bq, bk=bk, groups=groups, tokens=tokens, window=window)
    o_ref[...] = (acc / l[:, None]).astype(o_ref.dtype)
    lse_ref[...] = m + jnp.log(l)


def _dq_kernel(count_ref, q_ref, do_ref, lse_ref, delta_ref, mk_ref, mv_ref, k_ref, v_ref, dq_ref, *, scale, bq,
               bk, groups, tokens, window):
    i = pl.program_id(2)
    q, do = q_ref[...], do_ref[...]
    lse, delta = lse_ref[...], delta_ref[...]

    def accumulate(dq, keys, vals, vis):
        s = jnp.where(vis, dot_nt(q, keys) * scale, -jnp.inf)
        p = jnp.exp(s - lse[:, None])
        ds = p * (dot_nt(do, vals) - delta[:, None])
        return dq + dot(ds.astype(keys.dtype), keys)

    dq = _walk_keys(count_ref[pl.program_id(0)], _rows_of(i, bq, groups), i, mk_ref, mv_ref, k_ref, v_ref,
                    accumulate, jnp.zeros(q.shape, F32), bq=bq, bk=bk, groups=groups, tokens=tokens, window=window)
    dq_ref[...] = (dq * scale).astype(dq_ref.dtype)


def _dkv_kernel(count_ref, k_ref, v_ref, q_ref, do_ref, lse_ref, delta_ref, dk_ref, dv_ref, *, memory: bool,
                scale, bq, bk, groups, tokens, window, n_row_blocks, split_blocks):
    """dK, dV of key block pl.program_id(2): memory keys (every row of split pl.program_id(3), split_blocks
    row blocks, sees those below the count) or own keys (the rows at or after them, within the window)."""
    j = pl.program_id(2)
    keys, vals = k_ref[...], v_ref[...]
    s_k = j * bk + lax.broadcasted_iota(jnp.int32, (bk,), 0)
    if memory:
        count = count_ref[pl.program_id(0)]
        lo = pl.program_id(3) * split_blocks
        hi = jnp.where(j * bk < count, jnp.minimum(lo + split_blocks, n_row_blocks), lo)
    else:
        lo, hi = row_block_range(j, bq=bq, bk=bk, groups=groups, tokens=tokens, window=window,
                                 n_row_blocks=n_row_blocks)

    def step(i, carry):
        dk, dv = carry
        rows = pl.ds(i * bq, bq)
        q, do = q_ref[rows, :], do_ref[rows, :]
        vis = (s_k < count)[None, :] if memory else own_visible(_rows_of(i, bq, groups)[:, None], s_k[None, :],
                                                                 window)
        s = jnp.where(vis, dot_nt(q, keys) * scale, -jnp.inf)
        p = jnp.exp(s - lse_ref[rows][:, None])
        dv = dv + dot_tn(p.astype(do.dtype), do)
        ds = p * (dot_nt(do, vals) - delta_ref[rows][:, None])
        return dk + dot_tn(ds.astype(q.dtype), q), dv

    zeros = jnp.zeros(keys.shape, F32)
    dk, dv = lax.fori_loop(lo, hi, step, (zeros, zeros))
    dk_ref[...] = (dk * scale).astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


def _specs(p, bq):
    B, K, R, Hp = p.q.shape
    rows = pl.BlockSpec((None, None, bq, Hp), lambda b, k, i: (b, k, i, 0))
    row_vec = pl.BlockSpec((None, None, bq), lambda b, k, i: (b, k, i))
    whole = lambda n: pl.BlockSpec((None, None, n, Hp), lambda b, k, i: (b, k, 0, 0))
    keys = [whole(p.mem_k.shape[2]), whole(p.mem_k.shape[2]), whole(p.k.shape[2]), whole(p.k.shape[2])]
    return pl.BlockSpec((B,), lambda *grid: (0,)), rows, row_vec, keys


def attention_forward(p, *, scale, window, blocks, interpret):
    """p: msa.Prepared. Returns O [B, K, R, Hp] and the log-sum-exp [B, K, R] (float32, sink included)."""
    B, K, R, Hp = p.q.shape
    bq, bk = blocks.block_q, blocks.block_kv
    count, rows, row_vec, keys = _specs(p, bq)
    kw = dict(scale=scale, bq=bq, bk=bk, groups=p.groups, tokens=p.tokens, window=window)
    return pl.pallas_call(
        functools.partial(_forward_kernel, **kw), grid=(B, K, R // bq),
        in_specs=[count, pl.BlockSpec((None, bq), lambda b, k, i: (k, i)), rows, *keys],
        out_specs=[rows, row_vec],
        out_shape=[jax.ShapeDtypeStruct(p.q.shape, p.q.dtype), jax.ShapeDtypeStruct((B, K, R), F32)],
        compiler_params=plgpu.CompilerParams(num_warps=blocks.num_warps, num_stages=blocks.num_stages),
        interpret=interpret, name="msa_attention_forward",
    )(p.count, p.sinks, p.q, p.mem_k, p.mem_v, p.k, p.v)


def attention_backward(p, do, lse, delta, *, scale, window, blocks, interpret):
    """dQ [B, K, R, Hp]; dK, dV [B, K, Sp, Hp]; dK, dV of the memory [B, K, Cp, Hp] (input dtypes)."""
    B, K, R, Hp = p.q.shape
    bq, bk = blocks.block_q, blocks.block_kv
    count, rows, row_vec, keys = _specs(p, bq)
    kw = dict(scale=scale, bq=bq, bk=bk, groups=p.groups, tokens=p.tokens, window=window)
    params = plgpu.CompilerParams(num_warps=blocks.num_warps, num_stages=blocks.num_stages)
    dq = pl.pallas_call(
        functools.partial(_dq_kernel, **kw), grid=(B, K, R // bq),
        in_specs=[count, rows, rows, row_vec, row_vec, *keys], out_specs=rows,
        out_shape=jax.ShapeDtypeStruct(p.q.shape, p.q.dtype), compiler_params=params,
        interpret=interpret, name="msa_attention_dq",
    )(p.count, p.q, do, lse, delta, p.mem_k, p.mem_v, p.k, p.v)

    key_block = pl.BlockSpec((None, None, bk, Hp), lambda b, k, j, sp: (b, k, j, 0))
    all_rows = pl.BlockSpec((None, None, R, Hp), lambda b, k, j, sp: (b, k, 0, 0))
    all_vec = pl.BlockSpec((None, None, R), lambda b, k, j, sp: (b, k, 0))
    n_rb = R // bq

    def key_major(k, v, memory: bool):
        n_kb = k.shape[2] // bk
        n_splits = max(1, min(n_rb, -(-_BUSY_PROGRAMS // (B * K * n_kb)))) if memory else 1
        split_blocks = -(-n_rb // n_splits)
        partial_block = pl.BlockSpec((None, None, None, bk, Hp), lambda b, h, j, sp: (sp, b, h, j, 0))
        out_dtype = F32 if n_splits > 1 else k.dtype
        dk, dv = pl.pallas_call(
            functools.partial(_dkv_kernel, memory=memory, n_row_blocks=n_rb, split_blocks=split_blocks, **kw),
            grid=(B, K, n_kb, n_splits),
            in_specs=[count, key_block, key_block, all_rows, all_rows, all_vec, all_vec],
            out_specs=[partial_block, partial_block],
            out_shape=[jax.ShapeDtypeStruct((n_splits, *k.shape), out_dtype)] * 2,
            compiler_params=params, interpret=interpret,
            name="msa_attention_dkv_memory" if memory else "msa_attention_dkv",
        )(p.count, k, v, p.q, do, lse, delta)
        return dk.sum(axis=0).astype(k.dtype), dv.sum(axis=0).astype(v.dtype)

    dk, dv = key_major(p.k, p.v, memory=False)
    dmem_k, dmem_v = key_major(p.mem_k, p.mem_v, memory=True)
    return dq, dk, dv, dmem_k, dmem_v
