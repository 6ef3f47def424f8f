"""Mosaic TPU lowering of the lightning indexer's scores (`indexer.py`) and their backward.

Entries lie on sublanes and the R = bt * N (token, head) rows of a tile on lanes; a 0/1 token-selector
matmul sums the heads, so [B, T, N, C] never exists. Index maps clamp invisible blocks onto visible ones,
so the grid steps skipped by `pl.when` fetch nothing new.

Shapes: B batch, T tokens, N index heads, N index head dim, C compressed entries (padded to Cp). Tiles:
r rows, t tokens, s entries of a block, h head dim.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.common import F32, dot, dot_nt, dot_tn, pad_axis, round_up, tpu_precision, visible_entries


def _token_selector(bt: int, heads: int):
    """[bt, bt * N] float 0/1: row c selects the N (token c, head) lanes; sums heads by a matmul."""
    c = lax.broadcasted_iota(jnp.int32, (bt, bt * heads), 0)
    r = lax.broadcasted_iota(jnp.int32, (bt, bt * heads), 1)
    return ((r >= c * heads) & (r < (c + 1) * heads)).astype(F32)


def _tile(q_ref, k_ref, *, first_t, sb, ratio, bt, bs, heads, n_entries):
    """Entries on sublanes, (token, head) rows on lanes: z^T [bs, R], the visibility [bt, bs] and the
    token selector; the tile's tokens are first_t, first_t + 1, ..."""
    q_rh, k_sh = q_ref[...], k_ref[...]
    precision = tpu_precision(q_rh.dtype)
    zt_sr = dot_nt(k_sh, q_rh, precision)
    t_t1 = first_t + lax.broadcasted_iota(jnp.int32, (bt, 1), 0)
    s_1s = sb * bs + lax.broadcasted_iota(jnp.int32, (1, bs), 1)
    return zt_sr, s_1s < visible_entries(t_t1, ratio, n_entries), _token_selector(bt, heads), precision


def _scores_kernel(t0_ref, q_ref, k_ref, w_ref, out_ref, *, ratio, bt, bs, heads, n_entries):
    first_t, sb = t0_ref[0] + pl.program_id(1) * bt, pl.program_id(2)
    live = sb * bs < visible_entries(first_t + bt - 1, ratio, n_entries)

    @pl.when(live)
    def _():
        zt_sr, visible_ts, select_tr, _ = _tile(q_ref, k_ref, first_t=first_t, sb=sb, ratio=ratio, bt=bt, bs=bs,
                                                heads=heads, n_entries=n_entries)
        yt_sr = jnp.maximum(zt_sr, 0.0) * w_ref[...]
        scores_ts = dot_nt(select_tr, yt_sr)
        out_ref[...] = jnp.where(visible_ts, scores_ts, -jnp.inf)

    @pl.when(jnp.logical_not(live))
    def _():
        out_ref[...] = jnp.full(out_ref.shape, -jnp.inf, F32)


def _tile_grads(q_ref, k_ref, w_ref, ds_ref, **tile):
    """g^T = dI * w * 1[z > 0] and dI broadcast over heads, both [bs, R] (entries on sublanes)."""
    zt_sr, visible_ts, select_tr, precision = _tile(q_ref, k_ref, **tile)
    d_ts = jnp.where(visible_ts, ds_ref[...], 0.0)
    dt_sr = dot_tn(d_ts, select_tr)
    return jnp.where(zt_sr > 0, dt_sr * w_ref[...], 0.0), dt_sr, zt_sr, precision


def _dq_kernel(q_ref, k_ref, w_ref, ds_ref, dq_ref, dw_ref, dq_acc, dw_acc, *, ratio, bt, bs, heads, n_entries):
    tb, sb = pl.program_id(1), pl.program_id(2)

    @pl.when(sb == 0)
    def _():
        dq_acc[...] = jnp.zeros(dq_acc.shape, F32)
        dw_acc[...] = jnp.zeros(dw_acc.shape, F32)

    @pl.when(sb * bs < visible_entries(tb * bt + bt - 1, ratio, n_entries))
    def _():
        gt_sr, dt_sr, zt_sr, precision = _tile_grads(q_ref, k_ref, w_ref, ds_ref, first_t=tb * bt, sb=sb,
                                                     ratio=ratio, bt=bt, bs=bs, heads=heads, n_entries=n_entries)
        k_sh = k_ref[...]
        dq_acc[...] += dot_tn(gt_sr.astype(k_sh.dtype), k_sh, precision)
        dw_acc[...] += jnp.sum(dt_sr * jnp.maximum(zt_sr, 0.0), axis=0, keepdims=True)

    @pl.when(sb == pl.num_programs(2) - 1)
    def _():
        dq_ref[...] = dq_acc[...].astype(dq_ref.dtype)
        dw_ref[...] = dw_acc[...]


def _dk_kernel(q_ref, k_ref, w_ref, ds_ref, dk_ref, dk_acc, *, ratio, bt, bs, heads, n_entries):
    sb, tb = pl.program_id(1), pl.program_id(2)

    @pl.when(tb == 0)
    def _():
        dk_acc[...] = jnp.zeros(dk_acc.shape, F32)

    @pl.when(sb * bs < visible_entries(tb * bt + bt - 1, ratio, n_entries))
    def _():
        gt_sr, _, _, precision = _tile_grads(q_ref, k_ref, w_ref, ds_ref, first_t=tb * bt, sb=sb, ratio=ratio,
                                             bt=bt, bs=bs, heads=heads, n_entries=n_entries)
        q_rh = q_ref[...]
        dk_acc[...] += dot(gt_sr.astype(q_rh.dtype), q_rh, precision)

    @pl.when(tb == pl.num_programs(2) - 1)
    def _():
        dk_ref[...] = dk_acc[...]


class _Layout:
    """Tokens padded to block_t, entries to block_s (blocks: IndexerBlockSizes); (token, head) rows
    flattened: q [B, Tp*N, H] and the weights as a lane vector [B, 1, Tp*N]."""

    def __init__(self, q_BTNH, k_BCH, blocks, ratio: int):
        B, self.T, self.N, H = q_BTNH.shape
        self.C, self.ratio = k_BCH.shape[1], ratio
        self.bt, self.bs = blocks.block_t, blocks.block_s
        self.Tp, self.Cp = round_up(self.T, self.bt), round_up(max(self.C, 1), self.bs)
        self.n_tb, self.n_sb = self.Tp // self.bt, self.Cp // self.bs

    def rows(self, q_BTNH):
        B, T, N, H = q_BTNH.shape
        return pad_axis(q_BTNH, 1, self.Tp).reshape(B, self.Tp * N, H)

    def weights(self, weights_BTN):
        B = weights_BTN.shape[0]
        return pad_axis(weights_BTN.astype(F32), 1, self.Tp).reshape(B, 1, self.Tp * self.N)

    def last_visible_block(self, tb, t0=0):
        n = visible_entries(t0 + tb * self.bt + self.bt - 1, self.ratio, self.C)
        return jnp.maximum(lax.div(n + self.bs - 1, self.bs) - 1, 0)

    def first_token_block(self, sb):
        return jnp.minimum(lax.div((sb * self.bs + 1) * self.ratio - 1, self.bt), self.n_tb - 1)

    def static(self):
        return dict(ratio=self.ratio, bt=self.bt, bs=self.bs, heads=self.N, n_entries=self.C)


def forward(q_BTNH, k_BCH, weights_BTN, t0, *, ratio, blocks, interpret):
    """float32 scores [B, T, C] of tokens t0, t0 + 1, ... (-inf where invisible); blocks: IndexerBlockSizes."""
    L = _Layout(q_BTNH, k_BCH, blocks, ratio)
    B, T, N, H = q_BTNH.shape
    sb_live = lambda tb, sb, t0_ref: jnp.minimum(sb, L.last_visible_block(tb, t0_ref[0]))
    out = pl.pallas_call(
        functools.partial(_scores_kernel, **L.static()),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=1, grid=(B, L.n_tb, L.n_sb),
            in_specs=[pl.BlockSpec((None, L.bt * N, H), lambda b, tb, sb, t0_ref: (b, tb, 0)),
                      pl.BlockSpec((None, L.bs, H), lambda b, tb, sb, t0_ref: (b, sb_live(tb, sb, t0_ref), 0)),
                      pl.BlockSpec((None, 1, L.bt * N), lambda b, tb, sb, t0_ref: (b, 0, tb))],
            out_specs=pl.BlockSpec((None, L.bt, L.bs), lambda b, tb, sb, t0_ref: (b, tb, sb))),
        out_shape=jax.ShapeDtypeStruct((B, L.Tp, L.Cp), F32),
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "parallel")),
        interpret=interpret, name="indexer_scores",
    )(jnp.reshape(t0, (1,)), L.rows(q_BTNH), pad_axis(k_BCH, 1, L.Cp), L.weights(weights_BTN))
    return out[:, :T, :L.C]


def backward(q_BTNH, k_BCH, weights_BTN, dscores_BTC, *, ratio, blocks, interpret):
    """(dq, dk, dweights) of the scores of tokens 0..T-1 (dk and dweights in float32)."""
    L = _Layout(q_BTNH, k_BCH, blocks, ratio)
    B, T, N, H = q_BTNH.shape
    rows = L.bt * N
    q, k, w = L.rows(q_BTNH), pad_axis(k_BCH, 1, L.Cp), L.weights(weights_BTN)
    ds = pad_axis(pad_axis(dscores_BTC.astype(F32), 1, L.Tp), 2, L.Cp)
    sb_live = lambda tb, sb: jnp.minimum(sb, L.last_visible_block(tb))
    dq, dw = pl.pallas_call(
        functools.partial(_dq_kernel, **L.static()),
        grid=(B, L.n_tb, L.n_sb),
        in_specs=[pl.BlockSpec((None, rows, H), lambda b, tb, sb: (b, tb, 0)),
                  pl.BlockSpec((None, L.bs, H), lambda b, tb, sb: (b, sb_live(tb, sb), 0)),
                  pl.BlockSpec((None, 1, rows), lambda b, tb, sb: (b, 0, tb)),
                  pl.BlockSpec((None, L.bt, L.bs), lambda b, tb, sb: (b, tb, sb_live(tb, sb)))],
        out_specs=[pl.BlockSpec((None, rows, H), lambda b, tb, sb: (b, tb, 0)),
                   pl.BlockSpec((None, 1, rows), lambda b, tb, sb: (b, 0, tb))],
        out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct(w.shape, F32)],
        scratch_shapes=[pltpu.VMEM((rows, H), F32), pltpu.VMEM((1, rows), F32)],
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary")),
        interpret=interpret, name="indexer_dq_dw",
    )(q, k, w, ds)
    tb_live = lambda sb, tb: jnp.maximum(tb, L.first_token_block(sb))
    dk = pl.pallas_call(
        functools.partial(_dk_kernel, **L.static()),
        grid=(B, L.n_sb, L.n_tb),
        in_specs=[pl.BlockSpec((None, rows, H), lambda b, sb, tb: (b, tb_live(sb, tb), 0)),
                  pl.BlockSpec((None, L.bs, H), lambda b, sb, tb: (b, sb, 0)),
                  pl.BlockSpec((None, 1, rows), lambda b, sb, tb: (b, 0, tb_live(sb, tb))),
                  pl.BlockSpec((None, L.bt, L.bs), lambda b, sb, tb: (b, tb_live(sb, tb), sb))],
        out_specs=pl.BlockSpec((None, L.bs, H), lambda b, sb, tb: (b, sb, 0)),
        out_shape=jax.ShapeDtypeStruct(k.shape, F32),
        scratch_shapes=[pltpu.VMEM((L.bs, H), F32)],
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary")),
        interpret=interpret, name="indexer_dk",
    )(q, k, w, ds)
    return dq.reshape(B, L.Tp, N, H)[:, :T], dk[:, :L.C], dw.reshape(B, L.Tp, N)[:, :T]


