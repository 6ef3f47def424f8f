"""Mosaic TPU (Pallas TPU) lowering of CSA and HCA (`compressed.py`): one softmax over a raw-token sliding
window plus compressed entries.

The same algorithm as `compressed_gpu` (read its docstring first), laid out for the TPU:
  * one grid step per (batch, token), all N heads as the sublane rows of the [N, H] x [H, k] matmuls;
  * K=V rows stay in HBM and are DMA'd into VMEM: the window as one contiguous copy, CSA's top-k rows one
    DMA per index (block_k rows per chunk), HCA's visible prefix one copy per block; compressed chunks are
    double-buffered so the next chunk streams in while this one is multiplied;
  * CSA's dK=dV of the gathered rows (csa_attention's dkv): "atomic" is a read-modify-write of an fp32
    HBM buffer inside the sequential ("arbitrary") dQ grid: repeated indices within a chunk are first summed
    (an equality-matrix matmul), so duplicate rows write identical values; "staged" lets the (parallel) dQ
    grid write each slot's row to HBM, a token chunk at a time, and a key-major kernel per entry block sum
    the rows of its slots (one DMA per row); "inverted" walks, per entry block, the tokens that selected
    it, DMAs their q, dO and top-k row one token at a time and recomputes P (not pipelined);
  * the key-major dK=dV kernel keeps keys on sublanes and the (token, head) rows on lanes, so the per-row
    log-sum-exp, delta, token and bound arrive as compact [1, rows] vectors.

Shapes: B batch, T tokens, N heads, H head dim, C compressed entries (padded to Cp), K top-k slots
(padded to Kp = Kc * block_k), L = w_pad + padded T raw rows, R rows (t, n) flattened. Tiles: n heads,
h head dim, k keys of a block or window, r rows.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.common import (F32, BlockSizes, cdiv, dot, dot_nt, dot_tn, first_entry, pad_axis, round_up,
                                   tpu_precision)
from pallas_kernels.compressed_inverted import inverted_index

# CSA dkv="staged": bytes of per-slot dK=dV rows the dQ kernel stages per token chunk.
STAGE_BYTES = 1 << 30


def _col_to_row(x_n1):
    """[N, 1] -> [1, N] without a transpose (masked sublane reduction)."""
    n = x_n1.shape[0]
    eye = lax.broadcasted_iota(jnp.int32, (n, n), 0) == lax.broadcasted_iota(jnp.int32, (n, n), 1)
    return jnp.sum(jnp.where(eye, x_n1, 0.0), axis=0, keepdims=True)


def _row_to_col(x_1n):
    n = x_1n.shape[1]
    eye = lax.broadcasted_iota(jnp.int32, (n, n), 0) == lax.broadcasted_iota(jnp.int32, (n, n), 1)
    return jnp.sum(jnp.where(eye, x_1n, 0.0), axis=1, keepdims=True)


class _CompressedChunks:
    """DMA of compressed block j into slot (0/1) of a [2, bk, H] VMEM buffer: CSA gathers one row per
    top-k index (-1 reads row 0 and is masked later), HCA copies entries [j*bk, (j+1)*bk)."""

    def __init__(self, comp_hbm, buf, sems, b, idx_smem, bk: int):
        self.comp_hbm, self.buf, self.sems, self.b, self.idx_smem, self.bk = comp_hbm, buf, sems, b, idx_smem, bk

    def _row_copy(self, j, slot, r):
        i = jnp.maximum(self.idx_smem[0, j * self.bk + r], 0)
        return pltpu.make_async_copy(self.comp_hbm.at[self.b, pl.ds(i, 1)], self.buf.at[slot, pl.ds(r, 1)],
                                     self.sems.at[slot])

    def _block_copy(self, j, slot):
        return pltpu.make_async_copy(self.comp_hbm.at[self.b, pl.ds(j * self.bk, self.bk)], self.buf.at[slot],
                                     self.sems.at[slot])

    def _each_copy(self, j, slot, action: str):
        if self.idx_smem is None:
            getattr(self._block_copy(j, slot), action)()
            return

        def row(r, carry):
            getattr(self._row_copy(j, slot, r), action)()
            return carry

        lax.fori_loop(0, self.bk, row, 0)

    def start(self, j, slot):
        self._each_copy(j, slot, "start")

    def wait(self, j, slot):
        self._each_copy(j, slot, "wait")


def _walk(kv_hbm, comp_hbm, idx_smem, idx_vmem, win_buf, comp_buf, sems, *, b, t, lo, count,
          ratio: int | None, window: int, w_pad: int, bk: int, body, carry):
    """Runs body(carry, keys [k, H], visible [1, k], chunk) over the window and then over the compressed
    chunks (chunk = (j, slot) for those, None for the window), overlapping DMAs with compute. HCA (ratio
    given) sees entries [lo // ratio, count): an entry belongs to the segment of its last token."""
    window_copy = pltpu.make_async_copy(kv_hbm.at[b, pl.ds(t + 1, w_pad)], win_buf, sems.at[2])
    window_copy.start()
    chunks = _CompressedChunks(comp_hbm, comp_buf, sems, b, idx_smem, bk)
    n_chunks = cdiv(count, bk)
    first = first_entry(lo, ratio)
    j0 = lax.div(first, bk)

    @pl.when(n_chunks > j0)
    def _():
        chunks.start(j0, lax.rem(j0, 2))

    window_copy.wait()
    pos_1w = t + 1 - w_pad + lax.broadcasted_iota(jnp.int32, (1, w_pad), 1)
    carry = body(carry, win_buf[...], pos_1w >= jnp.maximum(lo, t - window + 1), None)

    def chunk(j, carry):
        slot = lax.rem(j, 2)

        @pl.when(j + 1 < n_chunks)
        def _():
            chunks.start(j + 1, 1 - slot)

        chunks.wait(j, slot)
        if idx_vmem is None:
            s_1k = j * bk + lax.broadcasted_iota(jnp.int32, (1, bk), 1)
            visible_1k = (s_1k >= first) & (s_1k < count)
        else:
            visible_1k = idx_vmem[pl.ds(j, 1), :] >= 0
        return body(carry, comp_buf[slot], visible_1k, (j, slot))

    return lax.fori_loop(j0, n_chunks, chunk, carry)


def _forward_kernel(*refs, sparse: bool, window: int, w_pad: int, ratio: int | None, scale: float, bk: int):
    if sparse:
        (info_ref, idx_smem, idx_vmem, q_ref, sinks_ref, kv_hbm, comp_hbm, o_ref, lse_ref,
         win_buf, comp_buf, sems) = refs
    else:
        info_ref, q_ref, sinks_ref, kv_hbm, comp_hbm, o_ref, lse_ref, win_buf, comp_buf, sems = refs
        idx_smem = idx_vmem = None
    q_nh = q_ref[...]
    precision = tpu_precision(q_nh.dtype)

    def online_softmax(carry, keys_kh, visible_1k, chunk):
        acc_nh, m_n1, l_n1 = carry
        s_nk = jnp.where(visible_1k, dot_nt(q_nh, keys_kh, precision) * scale, -jnp.inf)
        m_new = jnp.maximum(m_n1, jnp.max(s_nk, axis=1, keepdims=True))
        alpha_n1 = jnp.exp(m_n1 - m_new)
        p_nk = jnp.exp(s_nk - m_new)
        acc_nh = acc_nh * alpha_n1 + dot(p_nk.astype(keys_kh.dtype), keys_kh, precision)
        return acc_nh, m_new, l_n1 * alpha_n1 + jnp.sum(p_nk, axis=1, keepdims=True)

    # The sink only enters the denominator: it seeds the running max and sum (exp(sink - sink) = 1).
    carry = (jnp.zeros(q_nh.shape, F32), sinks_ref[...], jnp.ones((q_nh.shape[0], 1), F32))
    acc_nh, m_n1, l_n1 = _walk(
        kv_hbm, comp_hbm, idx_smem, idx_vmem, win_buf, comp_buf, sems, b=pl.program_id(0),
        t=pl.program_id(1), lo=info_ref[0, 0], count=info_ref[0, 1], ratio=ratio, window=window, w_pad=w_pad,
        bk=bk, body=online_softmax, carry=carry)
    o_ref[...] = (acc_nh / l_n1).astype(o_ref.dtype)
    lse_ref[...] = _col_to_row(m_n1 + jnp.log(l_n1))


def _dq_kernel(*refs, sparse: bool, dkv_out: str | None, window: int, w_pad: int, ratio: int | None,
               scale: float, bk: int):
    """dQ of one token. CSA's gathered rows also get their dK=dV here when dkv_out says so: "atomic"
    read-modify-writes them into dcomp (sequential grid), "staged" writes them per slot into g [Kp, H]
    (a token chunk at a time: token = t0 + program id)."""
    refs = list(refs)
    t0 = refs.pop(0)[0] if dkv_out == "staged" else 0
    if sparse:
        info_ref, idx_smem, idx_vmem, q_ref, do_ref, lse_ref, delta_ref, kv_hbm, comp_hbm = refs[:9]
    else:
        (info_ref, q_ref, do_ref, lse_ref, delta_ref, kv_hbm, comp_hbm), idx_smem, idx_vmem = refs[:7], None, None
    rest = refs[9 if sparse else 7:]
    if dkv_out == "atomic":
        _, dq_ref, dcomp_hbm, win_buf, comp_buf, sems, rmw_buf, rmw_sem = rest
    elif dkv_out == "staged":
        dq_ref, g_ref, win_buf, comp_buf, sems = rest
    else:
        dq_ref, win_buf, comp_buf, sems = rest
    b = pl.program_id(0)
    q_nh, do_nh = q_ref[...], do_ref[...]
    lse_n1, delta_n1 = _row_to_col(lse_ref[...]), _row_to_col(delta_ref[...])
    precision = tpu_precision(q_nh.dtype)

    def accumulate_dq(dq_nh, keys_kh, visible_1k, chunk):
        s_nk = jnp.where(visible_1k, dot_nt(q_nh, keys_kh, precision) * scale, -jnp.inf)
        p_nk = jnp.exp(s_nk - lse_n1)
        ds_nk = p_nk * (dot_nt(do_nh, keys_kh, precision) - delta_n1)
        if dkv_out is not None and chunk is not None:
            # dK = scale dS^T Q and dV = P^T dO land on the same gathered K=V rows.
            g_kh = (scale * dot_tn(ds_nk.astype(q_nh.dtype), q_nh, precision)
                    + dot_tn(p_nk.astype(do_nh.dtype), do_nh, precision))
            if dkv_out == "atomic":
                _read_modify_write(dcomp_hbm, rmw_buf, rmw_sem, idx_smem, idx_vmem, b, chunk[0], g_kh, bk)
            else:
                g_ref[pl.ds(pl.multiple_of(chunk[0] * bk, bk), bk), :] = g_kh.astype(g_ref.dtype)
        return dq_nh + dot(ds_nk.astype(keys_kh.dtype), keys_kh, precision)

    dq_nh = _walk(kv_hbm, comp_hbm, idx_smem, idx_vmem, win_buf, comp_buf, sems, b=b,
                  t=t0 + pl.program_id(1), lo=info_ref[0, 0], count=info_ref[0, 1], ratio=ratio, window=window,
                  w_pad=w_pad, bk=bk, body=accumulate_dq, carry=jnp.zeros(q_nh.shape, F32))
    dq_ref[...] = (dq_nh * scale).astype(dq_ref.dtype)


def _read_modify_write(dcomp_hbm, rmw_buf, rmw_sem, idx_smem, idx_vmem, b, j, g_kh, bk: int):
    """dcomp[idx[j*bk + r]] += g[r] for the valid slots of chunk j: all reads, one add, all writes.
    Repeated indices are summed first so every copy of a row writes the same total."""
    idx_kk = jnp.broadcast_to(idx_vmem[pl.ds(j, 1), :], (bk, bk))      # [r, c] = idx[c]
    same_kk = (idx_kk == idx_kk.T) & (idx_kk >= 0)
    g_kh = dot(same_kk.astype(F32), g_kh)

    def for_valid_slots(action: str, to_hbm: bool):
        def one(r, carry):
            i = idx_smem[0, j * bk + r]
            hbm_row, vmem_row = dcomp_hbm.at[b, pl.ds(jnp.maximum(i, 0), 1)], rmw_buf.at[pl.ds(r, 1)]
            src, dst = (vmem_row, hbm_row) if to_hbm else (hbm_row, vmem_row)
            pl.when(i >= 0)(getattr(pltpu.make_async_copy(src, dst, rmw_sem), action))
            return carry
        lax.fori_loop(0, bk, one, 0)

    for_valid_slots("start", to_hbm=False)
    for_valid_slots("wait", to_hbm=False)
    rmw_buf[...] = rmw_buf[...] + g_kh
    for_valid_slots("start", to_hbm=True)
    for_valid_slots("wait", to_hbm=True)


def _staged_dkv_kernel(range_ref, entries_hbm, selections_hbm, rows_hbm, dk_ref, sel_smem, ent_vmem, g_buf,
                       sems, *, bc: int, bs: int):
    """dK=dV of compressed entries [cb * bc, (cb + 1) * bc) (cb = pl.program_id(1)): the sum of the staged
    rows of the slots that selected them, their run [range[0], range[1]) of the inverted index, bs slots
    at a time: the run's slot positions DMA'd into SMEM, one row DMA per slot, a one-hot [bc, bs] x
    [bs, H] matmul."""
    b = pl.program_id(0)
    lo, hi = range_ref[0, 0], range_ref[0, 1]
    c_c1 = pl.program_id(1) * bc + lax.broadcasted_iota(jnp.int32, (bc, 1), 0)

    def chunk(j, dk_ch):
        at = lo + j * bs
        sel_copy = pltpu.make_async_copy(selections_hbm.at[b, pl.ds(at, bs)], sel_smem, sems.at[0])
        ent_copy = pltpu.make_async_copy(entries_hbm.at[b, pl.ds(0, 1), pl.ds(at, bs)], ent_vmem, sems.at[1])
        sel_copy.start()
        ent_copy.start()
        sel_copy.wait()

        def row_copy(r):
            return pltpu.make_async_copy(rows_hbm.at[b, pl.ds(sel_smem[r], 1)], g_buf.at[pl.ds(r, 1)], sems.at[2])

        lax.fori_loop(0, bs, lambda r, c: (row_copy(r).start(), c)[1], 0)
        lax.fori_loop(0, bs, lambda r, c: (row_copy(r).wait(), c)[1], 0)
        ent_copy.wait()
        live_1s = at + lax.broadcasted_iota(jnp.int32, (1, bs), 1) < hi
        onehot_cs = ((c_c1 == ent_vmem[...]) & live_1s).astype(g_buf.dtype)
        live_s1 = at + lax.broadcasted_iota(jnp.int32, (bs, 1), 0) < hi
        g_sh = jnp.where(live_s1, g_buf[...], jnp.zeros((), g_buf.dtype))
        return dk_ch + dot(onehot_cs, g_sh, tpu_precision(g_buf.dtype))

    dk_ref[...] = lax.fori_loop(0, cdiv(hi - lo, bs), chunk, jnp.zeros(dk_ref.shape, F32))


def _selected_dkv_kernel(range_ref, keys_ref, pair_token_hbm, q_hbm, do_hbm, lse_hbm, delta_hbm, idx_hbm, dk_ref,
                         token_smem, q_buf, do_buf, lse_buf, delta_buf, idx_buf, sems, *, scale: float, bc: int):
    """dK=dV of compressed entries [cb * bc, (cb + 1) * bc) (cb = pl.program_id(1)), walking the tokens
    that selected any of them (pairs [range[0], range[1]) of the inverted index): per token its q, dO,
    log-sum-exp, delta and top-k row are DMA'd in, P recomputed against the block's entries, entry c
    weighted by how many of the token's slots name it."""
    b = pl.program_id(0)
    keys_ch = keys_ref[...]
    c_c1 = pl.program_id(1) * bc + lax.broadcasted_iota(jnp.int32, (bc, 1), 0)
    precision = tpu_precision(keys_ch.dtype)

    def pair(p, dk_ch):
        token_copy = pltpu.make_async_copy(pair_token_hbm.at[b, pl.ds(p, 1)], token_smem, sems.at[0])
        token_copy.start()
        token_copy.wait()
        t = token_smem[0]
        copies = [pltpu.make_async_copy(src.at[b, t], dst, sems.at[i + 1]) for i, (src, dst) in enumerate(
            ((q_hbm, q_buf), (do_hbm, do_buf), (lse_hbm, lse_buf), (delta_hbm, delta_buf), (idx_hbm, idx_buf)))]
        for copy in copies:
            copy.start()
        for copy in copies:
            copy.wait()
        q_nh, do_nh = q_buf[...], do_buf[...]
        weight_1c = _col_to_row(jnp.sum((c_c1 == idx_buf[...]).astype(F32), axis=1, keepdims=True))
        s_nc = jnp.where(weight_1c > 0, dot_nt(q_nh, keys_ch, precision) * scale, -jnp.inf)
        p_nc = jnp.exp(s_nc - _row_to_col(lse_buf[...]))
        ds_nc = p_nc * (dot_nt(do_nh, keys_ch, precision) - _row_to_col(delta_buf[...]))
        return (dk_ch + scale * dot_tn((ds_nc * weight_1c).astype(q_nh.dtype), q_nh, precision)
                + dot_tn((p_nc * weight_1c).astype(do_nh.dtype), do_nh, precision))

    dk_ref[...] = lax.fori_loop(range_ref[0, 0], range_ref[0, 1], pair, jnp.zeros(dk_ref.shape, F32))


def _row_range(kb, *, window: int | None, ratio: int | None, bk: int, br: int, heads: int, n_tokens: int,
               xp=jnp):
    """[first, end) row blocks of the (token, head) rows that can see key block kb (xp=np: static)."""
    s0 = kb * bk
    if window is not None:
        t_begin, t_end = s0, xp.minimum(n_tokens, s0 + bk + window - 1)
    else:
        t_begin, t_end = xp.minimum((s0 + 1) * ratio - 1, n_tokens), n_tokens
    div = np.floor_divide if xp is np else lax.div  # operands are non-negative
    return div(t_begin * heads, br), div(t_end * heads + br - 1, br)


def _dkv_kernel(keys_ref, q_ref, do_ref, lse_ref, delta_ref, tok_ref, lo_ref, count_ref, dk_ref, acc_ref, *,
                window: int | None, ratio: int | None, scale: float, bk: int, br: int, heads: int,
                n_tokens: int):
    """dK=dV of key block kb accumulated over grid steps j (row block first(kb) + j); see compressed_gpu."""
    kb, j = pl.program_id(1), pl.program_id(2)
    first, end = _row_range(kb, window=window, ratio=ratio, bk=bk, br=br, heads=heads, n_tokens=n_tokens)

    @pl.when(j == 0)
    def _():
        acc_ref[...] = jnp.zeros(acc_ref.shape, F32)

    @pl.when(first + j < end)
    def _():
        keys_kh, q_rh, do_rh = keys_ref[...], q_ref[...], do_ref[...]
        precision = tpu_precision(q_rh.dtype)
        s_k1 = kb * bk + lax.broadcasted_iota(jnp.int32, (bk, 1), 0)
        t_1r, lo_1r = tok_ref[...], lo_ref[...]
        if window is not None:
            visible_kr = (s_k1 >= lo_1r) & (s_k1 <= t_1r) & (s_k1 > t_1r - window)
        else:
            visible_kr = (s_k1 >= first_entry(lo_1r, ratio)) & (s_k1 < count_ref[...])
        s_kr = jnp.where(visible_kr, dot_nt(keys_kh, q_rh, precision) * scale, -jnp.inf)
        p_kr = jnp.exp(s_kr - lse_ref[...])
        ds_kr = p_kr * (dot_nt(keys_kh, do_rh, precision) - delta_ref[...])
        acc_ref[...] += (scale * dot(ds_kr.astype(q_rh.dtype), q_rh, precision)
                         + dot(p_kr.astype(do_rh.dtype), do_rh, precision))

    @pl.when(j == pl.num_programs(2) - 1)
    def _():
        dk_ref[...] = acc_ref[...]


def _pad_inputs(kv_BTH, comp_BCH, idx_BTK, *, window: int, blocks: BlockSizes):
    T = kv_BTH.shape[1]
    bk, bkv = blocks.block_k, blocks.block_kv_bwd
    w_pad = round_up(window, max(8, bkv))
    kv = pad_axis(kv_BTH, 1, w_pad + round_up(T, bkv), before=w_pad)
    comp = pad_axis(comp_BCH, 1, round_up(max(comp_BCH.shape[1], 1), max(bk, bkv)))
    idx = None if idx_BTK is None else pad_axis(idx_BTK, 2, round_up(idx_BTK.shape[2], bk), value=-1)
    return kv, comp, idx, w_pad


def _token_operands(q_BTNH, idx_BTK, lo_BT, count_BT, bk: int):
    """Per-token scalars (window start, compressed count) and CSA's indices, with their BlockSpecs for
    the (B, T) grid: SMEM copies address the DMAs, a VMEM copy [Kc, bk] masks the -1 slots."""
    B, T, N, H = q_BTNH.shape
    info = jnp.stack([lo_BT, count_BT], axis=-1)[:, :, None, :]
    operands = [info]
    specs = [pl.BlockSpec((None, None, 1, 2), lambda b, t: (b, t, 0, 0), memory_space=pltpu.SMEM)]
    if idx_BTK is not None:
        Kp = idx_BTK.shape[2]
        operands += [idx_BTK[:, :, None, :], idx_BTK.reshape(B, T, Kp // bk, bk)]
        specs += [pl.BlockSpec((None, None, 1, Kp), lambda b, t: (b, t, 0, 0), memory_space=pltpu.SMEM),
                  pl.BlockSpec((None, None, Kp // bk, bk), lambda b, t: (b, t, 0, 0))]
    return operands, specs


def _scratch(kv, comp, w_pad: int, bk: int):
    H = kv.shape[2]
    return [pltpu.VMEM((w_pad, H), kv.dtype), pltpu.VMEM((2, bk, H), comp.dtype),
            pltpu.SemaphoreType.DMA((3,))]


def forward(q_BTNH, kv_BTH, comp_BCH, idx_BTK, sinks_N, lo_BT, count_BT, *, window: int, ratio: int | None,
            scale: float, blocks: BlockSizes, interpret) -> tuple[jax.Array, jax.Array]:
    """O [B, T, N, H] and the log-sum-exp [B, T, N] (float32, sink included). ratio: HCA's (None for CSA)."""
    B, T, N, H = q_BTNH.shape
    sparse = idx_BTK is not None
    bk = blocks.block_k
    kv, comp, idx, w_pad = _pad_inputs(kv_BTH, comp_BCH, idx_BTK, window=window, blocks=blocks)
    operands, specs = _token_operands(q_BTNH, idx, lo_BT, count_BT, bk)
    head_rows = pl.BlockSpec((None, None, N, H), lambda b, t: (b, t, 0, 0))
    head_vec = pl.BlockSpec((None, None, 1, N), lambda b, t: (b, t, 0, 0))
    hbm = pl.BlockSpec(memory_space=pl.ANY)
    kernel = functools.partial(_forward_kernel, sparse=sparse, window=window, w_pad=w_pad, ratio=ratio,
                               scale=scale, bk=bk)
    o, lse = pl.pallas_call(
        kernel, grid=(B, T),
        in_specs=[*specs, head_rows, pl.BlockSpec((N, 1), lambda b, t: (0, 0)), hbm, hbm],
        out_specs=[head_rows, head_vec],
        out_shape=[jax.ShapeDtypeStruct(q_BTNH.shape, q_BTNH.dtype), jax.ShapeDtypeStruct((B, T, 1, N), F32)],
        scratch_shapes=_scratch(kv, comp, w_pad, bk),
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel")),
        interpret=interpret, name="csa_forward" if sparse else "hca_forward",
    )(*operands, q_BTNH, sinks_N.astype(F32)[:, None], kv, comp)
    return o, lse[:, :, 0]


def _dq_call(q_BTNH, do_BTNH, lse_BTN, delta_BTN, idx, lo_BT, count_BT, kv, comp, *, dkv_out: str | None,
             window: int, w_pad: int, ratio: int | None, scale: float, bk: int, interpret, t0=None):
    """The dQ pallas_call over q's tokens (grid (B, T)); returns dQ and, by dkv_out, CSA's dcomp [B, Cp, H]
    ("atomic") or staged per-slot rows [B, T, Kp, H] ("staged", q holding the tokens t0 + [0, T))."""
    B, T, N, H = q_BTNH.shape
    sparse = idx is not None
    operands, specs = _token_operands(q_BTNH, idx, lo_BT, count_BT, bk)
    head_rows = pl.BlockSpec((None, None, N, H), lambda b, t: (b, t, 0, 0))
    head_vec = pl.BlockSpec((None, None, 1, N), lambda b, t: (b, t, 0, 0))
    hbm = pl.BlockSpec(memory_space=pl.ANY)
    operands += [q_BTNH, do_BTNH, lse_BTN[:, :, None], delta_BTN[:, :, None], kv, comp]
    specs += [head_rows, head_rows, head_vec, head_vec, hbm, hbm]
    out_specs, out_shape = [head_rows], [jax.ShapeDtypeStruct(q_BTNH.shape, q_BTNH.dtype)]
    scratch = _scratch(kv, comp, w_pad, bk)
    aliases = {}
    if dkv_out == "atomic":
        operands.append(jnp.zeros(comp.shape, F32))
        specs.append(hbm)
        out_specs.append(hbm)
        out_shape.append(jax.ShapeDtypeStruct(comp.shape, F32))
        scratch += [pltpu.VMEM((bk, H), F32), pltpu.SemaphoreType.DMA(())]
        aliases = {len(operands) - 1: 1}
    elif dkv_out == "staged":
        Kp = idx.shape[2]
        out_specs.append(pl.BlockSpec((None, None, Kp, H), lambda b, t: (b, t, 0, 0)))
        out_shape.append(jax.ShapeDtypeStruct((B, T, Kp, H), q_BTNH.dtype))
        operands.insert(0, t0)
        specs.insert(0, pl.BlockSpec(memory_space=pltpu.SMEM))
    # The read-modify-write of shared rows needs a sequential grid.
    semantics = ("arbitrary", "arbitrary") if dkv_out == "atomic" else ("parallel", "parallel")
    kernel = functools.partial(_dq_kernel, sparse=sparse, dkv_out=dkv_out, window=window, w_pad=w_pad,
                               ratio=ratio, scale=scale, bk=bk)
    return pl.pallas_call(
        kernel, grid=(B, T), in_specs=specs, out_specs=out_specs, out_shape=out_shape,
        scratch_shapes=scratch, input_output_aliases=aliases,
        compiler_params=pltpu.CompilerParams(dimension_semantics=semantics),
        interpret=interpret, name="csa_dq" if sparse else "hca_dq",
    )(*operands)


def _staged(dq_call, q_BTNH, do_BTNH, lse_BTN, delta_BTN, idx, lo_BT, count_BT, kv_BTH, comp, *, window: int,
            blocks: BlockSizes, interpret):
    """CSA's dQ [B, T, N, H] and dK=dV of the compressed entries [B, Cp, H] (float32) without the
    sequential read-modify-write: a token chunk at a time (sized to STAGE_BYTES), the dQ kernel writes
    each slot's dK=dV row and a key-major kernel sums them per entry block over the chunk's inverted
    index. Padding tokens (lo past the end, no slots) see nothing."""
    B, T, N, H = q_BTNH.shape
    Kp, Cp = idx.shape[2], comp.shape[1]
    chunk = max(1, min(T, STAGE_BYTES // (Kp * H * q_BTNH.dtype.itemsize)))
    n_chunks = -(-T // chunk)
    split = lambda x, fill=0: jnp.swapaxes(pad_axis(x, 1, n_chunks * chunk, value=fill).reshape(
        B, n_chunks, chunk, *x.shape[2:]), 0, 1)
    kv, _, _, _ = _pad_inputs(pad_axis(kv_BTH, 1, n_chunks * chunk), comp[:, :0], None, window=window,
                              blocks=blocks)
    xs = (jnp.arange(n_chunks, dtype=jnp.int32) * chunk, split(q_BTNH), split(do_BTNH), split(lse_BTN),
          split(delta_BTN), split(idx, -1), split(lo_BT, n_chunks * chunk), split(count_BT))
    bc, bs = blocks.block_kv_bwd, blocks.block_k
    n_blocks = Cp // bc
    sem = pltpu.SemaphoreType.DMA

    def step(dcomp, x):
        t0, q, do, lse, delta, idx, lo, count = x
        dq, rows = dq_call(q, do, lse, delta, idx, lo, count, kv, comp, t0=t0[None])
        index = inverted_index(idx, num_blocks=n_blocks, block=bc, pad=bs)
        run_B1G = jnp.take_along_axis(index.pair_start, index.block_start, axis=1)[:, None, :]
        ranges = jnp.stack([run_B1G[:, :, :-1], run_B1G[:, :, 1:]], axis=-1)       # [B, 1, NB, 2]
        hbm = pl.BlockSpec(memory_space=pl.ANY)
        dk = pl.pallas_call(
            functools.partial(_staged_dkv_kernel, bc=bc, bs=bs), grid=(B, n_blocks),
            in_specs=[pl.BlockSpec((None, None, 1, 2), lambda b, cb: (b, 0, cb, 0), memory_space=pltpu.SMEM),
                      hbm, hbm, hbm],
            out_specs=pl.BlockSpec((None, bc, H), lambda b, cb: (b, cb, 0)),
            out_shape=jax.ShapeDtypeStruct((B, Cp, H), F32),
            scratch_shapes=[pltpu.SMEM((bs,), jnp.int32), pltpu.VMEM((1, bs), jnp.int32),
                            pltpu.VMEM((bs, H), rows.dtype), sem((3,))],
            compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel")),
            interpret=interpret, name="csa_staged_dkv",
        )(ranges, index.entries[:, None, :], index.selections, rows.reshape(B, chunk * Kp, H))
        return dcomp + dk, dq

    dcomp, dq = lax.scan(step, jnp.zeros((B, Cp, H), F32), xs)
    return jnp.swapaxes(dq, 0, 1).reshape(B, n_chunks * chunk, N, H)[:, :T], dcomp


def backward(q_BTNH, kv_BTH, comp_BCH, idx_BTK, sinks_N, lo_BT, count_BT, do_BTNH, lse_BTN, delta_BTN, *,
             window: int, ratio: int | None, scale: float, blocks: BlockSizes, interpret, dkv: str = "atomic"
             ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """dQ [B, T, N, H] (q dtype), dKV [B, T, H] and dKV_comp [B, C, H] (float32). dkv: see compressed_gpu."""
    del sinks_N  # enters through the log-sum-exp
    B, T, N, H = q_BTNH.shape
    C = comp_BCH.shape[1]
    sparse = idx_BTK is not None
    bk = blocks.block_k
    kv, comp, idx, w_pad = _pad_inputs(kv_BTH, comp_BCH, idx_BTK, window=window, blocks=blocks)
    do_BTNH = do_BTNH.astype(q_BTNH.dtype)

    # dQ per token, for CSA with (atomic, staged) or without (inverted) the selected rows' dK=dV.
    dkv_out = dkv if sparse and dkv != "inverted" else None
    dq_call = functools.partial(_dq_call, dkv_out=dkv_out, window=window, w_pad=w_pad, ratio=ratio, scale=scale,
                                bk=bk, interpret=interpret)
    if dkv_out == "staged":
        dq, dcomp = _staged(dq_call, q_BTNH, do_BTNH, lse_BTN, delta_BTN, idx, lo_BT, count_BT, kv_BTH, comp,
                            window=window, blocks=blocks, interpret=interpret)
        dcomp = [dcomp]
    else:
        dq, *dcomp = dq_call(q_BTNH, do_BTNH, lse_BTN, delta_BTN, idx, lo_BT, count_BT, kv, comp)

    # dK=dV key-major: keys on sublanes, (token, head) rows on lanes.
    br, bkv = blocks.block_rows_bwd, blocks.block_kv_bwd
    R = round_up(T * N, br)
    rows = lambda x: pad_axis(x.reshape(B, T * N, H), 1, R)
    lanes = lambda x_BTN, fill=0: pad_axis(x_BTN.reshape(B, 1, T * N), 2, R, value=fill)
    per_row = lambda x_BT: lanes(jnp.broadcast_to(x_BT[:, :, None], (B, T, N)))
    tok = lanes(jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32)[None, :, None], (B, T, N)), fill=-1)
    row_operands = [rows(q_BTNH), rows(do_BTNH), lanes(lse_BTN), lanes(delta_BTN), tok]

    def key_major(keys, n_keys, key_block_offset, **rule):
        n_kb = round_up(n_keys, bkv) // bkv
        row_range = functools.partial(_row_range, bk=bkv, br=br, heads=N, n_tokens=T, **rule)
        firsts, ends = row_range(np.arange(n_kb), xp=np)
        n_steps = max(1, int(np.max(ends - firsts)))

        def row_block(b, kb, j):
            first, end = row_range(kb)
            return b, jnp.clip(first + j, 0, jnp.maximum(end - 1, 0)), 0

        row_spec = pl.BlockSpec((None, br, H), row_block)
        lane_spec = pl.BlockSpec((None, 1, br), lambda b, kb, j: (b, 0, row_block(b, kb, j)[1]))
        kernel = functools.partial(_dkv_kernel, scale=scale, bk=bkv, br=br, heads=N, n_tokens=T, **rule)
        return pl.pallas_call(
            kernel, grid=(B, n_kb, n_steps),
            in_specs=[pl.BlockSpec((None, bkv, H), lambda b, kb, j: (b, kb + key_block_offset, 0)),
                      row_spec, row_spec, lane_spec, lane_spec, lane_spec, lane_spec, lane_spec],
            out_specs=pl.BlockSpec((None, bkv, H), lambda b, kb, j: (b, kb, 0)),
            out_shape=jax.ShapeDtypeStruct((B, n_kb * bkv, H), F32),
            scratch_shapes=[pltpu.VMEM((bkv, H), F32)],
            compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary")),
            interpret=interpret, name="window_dkv" if rule["window"] else "hca_dkv",
        )(keys, *row_operands, per_row(lo_BT), per_row(count_BT))[:, :n_keys]

    dkv = key_major(kv, T, w_pad // bkv, window=window, ratio=None)
    if dkv_out is not None:
        dcomp = dcomp[0][:, :C]
    elif sparse:
        dcomp = _selected_dkv(q_BTNH, do_BTNH, lse_BTN, delta_BTN, idx, comp, scale=scale, bc=bkv,
                              interpret=interpret)[:, :C]
    elif C == 0:
        dcomp = jnp.zeros((B, 0, H), F32)
    else:
        dcomp = key_major(comp, C, 0, window=None, ratio=ratio)
    return dq, dkv, dcomp


def _selected_dkv(q_BTNH, do_BTNH, lse_BTN, delta_BTN, idx, comp, *, scale: float, bc: int, interpret):
    """CSA's dK=dV of the compressed entries [B, Cp, H] (float32), key-major over the inverted index of
    the top-k with P recomputed: one program per (batch, entry block)."""
    B, T, N, H = q_BTNH.shape
    Kp, Cp = idx.shape[2], comp.shape[1]
    index = inverted_index(idx, num_blocks=Cp // bc, block=bc)
    ranges = jnp.stack([index.block_start[:, :-1], index.block_start[:, 1:]], axis=-1)[:, None]  # [B, 1, NB, 2]
    hbm = pl.BlockSpec(memory_space=pl.ANY)
    return pl.pallas_call(
        functools.partial(_selected_dkv_kernel, scale=scale, bc=bc), grid=(B, Cp // bc),
        in_specs=[pl.BlockSpec((None, None, 1, 2), lambda b, cb: (b, 0, cb, 0), memory_space=pltpu.SMEM),
                  pl.BlockSpec((None, bc, H), lambda b, cb: (b, cb, 0)), hbm, hbm, hbm, hbm, hbm, hbm],
        out_specs=pl.BlockSpec((None, bc, H), lambda b, cb: (b, cb, 0)),
        out_shape=jax.ShapeDtypeStruct((B, Cp, H), F32),
        scratch_shapes=[pltpu.SMEM((1,), jnp.int32), pltpu.VMEM((N, H), q_BTNH.dtype),
                        pltpu.VMEM((N, H), q_BTNH.dtype), pltpu.VMEM((1, N), F32), pltpu.VMEM((1, N), F32),
                        pltpu.VMEM((1, Kp), jnp.int32), pltpu.SemaphoreType.DMA((6,))],
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel")),
        interpret=interpret, name="csa_selected_dkv",
    )(ranges, comp, index.pair_token, q_BTNH, do_BTNH, lse_BTN[:, :, None], delta_BTN[:, :, None], idx[:, :, None])
