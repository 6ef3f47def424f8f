"""Triton (Pallas GPU) lowering of the lightning indexer's scores (`indexer.py`) and their backward.

A tile of bt tokens x N index heads, flattened to R = bt * N (token, head) rows, is multiplied against a
block of bs compressed keys and reduced over the heads in registers, so [B, T, N, C] never exists; entry
blocks no token of the tile can see are skipped. Tiles are padded to powers of two.

Shapes: B batch, T tokens, N index heads (padded to Np), N index head dim (padded to Np), C compressed
entries (padded to Cp). Tiles: r rows, t tokens, s entries of a block, h head dim.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.common import F32, dot, dot_nt, dot_tn, next_pow2, pad_axis, round_up, visible_entries


def _scores_kernel(t0_ref, q_ref, k_ref, w_ref, out_ref, *, ratio: int, bt: int, bs: int, heads: int,
                   n_entries: int):
    tb, sb = pl.program_id(0), pl.program_id(1)
    first_t = t0_ref[0] + tb * bt
    t_t = first_t + lax.broadcasted_iota(jnp.int32, (bt,), 0)
    s_s = sb * bs + lax.broadcasted_iota(jnp.int32, (bs,), 0)
    visible_ts = s_s[None, :] < visible_entries(t_t, ratio, n_entries)[:, None]

    @pl.when(sb * bs < visible_entries(first_t + bt - 1, ratio, n_entries))
    def _():
        z_rs = dot_nt(q_ref[...], k_ref[...])
        y_rs = jnp.maximum(z_rs, 0.0) * w_ref[...][:, None]
        out_ref[...] = jnp.where(visible_ts, jnp.sum(y_rs.reshape(bt, heads, bs), axis=1), -jnp.inf)

    @pl.when(sb * bs >= visible_entries(first_t + bt - 1, ratio, n_entries))
    def _():
        out_ref[...] = jnp.full((bt, bs), -jnp.inf, F32)


def _grads(q_rh, k_sh, w_r, dscores_ts, t_t, s_s, *, ratio, bt, bs, heads, n_entries):
    """Recomputes z and returns (g = dI * w * 1[z > 0], dI broadcast to rows, z) for a [rows, bs] tile."""
    visible_ts = s_s[None, :] < visible_entries(t_t, ratio, n_entries)[:, None]
    d_ts = jnp.where(visible_ts, dscores_ts, 0.0)
    d_rs = jnp.broadcast_to(d_ts[:, None, :], (bt, heads, bs)).reshape(bt * heads, bs)
    z_rs = dot_nt(q_rh, k_sh)
    return jnp.where(z_rs > 0, d_rs * w_r[:, None], 0.0), d_rs, z_rs


def _dq_kernel(q_ref, k_ref, w_ref, ds_ref, dq_ref, dw_ref, *, ratio, bt, bs, heads, n_entries):
    tb = pl.program_id(0)
    q_rh, w_r = q_ref[...], w_ref[...]
    t_t = tb * bt + lax.broadcasted_iota(jnp.int32, (bt,), 0)

    def step(j, carry):
        dq_rh, dw_r = carry
        k_sh = k_ref[pl.ds(j * bs, bs), :]
        s_s = j * bs + lax.broadcasted_iota(jnp.int32, (bs,), 0)
        g_rs, d_rs, z_rs = _grads(q_rh, k_sh, w_r, ds_ref[:, pl.ds(j * bs, bs)], t_t, s_s, ratio=ratio, bt=bt,
                                  bs=bs, heads=heads, n_entries=n_entries)
        dq_rh += dot(g_rs.astype(k_sh.dtype), k_sh)
        return dq_rh, dw_r + jnp.sum(d_rs * jnp.maximum(z_rs, 0.0), axis=1)

    n_blocks = lax.div(visible_entries(tb * bt + bt - 1, ratio, n_entries) + bs - 1, bs)
    dq_rh, dw_r = lax.fori_loop(0, n_blocks, step, (jnp.zeros(q_rh.shape, F32), jnp.zeros(w_r.shape, F32)))
    dq_ref[...] = dq_rh.astype(dq_ref.dtype)
    dw_ref[...] = dw_r


def _dk_kernel(q_ref, k_ref, w_ref, ds_ref, dk_ref, *, ratio, bt, bs, heads, n_entries, n_token_blocks,
               split_blocks):
    """dk of entry block pl.program_id(0) from the token blocks of split pl.program_id(1) that see it."""
    s0 = pl.program_id(0) * bs
    k_sh = k_ref[...]
    s_s = s0 + lax.broadcasted_iota(jnp.int32, (bs,), 0)
    rows = bt * heads

    def step(tb, dk_sh):
        q_rh = q_ref[pl.ds(tb * rows, rows), :]
        t_t = tb * bt + lax.broadcasted_iota(jnp.int32, (bt,), 0)
        g_rs, _, _ = _grads(q_rh, k_sh, w_ref[pl.ds(tb * rows, rows)], ds_ref[pl.ds(tb * bt, bt), pl.ds(s0, bs)],
                            t_t, s_s, ratio=ratio, bt=bt, bs=bs, heads=heads, n_entries=n_entries)
        return dk_sh + dot_tn(g_rs.astype(q_rh.dtype), q_rh)

    split_begin = pl.program_id(1) * split_blocks
    first_token = (s0 + 1) * ratio - 1      # the first token that sees entry s0
    tb_begin = jnp.maximum(jnp.minimum(lax.div(first_token, bt), n_token_blocks), split_begin)
    tb_end = jnp.minimum(n_token_blocks, split_begin + split_blocks)
    dk_ref[...] = lax.fori_loop(tb_begin, tb_end, step, jnp.zeros(k_sh.shape, F32))


def block_entries(blocks) -> int:
    """Entries per block of a tile (Triton dots take at least 16)."""
    return max(16, blocks.block_s)


class TileLayout:
    """Padding to power-of-two tiles; (token, head) rows flattened: q [B, Tp*Np, Hp], w [B, Tp*Np]."""

    def __init__(self, q_BTNH, k_BCH, blocks):
        B, self.T, N, H = q_BTNH.shape
        self.C = k_BCH.shape[1]
        self.heads, self.Hp = next_pow2(N), max(16, next_pow2(H))
        self.bt = max(blocks.block_t, 16 // min(self.heads, 16))
        self.bs = block_entries(blocks)
        self.Tp, self.Cp = round_up(self.T, self.bt), round_up(max(self.C, 1), self.bs)
        self.params = plgpu.CompilerParams(num_warps=blocks.num_warps, num_stages=blocks.num_stages)

    def rows(self, q_BTNH):
        B, T, N, H = q_BTNH.shape
        q = pad_axis(pad_axis(pad_axis(q_BTNH, 1, self.Tp), 2, self.heads), 3, self.Hp)
        return q.reshape(B, self.Tp * self.heads, self.Hp)

    def weights(self, weights_BTN):
        B = weights_BTN.shape[0]
        weights = pad_axis(pad_axis(weights_BTN.astype(F32), 1, self.Tp), 2, self.heads)
        return weights.reshape(B, self.Tp * self.heads)

    def keys(self, k_BCH):
        return pad_axis(pad_axis(k_BCH, 1, self.Cp), 2, self.Hp)

    def static(self):
        return dict(bt=self.bt, bs=self.bs, heads=self.heads, n_entries=self.C)


def forward(q_BTNH, k_BCH, weights_BTN, t0, *, ratio, blocks, interpret):
    """float32 scores [B, T, C] of tokens t0, t0 + 1, ... (-inf where invisible); blocks: IndexerBlockSizes."""
    L = TileLayout(q_BTNH, k_BCH, blocks)
    B, rows = q_BTNH.shape[0], L.bt * L.heads
    out = pl.pallas_call(
        functools.partial(_scores_kernel, ratio=ratio, **L.static()),
        grid=(L.Tp // L.bt, L.Cp // L.bs, B),
        in_specs=[pl.BlockSpec((1,), lambda tb, sb, b: (0,)),
                  pl.BlockSpec((None, rows, L.Hp), lambda tb, sb, b: (b, tb, 0)),
                  pl.BlockSpec((None, L.bs, L.Hp), lambda tb, sb, b: (b, sb, 0)),
                  pl.BlockSpec((None, rows), lambda tb, sb, b: (b, tb))],
        out_specs=pl.BlockSpec((None, L.bt, L.bs), lambda tb, sb, b: (b, tb, sb)),
        out_shape=jax.ShapeDtypeStruct((B, L.Tp, L.Cp), F32),
        compiler_params=L.params, interpret=interpret, name="indexer_scores",
    )(jnp.reshape(t0, (1,)), L.rows(q_BTNH), L.keys(k_BCH), L.weights(weights_BTN))
    return out[:, :L.T, :L.C]


def backward(q_BTNH, k_BCH, weights_BTN, dscores_BTC, *, ratio, blocks, interpret):
    """(dq, dk, dweights) of the scores of tokens 0..T-1 (dk and dweights in float32)."""
    L = TileLayout(q_BTNH, k_BCH, blocks)
    B, T, N, H = q_BTNH.shape
    rows, n_tb = L.bt * L.heads, L.Tp // L.bt
    q, k, w = L.rows(q_BTNH), L.keys(k_BCH), L.weights(weights_BTN)
    ds = pad_axis(pad_axis(dscores_BTC.astype(F32), 1, L.Tp), 2, L.Cp)
    dq, dw = pl.pallas_call(
        functools.partial(_dq_kernel, ratio=ratio, **L.static()),
        grid=(n_tb, B),
        in_specs=[pl.BlockSpec((None, rows, L.Hp), lambda tb, b: (b, tb, 0)),
                  pl.BlockSpec((None, L.Cp, L.Hp), lambda tb, b: (b, 0, 0)),
                  pl.BlockSpec((None, rows), lambda tb, b: (b, tb)),
                  pl.BlockSpec((None, L.bt, L.Cp), lambda tb, b: (b, tb, 0))],
        out_specs=[pl.BlockSpec((None, rows, L.Hp), lambda tb, b: (b, tb, 0)),
                   pl.BlockSpec((None, rows), lambda tb, b: (b, tb))],
        out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct(w.shape, F32)],
        compiler_params=L.params, interpret=interpret, name="indexer_dq_dw",
    )(q, k, w, ds)
    # Every token block may see an entry block: split the tokens over programs, add the partial sums.
    n_sb = L.Cp // L.bs
    n_splits = max(1, min(n_tb, -(-512 // n_sb)))
    split_blocks = -(-n_tb // n_splits)
    dk = pl.pallas_call(
        functools.partial(_dk_kernel, ratio=ratio, n_token_blocks=n_tb, split_blocks=split_blocks,
                          **L.static()),
        grid=(n_sb, n_splits, B),
        in_specs=[pl.BlockSpec((None, L.Tp * L.heads, L.Hp), lambda sb, sp, b: (b, 0, 0)),
                  pl.BlockSpec((None, L.bs, L.Hp), lambda sb, sp, b: (b, sb, 0)),
                  pl.BlockSpec((None, L.Tp * L.heads), lambda sb, sp, b: (b, 0)),
                  pl.BlockSpec((None, L.Tp, L.Cp), lambda sb, sp, b: (b, 0, 0))],
        out_specs=pl.BlockSpec((None, None, L.bs, L.Hp), lambda sb, sp, b: (b, sp, sb, 0)),
        out_shape=jax.ShapeDtypeStruct((B, n_splits, *k.shape[1:]), F32),
        compiler_params=L.params, interpret=interpret, name="indexer_dk",
    )(q, k, w, ds).sum(axis=1)
    dq = dq.reshape(B, L.Tp, L.heads, L.Hp)[:, :T, :N, :H]
    dw = dw.reshape(B, L.Tp, L.heads)[:, :T, :N]
    return dq, dk[:, :L.C, :H], dw


