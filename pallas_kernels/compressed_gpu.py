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
                   tokens that selected any of them (the inverted index of the top-k, `compressed_inverted`):
                   P recomputed for the whole block per token, each entry weighted by how many of the
                   token's slots name it; dK=dV accumulated in registers, written once. Its work grows with
                   the blocks a token touches, so it pays where selections cluster in entry blocks.
  _staged_dkv_kernel    CSA with dkv="staged": the dQ kernel writes each slot's dK=dV row (per head block,
                   a token chunk at a time) instead of adding it; one program per entry block sums the rows
                   of the slots that picked its entries (the chunk's inverted index), written once.
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

# CSA dkv="staged": bytes of per-slot dK=dV rows the dQ kernel stages per token chunk.
STAGE_BYTES = 1 << 30


def _walk_window(kv_ref, t, first, *, w_pad: int, bk: int, body, carry):
    """Runs body(carry, keys [bk, Hp], visible [bk], None, None) over the window blocks ending at token t
    that hold a visible key (positions >= first); kv_ref rows are positions shifted by w_pad."""
    n_blocks = w_pad // bk

    def step(i, carry):
        start = t + 1 - (n_blocks - i) * bk
        keys_kh = kv_ref[pl.ds(start + w_pad, bk), :]
        visible_k = start + lax.broadcasted_iota(jnp.int32, (bk,), 0) >= first
        return body(carry, keys_kh, visible_k, None, None)

    return lax.fori_loop(n_blocks - cdiv(t + 1 - first, bk), n_blocks, step, carry)


def _walk_compressed(comp_ref, idx_ref, first, count, *, bk: int, body, carry):
    """Runs body(carry, keys [bk, Hp], visible [bk], rows [bk] | None, first slot | None) over the compressed
    blocks: CSA (idx_ref given): the token's top-k slots [0, count) gathered by index, -1 slots invisible;
    HCA: entries [first, count) read in order. Blocks outside them are skipped."""

    def step(j, carry):
        if idx_ref is None:
            keys_kh = comp_ref[pl.ds(j * bk, bk), :]
            s_k = j * bk + lax.broadcasted_iota(jnp.int32, (bk,), 0)
            return body(carry, keys_kh, (s_k >= first) & (s_k < count), None, None)
        rows_k = idx_ref[pl.ds(j * bk, bk)]
        keys_kh = comp_ref[jnp.maximum(rows_k, 0), :]
        return body(carry, keys_kh, rows_k >= 0, rows_k, j * bk)

    return lax.fori_loop(lax.div(first, bk), cdiv(count, bk), step, carry)


def _forward_kernel(*refs, sparse: bool, w_pad: int, window: int, ratio: int | None, scale: float, bk: int):
    if sparse:
        lo_ref, count_ref, q_ref, kv_ref, comp_ref, idx_ref, sinks_ref, o_ref, lse_ref = refs
    else:
        lo_ref, count_ref, q_ref, kv_ref, comp_ref, sinks_ref, o_ref, lse_ref = refs
        idx_ref = None
    t = pl.program_id(0)
    q_nh = q_ref[...]

    def online_softmax(carry, keys_kh, visible_k, rows_k, slot0):
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


def _dq_kernel(*refs, sparse: bool, dkv_out: str | None, w_pad: int, window: int, ratio: int | None,
               scale: float, bk: int, merge_duplicates: bool):
    """dQ of one (token, head block). CSA's gathered rows also get their dK=dV here when dkv_out says so:
    "atomic" adds them into dcomp (aliased input), "staged" writes them per slot into g [Kp, Hp] (this
    head block's share; a token chunk at a time, token = t0 + program id)."""
    refs = list(refs)
    t0 = refs.pop(0)[0] if dkv_out == "staged" else 0
    lo_ref, count_ref, q_ref, kv_ref, comp_ref = refs[:5]
    idx_ref = refs[5] if sparse else None
    do_ref, lse_ref, delta_ref = refs[5 + sparse:8 + sparse]
    dq_ref, *out_refs = refs[9 + sparse:] if dkv_out == "atomic" else refs[8 + sparse:]
    local = pl.program_id(0)
    t = t0 + local
    q_nh, do_nh = q_ref[...], do_ref[...]
    lse_n, delta_n = lse_ref[...], delta_ref[...]

    def accumulate_dq(dq_nh, keys_kh, visible_k, rows_k, slot0):
        s_nk = jnp.where(visible_k[None, :], dot_nt(q_nh, keys_kh) * scale, -jnp.inf)
        p_nk = jnp.exp(s_nk - lse_n[:, None])
        ds_nk = p_nk * (dot_nt(do_nh, keys_kh) - delta_n[:, None])
        if out_refs and rows_k is not None:
            # dK = scale dS^T Q and dV = P^T dO land on the same gathered K=V rows.
            g_kh = scale * dot_tn(ds_nk.astype(q_nh.dtype), q_nh) + dot_tn(p_nk.astype(do_nh.dtype), do_nh)
            if dkv_out == "atomic":
                _scatter_add_rows(out_refs[0], rows_k, visible_k, g_kh, merge_duplicates)
            else:
                out_refs[0][pl.ds(slot0, g_kh.shape[0]), :] = g_kh.astype(out_refs[0].dtype)
        return dq_nh + dot(ds_nk.astype(keys_kh.dtype), keys_kh)

    dq_nh = jnp.zeros(q_nh.shape, F32)
    first = jnp.maximum(lo_ref[local], t - window + 1)
    dq_nh = _walk_window(kv_ref, t, first, w_pad=w_pad, bk=bk, body=accumulate_dq, carry=dq_nh)
    dq_nh = _walk_compressed(comp_ref, idx_ref, first_entry(lo_ref[local], ratio), count_ref[local], bk=bk,
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
                         lse_ref, delta_ref, dk_ref, *, scale: float, bc: int, heads: int, bh: int, n_splits: int):
    """dK=dV of compressed entries [cb * bc, (cb + 1) * bc) (cb = pl.program_id(0)) from one block of bh
    heads, walking the tokens that selected any of them; pl.program_id(1) = split * head blocks + head
    block, a split taking a contiguous share of the tokens. Per token: its bh (token, head) rows against
    the block's bc entries, entry c weighted by how many of the token's slots name it (0 masks it out; a
    repeated slot counts twice, as in the forward)."""
    c0 = pl.program_id(0) * bc
    keys_ch = comp_ref[pl.ds(c0, bc), :]
    c_c = c0 + lax.broadcasted_iota(jnp.int32, (bc,), 0)
    lo, hi = block_start_ref[pl.program_id(0)], block_start_ref[pl.program_id(0) + 1]
    share = lax.div(hi - lo + (n_splits - 1), n_splits)
    head_blocks = heads // bh
    begin = lo + lax.div(pl.program_id(1), head_blocks) * share
    head0 = lax.rem(pl.program_id(1), head_blocks) * bh
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
        rows = pl.ds(pair_token_ref[p] * heads + head0, bh)
        q_nh, do_nh = q_ref[rows, :], do_ref[rows, :]
        s_nc = jnp.where(weight_c[None, :] > 0, dot_nt(q_nh, keys_ch) * scale, -jnp.inf)
        p_nc = jnp.exp(s_nc - lse_ref[rows][:, None])
        ds_nc = p_nc * (dot_nt(do_nh, keys_ch) - delta_ref[rows][:, None])
        return (dk_ch + scale * dot_tn((ds_nc * weight_c[None, :]).astype(q_nh.dtype), q_nh)
                + dot_tn((p_nc * weight_c[None, :]).astype(do_nh.dtype), do_nh))

    dk_ref[...] = lax.fori_loop(begin, end, pair, jnp.zeros(keys_ch.shape, F32))


def _staged_dkv_kernel(block_start_ref, pair_start_ref, entries_ref, selections_ref, rows_ref, dk_ref, *,
                       bc: int, bs: int, head_blocks: int, n_splits: int):
    """dK=dV of compressed entries [cb * bc, (cb + 1) * bc): the sum of the staged rows of the slots that
    selected them (their run of the inverted index, split pl.program_id(1) of n_splits taking a
    contiguous share), bs slots at a time as a one-hot [bc, bs] x [bs, Hp] matmul per head block."""
    cb = pl.program_id(0)
    lo, hi = pair_start_ref[block_start_ref[cb]], pair_start_ref[block_start_ref[cb + 1]]
    share = lax.div(hi - lo + (n_splits - 1), n_splits)
    begin = lo + pl.program_id(1) * share
    end = jnp.minimum(hi, begin + share)
    c_c = cb * bc + lax.broadcasted_iota(jnp.int32, (bc,), 0)
    rows_per_head_block = rows_ref.shape[0] // head_blocks

    def chunk(j, dk_ch):
        at = begin + j * bs
        live_s = at + lax.broadcasted_iota(jnp.int32, (bs,), 0) < end
        slot_s = jnp.where(live_s, selections_ref[pl.ds(at, bs)], 0)
        onehot_cs = ((c_c[:, None] == entries_ref[pl.ds(at, bs)][None, :]) & live_s[None, :]).astype(rows_ref.dtype)
        for h in range(head_blocks):
            g_sh = rows_ref[h * rows_per_head_block + slot_s, :]
            dk_ch = dk_ch + dot(onehot_cs, jnp.where(live_s[:, None], g_sh, jnp.zeros((), g_sh.dtype)))
        return dk_ch

    dk_ref[...] = lax.fori_loop(0, cdiv(end - begin, bs), chunk, jnp.zeros(dk_ref.shape, F32))


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


def _dq_call(p: _Padded, do, lse, delta, lo_BT, count_BT, *, dkv_out: str | None, window: int,
             ratio: int | None, scale: float, blocks: BlockSizes, params, interpret: bool, t0=None):
    """The dQ pallas_call over p's tokens (grid (T, Np // block_h_dq, B)); returns dQ and, by dkv_out,
    CSA's dcomp [B, Cp + 1, Hp] ("atomic") or staged per-slot rows [B, Np // block_h_dq, T, Kp, Hp]
    ("staged", p holding the tokens t0 + [0, T))."""
    B, T, Np, Hp = p.q.shape
    sparse = p.idx is not None
    specs, head_rows, head_vec = _token_specs(p, sparse, p.block_h_dq)
    specs += [head_rows, head_vec, head_vec]
    out_specs, out_shape = [head_rows], [jax.ShapeDtypeStruct(p.q.shape, p.q.dtype)]
    operands = [lo_BT, count_BT, p.q, p.kv, p.comp, *([p.idx] if sparse else []), do, lse, delta]
    aliases = {}
    if dkv_out == "atomic":   # +1 spare row for the invisible slots
        dcomp_spec = pl.BlockSpec((None, p.comp.shape[1] + 1, Hp), lambda t, h, b: (b, 0, 0))
        specs.append(dcomp_spec)
        out_specs.append(dcomp_spec)
        out_shape.append(jax.ShapeDtypeStruct((B, p.comp.shape[1] + 1, Hp), F32))
        operands.append(jnp.zeros(out_shape[-1].shape, F32))
        aliases = {len(operands) - 1: 1}
    elif dkv_out == "staged":
        Kp = p.idx.shape[2]
        out_specs.append(pl.BlockSpec((None, None, None, Kp, Hp), lambda t, h, b: (b, h, t, 0, 0)))
        out_shape.append(jax.ShapeDtypeStruct((B, Np // p.block_h_dq, T, Kp, Hp), p.q.dtype))
        operands.insert(0, t0)
        specs.insert(0, pl.BlockSpec((1,), lambda t, h, b: (0,)))
    kernel = functools.partial(_dq_kernel, sparse=sparse, dkv_out=dkv_out, w_pad=p.w_pad, window=window,
                               ratio=ratio, scale=scale, bk=blocks.block_k_dq, merge_duplicates=bool(interpret))
    return pl.pallas_call(
        kernel, grid=(T, Np // p.block_h_dq, B), in_specs=specs, out_specs=out_specs, out_shape=out_shape,
        input_output_aliases=aliases, compiler_params=params, interpret=interpret,
        name="csa_dq" if sparse else "hca_dq",
    )(*operands)


def backward(q_BTNH, kv_BTH, comp_BCH, idx_BTK, sinks_N, lo_BT, count_BT, do_BTNH, lse_BTN, delta_BTN, *,
             window: int, ratio: int | None, scale: float, blocks: BlockSizes, interpret: bool,
             dkv: str = "atomic") -> tuple[jax.Array, jax.Array, jax.Array]:
    """dQ [B, T, N, H] (q dtype), dKV [B, T, H] and dKV_comp [B, C, H] (float32). dkv: how CSA's gathered
    rows get their dK=dV (compressed.CSA_DKV): "atomic" (added by the dQ kernel), "inverted" (key-major
    over the inverted index, P recomputed) or "staged" (per-slot rows staged by the dQ kernel a token
    chunk at a time, summed key-major over the inverted index); HCA ignores it."""
    B, T, N, H = q_BTNH.shape
    C = comp_BCH.shape[1]
    sparse = idx_BTK is not None
    p = _pad_inputs(q_BTNH, kv_BTH, comp_BCH, idx_BTK, sinks_N, window=window, blocks=blocks)
    Np, Hp = p.q.shape[2:]
    do = pad_axis(pad_axis(do_BTNH.astype(q_BTNH.dtype), 2, Np), 3, Hp)
    lse, delta = pad_axis(lse_BTN, 2, Np), pad_axis(delta_BTN, 2, Np)
    params = plgpu.CompilerParams(num_warps=blocks.num_warps_bwd, num_stages=blocks.num_stages_bwd)
    common = dict(window=window, scale=scale, blocks=blocks, params=params, interpret=interpret)

    # dQ per (token, head block), for CSA with (atomic, staged) or without (inverted) the selected rows' dK=dV.
    dkv_out = dkv if sparse and dkv != "inverted" else None
    if dkv_out == "staged":
        dq, *dcomp = _staged(p, do, lse, delta, lo_BT, count_BT, **common)
    else:
        dq, *dcomp = _dq_call(p, do, lse, delta, lo_BT, count_BT, dkv_out=dkv_out, ratio=ratio, **common)

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
    if dkv_out is not None:
        dcomp = dcomp[0][:, :C, :H]
    elif sparse:
        dcomp = _selected_dkv(p, idx_BTK, row_operands[:4], bc=bkv, scale=scale, params=params,
                              interpret=interpret)[:, :C, :H]
    elif C == 0:
        dcomp = jnp.zeros((B, 0, H), F32)
    else:
        dcomp = key_major(p.comp, 0, C, window=None, ratio=ratio)
    return dq[:, :, :N, :H], dkv, dcomp


def _key_major_grid(n_blocks: int) -> int:
    """Splits per entry block of the inverted-index kernels: enough programs (~512) to fill the GPU."""
    return max(1, -(-512 // n_blocks))


def _selected_dkv(p: _Padded, idx_BTK, row_operands, *, bc: int, scale: float, params, interpret: bool):
    """CSA's dK=dV of the compressed entries [B, Cp, Hp] (float32), key-major over the inverted index of
    the top-k with P recomputed: one program per (entry block, split, head block of block_h_dq heads, as
    the dQ kernel's tiles), partial sums added."""
    B, Cp, Hp = p.comp.shape
    Np = p.q.shape[2]
    head_blocks = Np // p.block_h_dq
    n_blocks, n_splits = Cp // bc, _key_major_grid(Cp // bc)
    index = inverted_index(idx_BTK, num_blocks=n_blocks, block=bc, pad=bc)
    whole = lambda x: pl.BlockSpec((None, *x.shape[1:]), lambda cb, sp, b: (b,) + (0,) * (x.ndim - 1))
    operands = [index.block_start, index.pair_token, index.pair_start, index.entries, p.comp, *row_operands]
    kernel = functools.partial(_selected_dkv_kernel, scale=scale, bc=bc, heads=Np, bh=p.block_h_dq,
                               n_splits=n_splits)
    partial_dk = pl.pallas_call(
        kernel, grid=(n_blocks, n_splits * head_blocks, B), in_specs=[whole(x) for x in operands],
        out_specs=pl.BlockSpec((None, None, bc, Hp), lambda cb, sp, b: (b, sp, cb, 0)),
        out_shape=jax.ShapeDtypeStruct((B, n_splits * head_blocks, Cp, Hp), F32),
        compiler_params=params, interpret=interpret, name="csa_selected_dkv",
    )(*operands)
    return jnp.sum(partial_dk, axis=1)


def _staged(p: _Padded, do, lse, delta, lo_BT, count_BT, *, window: int, scale: float, blocks: BlockSizes,
            params, interpret: bool):
    """CSA's dQ [B, T, Np, Hp] and dK=dV of the compressed entries [B, Cp, Hp] (float32) without
    atomics: a token chunk at a time (sized to STAGE_BYTES of staged rows), the dQ kernel writes each
    slot's dK=dV row per head block, and a key-major kernel sums them per entry block over the chunk's
    inverted index. Padding tokens (lo past the end, no slots) see nothing."""
    B, T, Np, Hp = p.q.shape
    Kp, Cp = p.idx.shape[2], p.comp.shape[1]
    head_blocks = Np // p.block_h_dq
    chunk = max(1, min(T, STAGE_BYTES // (head_blocks * Kp * Hp * p.q.dtype.itemsize)))
    n_chunks = -(-T // chunk)
    split = lambda x, fill=0: jnp.swapaxes(pad_axis(x, 1, n_chunks * chunk, value=fill).reshape(
        B, n_chunks, chunk, *x.shape[2:]), 0, 1)
    xs = (jnp.arange(n_chunks, dtype=jnp.int32) * chunk, split(p.q), split(do), split(lse), split(delta),
          split(p.idx, -1), split(lo_BT, n_chunks * chunk), split(count_BT))
    bc, bs = blocks.block_kv_bwd, blocks.block_k_dq
    n_blocks, n_splits = Cp // bc, _key_major_grid(Cp // bc)

    def step(dcomp, x):
        t0, q, do, lse, delta, idx, lo, count = x
        dq, rows = _dq_call(p._replace(q=q, idx=idx), do, lse, delta, lo, count, dkv_out="staged", ratio=None,
                            window=window, scale=scale, blocks=blocks, params=params, interpret=interpret,
                            t0=t0[None])
        index = inverted_index(idx, num_blocks=n_blocks, block=bc, pad=bs)
        operands = [index.block_start, index.pair_start, index.entries, index.selections,
                    rows.reshape(B, head_blocks * chunk * Kp, Hp)]
        whole = lambda x: pl.BlockSpec((None, *x.shape[1:]), lambda cb, sp, b: (b,) + (0,) * (x.ndim - 1))
        kernel = functools.partial(_staged_dkv_kernel, bc=bc, bs=bs, head_blocks=head_blocks, n_splits=n_splits)
        partial_dk = pl.pallas_call(
            kernel, grid=(n_blocks, n_splits, B), in_specs=[whole(x) for x in operands],
            out_specs=pl.BlockSpec((None, None, bc, Hp), lambda cb, sp, b: (b, sp, cb, 0)),
            out_shape=jax.ShapeDtypeStruct((B, n_splits, Cp, Hp), F32),
            compiler_params=params, interpret=interpret, name="csa_staged_dkv",
        )(*operands)
        return dcomp + jnp.sum(partial_dk, axis=1), dq

    dcomp, dq = lax.scan(step, jnp.zeros((B, Cp, Hp), F32), xs)
    return jnp.swapaxes(dq, 0, 1).reshape(B, n_chunks * chunk, Np, Hp)[:, :T], dcomp
