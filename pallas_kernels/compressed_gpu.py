"""Triton (Pallas GPU) lowering of CSA and HCA (`compressed.py`): one softmax over a raw-token sliding
window plus compressed entries.

Shared by CSA and HCA; only the source of the compressed keys differs:
  CSA ("sparse"): each token's own top-k rows of kv_comp, gathered through int32 indices (-1 = unused);
  HCA (dense):    the visible entries kv_comp[window_start[t] // ratio : n_comp[t]] (those whose last token
                  lies in t's segment), walked block by block (invisible blocks skipped).
The window is the raw keys s in [max(window_start[t], t - W + 1), t]; K = V everywhere (one kv head).

Kernels (heads are the rows of every matmul tile, so one K=V block serves all heads of a token):
  _forward_kernel  one program per (token, head block): online softmax seeded with the sink logit
                   (m = sink, l = 1), writes O and the log-sum-exp (sink included).
  _dq_kernel       same walk recomputing P; dQ, and for CSA with dkv="atomic" dK=dV of the gathered rows
                   by fp32 atomics (one per row, dim and head block: this scatter bounds CSA's backward,
                   docs/benchmarks.md).
  _selected_dkv_kernel  CSA with dkv="inverted": one program per block of compressed entries walking the
                   tokens that selected any of them (the inverted index of the top-k, built in plain JAX
                   by `inverted_index`): P recomputed for the whole block per token, each entry weighted
                   by how many of the token's slots name it; dK=dV accumulated in registers, written once.
  _dkv_kernel      one program per key block, walking the (token, head) rows that can see it: dK=dV of
                   the raw window keys, and for HCA of the compressed entries (no atomics; the rows of a
                   compressed block are split over programs and the partial sums added).

Shapes: B batch, T tokens, N heads (padded to Np), H head dim (padded to Hp, a power of two), C
compressed entries (padded to Cp), K top-k slots (padded to Kp), L = w_pad + padded T raw rows, R rows
(t, n) flattened. Tiles: n heads, h head dim, k keys of a block, r rows.
"""
from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.common import (F32, BlockSizes, cdiv, dot, dot_nt, dot_tn, first_entry, next_pow2, pad_axis,
                                   round_up)
from pallas_kernels.compressed_inverted import inverted_index


def _walk_window(kv_ref, t, first, *, w_pad: int, bk: int, body, carry):
    """Runs body(carry, keys [bk, Hp], visible [bk], None) over the window blocks ending at token t that
    hold a visible key (positions >= first); kv_ref rows are positions shifted by w_pad."""
    n_blocks = w_pad // bk

    def step(i, carry):
        start = t + 1 - (n_blocks - i) * bk
        keys_kh = kv_ref[pl.ds(start + w_pad, bk), :]
        visible_k = start + lax.broadcasted_iota(jnp.int32, (bk,), 0) >= first
        return body(carry, keys_kh, visible_k, None)

    return lax.fori_loop(n_blocks - cdiv(t + 1 - first, bk), n_blocks, step, carry)


def _walk_compressed(comp_ref, idx_ref, first, count, *, bk: int, body, carry):
    """Runs body(carry, keys [bk, Hp], visible [bk], rows [bk] | None) over the compressed blocks:
    CSA (idx_ref given): the token's top-k slots [0, count) gathered by index, -1 slots invisible;
    HCA: entries [first, count) read in order. Blocks outside them are skipped."""

    def step(j, carry):
        if idx_ref is None:
            keys_kh = comp_ref[pl.ds(j * bk, bk), :]
            s_k = j * bk + lax.broadcasted_iota(jnp.int32, (bk,), 0)
            return body(carry, keys_kh, (s_k >= first) & (s_k < count), None)
        rows_k = idx_ref[pl.ds(j * bk, bk)]
        keys_kh = comp_ref[jnp.maximum(rows_k, 0), :]
        return body(carry, keys_kh, rows_k >= 0, rows_k)

    return lax.fori_loop(lax.div(first, bk), cdiv(count, bk), step, carry)


def _forward_kernel(*refs, sparse: bool, w_pad: int, window: int, ratio: int | None, scale: float, bk: int):
    if sparse:
        lo_ref, count_ref, q_ref, kv_ref, comp_ref, idx_ref, sinks_ref, o_ref, lse_ref = refs
    else:
        lo_ref, count_ref, q_ref, kv_ref, comp_ref, sinks_ref, o_ref, lse_ref = refs
        idx_ref = None
    t = pl.program_id(0)
    q_nh = q_ref[...]

    def online_softmax(carry, keys_kh, visible_k, rows_k):
        acc_nh, m_n, l_n = carry
        s_nk = jnp.where(visible_k[None, :], dot_nt(q_nh, keys_kh) * scale, -jnp.inf)
        m_new = jnp.maximum(m_n, jnp.max(s_nk, axis=1))
        alpha_n = jnp.exp(m_n - m_new)
        p_nk = jnp.exp(s_nk - m_new[:, None])
        acc_nh = acc_nh * alpha_n[:, None] + dot(p_nk.astype(keys_kh.dtype), keys_kh)
        return acc_nh, m_new, l_n * alpha_n + jnp.sum(p_nk, axis=1)

    # The sink only enters the denominator: it seeds the running max and sum (exp(sink - sink) = 1).
    carry = (jnp.zeros(q_nh.shape, F32), sinks_ref[...], jnp.ones(q_nh.shape[:1], F32))
    first = jnp.maximum(lo_ref[t], t - window + 1)
    carry = _walk_window(kv_ref, t, first, w_pad=w_pad, bk=bk, body=online_softmax, carry=carry)
    acc_nh, m_n, l_n = _walk_compressed(comp_ref, idx_ref, first_entry(lo_ref[t], ratio), count_ref[t], bk=bk,
                                        body=online_softmax, carry=carry)
    o_ref[...] = (acc_nh / l_n[:, None]).astype(o_ref.dtype)
    lse_ref[...] = m_n + jnp.log(l_n)


def _dq_kernel(*refs, sparse: bool, scatter: bool, w_pad: int, window: int, ratio: int | None, scale: float,
               bk: int, merge_duplicates: bool):
    """scatter (CSA, dkv="atomic"): also adds dK=dV of the gathered rows into dcomp."""
    if scatter:
        (lo_ref, count_ref, q_ref, kv_ref, comp_ref, idx_ref, do_ref, lse_ref, delta_ref, _,
         dq_ref, dcomp_ref) = refs
    elif sparse:
        lo_ref, count_ref, q_ref, kv_ref, comp_ref, idx_ref, do_ref, lse_ref, delta_ref, dq_ref = refs
        dcomp_ref = None
    else:
        lo_ref, count_ref, q_ref, kv_ref, comp_ref, do_ref, lse_ref, delta_ref, dq_ref = refs
        idx_ref = dcomp_ref = None
    t = pl.program_id(0)
    q_nh, do_nh = q_ref[...], do_ref[...]
    lse_n, delta_n = lse_ref[...], delta_ref[...]

    def accumulate_dq(dq_nh, keys_kh, visible_k, rows_k):
        s_nk = jnp.where(visible_k[None, :], dot_nt(q_nh, keys_kh) * scale, -jnp.inf)
        p_nk = jnp.exp(s_nk - lse_n[:, None])
        ds_nk = p_nk * (dot_nt(do_nh, keys_kh) - delta_n[:, None])
        if dcomp_ref is not None and rows_k is not None:
            # dK = scale dS^T Q and dV = P^T dO land on the same gathered K=V rows.
            g_kh = scale * dot_tn(ds_nk.astype(q_nh.dtype), q_nh) + dot_tn(p_nk.astype(do_nh.dtype), do_nh)
            _scatter_add_rows(dcomp_ref, rows_k, visible_k, g_kh, merge_duplicates)
        return dq_nh + dot(ds_nk.astype(keys_kh.dtype), keys_kh)

    dq_nh = jnp.zeros(q_nh.shape, F32)
    first = jnp.maximum(lo_ref[t], t - window + 1)
    dq_nh = _walk_window(kv_ref, t, first, w_pad=w_pad, bk=bk, body=accumulate_dq, carry=dq_nh)
    dq_nh = _walk_compressed(comp_ref, idx_ref, first_entry(lo_ref[t], ratio), count_ref[t], bk=bk,
                             body=accumulate_dq, carry=dq_nh)
    dq_ref[...] = (dq_nh * scale).astype(dq_ref.dtype)


def _scatter_add_rows(dcomp_ref, rows_k, visible_k, g_kh, merge_duplicates: bool):
    """dcomp[rows] += g with fp32 atomics; invisible slots go to the spare last row.

    Under interpret mode JAX emulates the atomic add as a gather/scatter that keeps one of several
    equal indices, so there repeated rows are first summed into their first occurrence.
    """
    spare = dcomp_ref.shape[0] - 1
    if merge_duplicates:
        same_kk = (rows_k[:, None] == rows_k[None, :]) & visible_k[:, None] & visible_k[None, :]
        g_kh = dot(same_kk.astype(F32), g_kh)
        earlier_kk = (lax.broadcasted_iota(jnp.int32, same_kk.shape, 1)
                      < lax.broadcasted_iota(jnp.int32, same_kk.shape, 0))
        repeated_k = jnp.max(jnp.where(same_kk & earlier_kk, 1, 0), axis=1) > 0
        visible_k = visible_k & ~repeated_k
    target_k = jnp.where(visible_k, rows_k, spare)
    cols_h = lax.broadcasted_iota(jnp.int32, (g_kh.shape[1],), 0)
    plgpu.atomic_add(dcomp_ref, (target_k[:, None], cols_h[None, :]),
                     jnp.where(visible_k[:, None], g_kh, 0.0))


def _dkv_kernel(keys_ref, q_ref, do_ref, lse_ref, delta_ref, tok_ref, lo_ref, count_ref, dk_ref, *,
                window: int | None, ratio: int | None, scale: float, key_offset: int, bk: int, br: int,
                n_tokens: int, heads: int, split_blocks: int):
    """dK=dV of one block of keys, walking the (token, head) rows that see it (row blocks of split
    pl.program_id(1), `split_blocks` of them per split). Window keys (window set): visible iff
    lo[t] <= s <= t and s > t - W (lo = window start); compressed entries (ratio set): visible iff
    lo[t] // ratio <= s < count[t] (count = number of complete entries)."""
    s0 = pl.program_id(0) * bk
    keys_kh = keys_ref[pl.ds(key_offset + s0, bk), :]
    s_k = s0 + lax.broadcasted_iota(jnp.int32, (bk,), 0)
    if window is not None:
        t_begin, t_end = s0, jnp.minimum(n_tokens, s0 + bk + window - 1)
    else:
        t_begin, t_end = jnp.minimum((s0 + 1) * ratio - 1, n_tokens), n_tokens
    split_begin = pl.program_id(1) * split_blocks
    rb_begin = jnp.maximum(lax.div(t_begin * heads, br), split_begin)
    rb_end = jnp.minimum(cdiv(t_end * heads, br), split_begin + split_blocks)

    def accumulate(rb, dk_kh):
        rows = pl.ds(rb * br, br)
        q_rh, do_rh = q_ref[rows, :], do_ref[rows, :]
        t_r, lo_r = tok_ref[rows][:, None], lo_ref[rows][:, None]
        if window is not None:
            visible_rk = (s_k[None, :] >= lo_r) & (s_k[None, :] <= t_r) & (s_k[None, :] > t_r - window)
        else:
            visible_rk = (s_k[None, :] >= first_entry(lo_r, ratio)) & (s_k[None, :] < count_ref[rows][:, None])
        s_rk = jnp.where(visible_rk, dot_nt(q_rh, keys_kh) * scale, -jnp.inf)
        p_rk = jnp.exp(s_rk - lse_ref[rows][:, None])
        ds_rk = p_rk * (dot_nt(do_rh, keys_kh) - delta_ref[rows][:, None])
        return (dk_kh + scale * dot_tn(ds_rk.astype(q_rh.dtype), q_rh)
                + dot_tn(p_rk.astype(do_rh.dtype), do_rh))

    dk_ref[...] = lax.fori_loop(rb_begin, rb_end, accumulate, jnp.zeros(keys_kh.shape, F32))


def _selected_dkv_kernel(block_start_ref, pair_token_ref, pair_start_ref, entries_ref, comp_ref, q_ref, do_ref,
                         lse_ref, delta_ref, dk_ref, *, scale: float, bc: int, heads: int, n_splits: int):
    """dK=dV of compressed entries [cb * bc, (cb + 1) * bc) (cb = pl.program_id(0)), walking the tokens
    that selected any of them (split pl.program_id(1) of n_splits takes a contiguous share). Per token:
    all its (token, head) rows against the block's bc entries, entry c weighted by how many of the
    token's slots name it (0 masks it out; a repeated slot counts twice, as in the forward)."""
    c0 = pl.program_id(0) * bc
    keys_ch = comp_ref[pl.ds(c0, bc), :]
    c_c = c0 + lax.broadcasted_iota(jnp.int32, (bc,), 0)
    lo, hi = block_start_ref[pl.program_id(0)], block_start_ref[pl.program_id(0) + 1]
    share = lax.div(hi - lo + (n_splits - 1), n_splits)
    begin = lo + pl.program_id(1) * share
    end = jnp.minimum(hi, begin + share)

    def pair(p, dk_ch):
        start, stop = pair_start_ref[p], pair_start_ref[p + 1]

        def count(j, weight_c):
            at = start + j * bc
            entry_s = entries_ref[pl.ds(at, bc)]
            live_s = at + lax.broadcasted_iota(jnp.int32, (bc,), 0) < stop
            hits_sc = (entry_s[:, None] == c_c[None, :]) & live_s[:, None]
            return weight_c + jnp.sum(hits_sc.astype(F32), axis=0)

        weight_c = lax.fori_loop(0, cdiv(stop - start, bc), count, jnp.zeros((bc,), F32))
        rows = pl.ds(pair_token_ref[p] * heads, heads)
        q_nh, do_nh = q_ref[rows, :], do_ref[rows, :]
        s_nc = jnp.where(weight_c[None, :] > 0, dot_nt(q_nh, keys_ch) * scale, -jnp.inf)
        p_nc = jnp.exp(s_nc - lse_ref[rows][:, None])
        ds_nc = p_nc * (dot_nt(do_nh, keys_ch) - delta_ref[rows][:, None])
        return (dk_ch + scale * dot_tn((ds_nc * weight_c[None, :]).astype(q_nh.dtype), q_nh)
                + dot_tn((p_nc * weight_c[None, :]).astype(do_nh.dtype), do_nh))

    dk_ref[...] = lax.fori_loop(begin, end, pair, jnp.zeros(keys_ch.shape, F32))


class _Padded(NamedTuple):
    """Inputs laid out for the Triton kernels (see the module docstring for the padded sizes)."""
    q: jax.Array          # [B, T, Np, Hp]
    kv: jax.Array         # [B, L, Hp], positions shifted by w_pad, zero rows around
    comp: jax.Array       # [B, Cp, Hp]
    idx: jax.Array | None  # [B, T, Kp] int32, -1 padded (CSA)
    sinks: jax.Array      # [Np] f32
    block_h: int          # forward heads per program
    block_h_dq: int       # dQ heads per program
    w_pad: int


def _pad_inputs(q_BTNH, kv_BTH, comp_BCH, idx_BTK, sinks_N, *, window: int, blocks: BlockSizes) -> _Padded:
    B, T, N, H = q_BTNH.shape
    bh, bh_dq = (min(b, max(16, next_pow2(N))) for b in (blocks.block_h, blocks.block_h_dq))
    Np, Hp = round_up(N, max(bh, bh_dq)), max(16, next_pow2(H))
    key_multiple = max(blocks.block_k, blocks.block_k_dq, blocks.block_kv_bwd)
    w_pad = round_up(window, key_multiple)
    q = pad_axis(pad_axis(q_BTNH, 2, Np), 3, Hp)
    kv = pad_axis(pad_axis(kv_BTH, 1, w_pad + round_up(T, blocks.block_kv_bwd), before=w_pad), 2, Hp)
    comp = pad_axis(pad_axis(comp_BCH, 1, round_up(max(comp_BCH.shape[1], 1), key_multiple)), 2, Hp)
    idx = None if idx_BTK is None else pad_axis(
        idx_BTK, 2, round_up(idx_BTK.shape[2], max(blocks.block_k, blocks.block_k_dq)), value=-1)
    sinks = pad_axis(sinks_N.astype(F32), 0, Np)
    return _Padded(q, kv, comp, idx, sinks, bh, bh_dq, w_pad)


def _token_specs(p: _Padded, sparse: bool, block_h: int):
    """BlockSpecs of the per-(token, head block) kernels; grid (T, Np // block_h, B)."""
    B, T, Np, Hp = p.q.shape
    whole_row = lambda t, h, b: (b, 0)
    specs = [pl.BlockSpec((None, T), whole_row),                                  # window start
             pl.BlockSpec((None, T), whole_row),                                  # compressed count
             pl.BlockSpec((None, None, block_h, Hp), lambda t, h, b: (b, t, h, 0)),
             pl.BlockSpec((None, p.kv.shape[1], Hp), lambda t, h, b: (b, 0, 0)),
             pl.BlockSpec((None, p.comp.shape[1], Hp), lambda t, h, b: (b, 0, 0))]
    if sparse:
        specs.append(pl.BlockSpec((None, None, p.idx.shape[2]), lambda t, h, b: (b, t, 0)))
    head_rows = pl.BlockSpec((None, None, block_h, Hp), lambda t, h, b: (b, t, h, 0))
    head_vec = pl.BlockSpec((None, None, block_h), lambda t, h, b: (b, t, h))
    return specs, head_rows, head_vec


def forward(q_BTNH, kv_BTH, comp_BCH, idx_BTK, sinks_N, lo_BT, count_BT, *, window: int, ratio: int | None,
            scale: float, blocks: BlockSizes, interpret: bool) -> tuple[jax.Array, jax.Array]:
    """O [B, T, N, H] and the log-sum-exp [B, T, N] (float32, sink included). ratio: HCA's (None for CSA)."""
    B, T, N, H = q_BTNH.shape
    sparse = idx_BTK is not None
    p = _pad_inputs(q_BTNH, kv_BTH, comp_BCH, idx_BTK, sinks_N, window=window, blocks=blocks)
    Np, Hp = p.q.shape[2:]
    specs, head_rows, head_vec = _token_specs(p, sparse, p.block_h)
    specs.append(pl.BlockSpec((p.block_h,), lambda t, h, b: (h,)))
    kernel = functools.partial(_forward_kernel, sparse=sparse, w_pad=p.w_pad, window=window, ratio=ratio,
                               scale=scale, bk=blocks.block_k)
    o, lse = pl.pallas_call(
        kernel, grid=(T, Np // p.block_h, B), in_specs=specs, out_specs=[head_rows, head_vec],
        out_shape=[jax.ShapeDtypeStruct(p.q.shape, q_BTNH.dtype), jax.ShapeDtypeStruct((B, T, Np), F32)],
        compiler_params=plgpu.CompilerParams(num_warps=blocks.num_warps, num_stages=blocks.num_stages),
        interpret=interpret, name="csa_forward" if sparse else "hca_forward",
    )(lo_BT, count_BT, p.q, p.kv, p.comp, *([p.idx] if sparse else []), p.sinks)
    return o[:, :, :N, :H], lse[:, :, :N]


def backward(q_BTNH, kv_BTH, comp_BCH, idx_BTK, sinks_N, lo_BT, count_BT, do_BTNH, lse_BTN, delta_BTN, *,
             window: int, ratio: int | None, scale: float, blocks: BlockSizes, interpret: bool,
             dkv: str = "atomic") -> tuple[jax.Array, jax.Array, jax.Array]:
    """dQ [B, T, N, H] (q dtype), dKV [B, T, H] and dKV_comp [B, C, H] (float32). dkv: how CSA's gathered
    rows get their dK=dV, "atomic" (added by the dQ kernel) or "inverted" (key-major over the inverted
    index); HCA ignores it."""
    B, T, N, H = q_BTNH.shape
    C = comp_BCH.shape[1]
    sparse = idx_BTK is not None
    scatter = sparse and dkv == "atomic"
    p = _pad_inputs(q_BTNH, kv_BTH, comp_BCH, idx_BTK, sinks_N, window=window, blocks=blocks)
    Np, Hp = p.q.shape[2:]
    do = pad_axis(pad_axis(do_BTNH.astype(q_BTNH.dtype), 2, Np), 3, Hp)
    lse, delta = pad_axis(lse_BTN, 2, Np), pad_axis(delta_BTN, 2, Np)
    params = plgpu.CompilerParams(num_warps=blocks.num_warps_bwd, num_stages=blocks.num_stages_bwd)

    # dQ per (token, head block); CSA's "atomic" path also scatters dK=dV of its gathered rows (+1 spare row).
    specs, head_rows, head_vec = _token_specs(p, sparse, p.block_h_dq)
    specs += [head_rows, head_vec, head_vec]
    out_specs, out_shape = [head_rows], [jax.ShapeDtypeStruct(p.q.shape, q_BTNH.dtype)]
    operands = [lo_BT, count_BT, p.q, p.kv, p.comp, *([p.idx] if sparse else []), do, lse, delta]
    if scatter:
        dcomp_spec = pl.BlockSpec((None, p.comp.shape[1] + 1, Hp), lambda t, h, b: (b, 0, 0))
        specs.append(dcomp_spec)
        out_specs.append(dcomp_spec)
        out_shape.append(jax.ShapeDtypeStruct((B, p.comp.shape[1] + 1, Hp), F32))
        operands.append(jnp.zeros(out_shape[-1].shape, F32))
    kernel = functools.partial(_dq_kernel, sparse=sparse, scatter=scatter, w_pad=p.w_pad, window=window,
                               ratio=ratio, scale=scale, bk=blocks.block_k_dq, merge_duplicates=bool(interpret))
    dq, *dcomp = pl.pallas_call(
        kernel, grid=(T, Np // p.block_h_dq, B), in_specs=specs, out_specs=out_specs, out_shape=out_shape,
        input_output_aliases={len(operands) - 1: 1} if scatter else {}, compiler_params=params,
        interpret=interpret, name="csa_dq" if sparse else "hca_dq",
    )(*operands)

    # dK=dV key-major over the (token, head) rows: the raw window keys, and HCA's compressed entries.
    br, bkv = blocks.block_rows_bwd, blocks.block_kv_bwd
    R = round_up(T * Np, br)
    rows = lambda x, fill=0: pad_axis(x.reshape(B, T * Np, *x.shape[3:]), 1, R, value=fill)
    per_row = lambda x_BT: rows(jnp.broadcast_to(x_BT[:, :, None], (B, T, Np)))
    tok_R = per_row(jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T)))
    tok_R = jnp.where(jnp.arange(R) < T * Np, tok_R, -1)
    row_operands = [rows(p.q), rows(do), rows(lse), rows(delta), tok_R]

    def key_major(keys, key_offset, n_keys, **rule):
        n_kb = round_up(n_keys, bkv) // bkv
        # A window key is seen by ~(bkv + W) tokens; a compressed entry by up to all of them, so those
        # rows are split over programs (partial sums added below) to keep the GPU busy.
        n_splits = 1 if rule["window"] else max(1, min(R // br, -(-512 // n_kb)))
        split_blocks = -(-(R // br) // n_splits)
        row_spec = pl.BlockSpec((None, R, Hp), lambda kb, sp, b: (b, 0, 0))
        vec_spec = pl.BlockSpec((None, R), lambda kb, sp, b: (b, 0))
        kernel = functools.partial(_dkv_kernel, scale=scale, key_offset=key_offset, bk=bkv, br=br, n_tokens=T,
                                   heads=Np, split_blocks=split_blocks, **rule)
        partial_dk = pl.pallas_call(
            kernel, grid=(n_kb, n_splits, B),
            in_specs=[pl.BlockSpec((None, keys.shape[1], Hp), lambda kb, sp, b: (b, 0, 0)),
                      row_spec, row_spec, vec_spec, vec_spec, vec_spec, vec_spec, vec_spec],
            out_specs=pl.BlockSpec((None, None, bkv, Hp), lambda kb, sp, b: (b, sp, kb, 0)),
            out_shape=jax.ShapeDtypeStruct((B, n_splits, n_kb * bkv, Hp), F32),
            compiler_params=params, interpret=interpret,
            name="window_dkv" if rule["window"] else "hca_dkv",
        )(keys, *row_operands, per_row(lo_BT), per_row(count_BT))
        return jnp.sum(partial_dk, axis=1)[:, :n_keys, :H]

    dkv = key_major(p.kv, p.w_pad, T, window=window, ratio=None)
    if scatter:
        dcomp = dcomp[0][:, :C, :H]
    elif sparse:
        dcomp = _selected_dkv(p, idx_BTK, row_operands[:4], bc=bkv, scale=scale, params=params,
                              interpret=interpret)[:, :C, :H]
    elif C == 0:
        dcomp = jnp.zeros((B, 0, H), F32)
    else:
        dcomp = key_major(p.comp, 0, C, window=None, ratio=ratio)
    return dq[:, :, :N, :H], dkv, dcomp


def _selected_dkv(p: _Padded, idx_BTK, row_operands, *, bc: int, scale: float, params, interpret: bool):
    """CSA's dK=dV of the compressed entries [B, Cp, Hp] (float32), key-major over the inverted index of
    the top-k: one program per (entry block, split); busy blocks are split over programs (partial sums
    added) to keep the GPU full."""
    B, Cp, Hp = p.comp.shape
    Np = p.q.shape[2]
    n_blocks = Cp // bc
    index = inverted_index(idx_BTK, num_blocks=n_blocks, block=bc, pad=bc)
    n_splits = max(1, -(-512 // n_blocks))
    whole = lambda x: pl.BlockSpec((None, *x.shape[1:]), lambda cb, sp, b: (b,) + (0,) * (x.ndim - 1))
    operands = [*index, p.comp, *row_operands]
    kernel = functools.partial(_selected_dkv_kernel, scale=scale, bc=bc, heads=Np, n_splits=n_splits)
    partial_dk = pl.pallas_call(
        kernel, grid=(n_blocks, n_splits, B), in_specs=[whole(x) for x in operands],
        out_specs=pl.BlockSpec((None, None, bc, Hp), lambda cb, sp, b: (b, sp, cb, 0)),
        out_shape=jax.ShapeDtypeStruct((B, n_splits, Cp, Hp), F32),
        compiler_params=params, interpret=interpret, name="csa_selected_dkv",
    )(*operands)
    return jnp.sum(partial_dk, axis=1)
