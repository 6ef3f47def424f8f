"""Lightning indexer (DeepSeek-V4 CSA): scores of every query token against the compressed index keys,

    I[t, s] = sum_h w[t, h] * relu(q[t, h] . k[s])   for visible s < (t + 1) // ratio, -inf otherwise,

and the top-k visible entries per token (int32, -1 for slots beyond the number of visible entries).
The kernels fuse the head reduction: a tile of (token, head) rows is multiplied against a block of keys
and reduced over heads in registers/VMEM, so [B, T, heads, entries] never exists; blocks of entries that
no token of the tile can see are skipped. `indexer_topk` scores chunks of tokens (the kernels take the
chunk's first token as a runtime offset) and keeps each chunk's jax.lax.top_k, so its memory is linear in
T * top-k; [B, T, S] scores exist only in the differentiable `indexer_scores`.
Callers fold the softmax and head scales into w (relu is positively homogeneous).

Shapes: B batch, T tokens, H index heads, D index head dim, S compressed entries, K top-k; tiles of bt
tokens x bs entries, R = bt * H (token, head) rows.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.common import (FLOAT_DTYPES, Lowering, check_array, check_dim, check_positive,
                                   check_segment_ids, first_entry, next_pow2, pad_axis, resolve_lowering,
                                   round_up, window_start)

_F32 = jnp.float32
_HIGHEST = lax.Precision.HIGHEST


@dataclasses.dataclass(frozen=True)
class IndexerBlockSizes:
    """block_t tokens x block_s entries per tile (on GPU block_t is raised until bt * heads >= 16)."""
    block_t: int = 2
    block_s: int = 64
    num_warps: int = 4
    num_stages: int = 2

    def __post_init__(self):
        for field in ("block_t", "block_s"):
            value = getattr(self, field)
            if value < 1 or value & (value - 1):
                raise ValueError(f"IndexerBlockSizes.{field}={value} must be a power of two")


_TOPK_CHUNK_BYTES = 1 << 28   # float32 scores (or reference dots) of one chunk of tokens in indexer_topk
DEFAULT_BLOCKS = {"pallas_gpu": IndexerBlockSizes(block_t=2, block_s=64),
                  "pallas_tpu": IndexerBlockSizes(block_t=8, block_s=128)}


def visible_entries(t, ratio: int, num_entries: int, div=lax.div):
    """Entries token t (>= 0) sees: min((t + 1) // ratio, S)."""
    return jnp.minimum(div(t + 1, ratio), num_entries)


def indexer_scores_reference(q_BTHD: jax.Array, k_BSD: jax.Array, w_BTH: jax.Array, *, ratio: int,
                             token_offset=0) -> jax.Array:
    """Pure JAX (materialises [B, T, H, S]): float32 scores [B, T, S], -inf where invisible. The tokens
    are token_offset, token_offset + 1, ... (a chunk of a longer sequence)."""
    T, S = q_BTHD.shape[1], k_BSD.shape[1]
    z_BTHS = jnp.einsum("BTHD,BSD->BTHS", q_BTHD, k_BSD, precision=_HIGHEST, preferred_element_type=_F32)
    scores_BTS = jnp.einsum("BTHS,BTH->BTS", jax.nn.relu(z_BTHS), w_BTH.astype(_F32), precision=_HIGHEST)
    t_T = token_offset + jnp.arange(T)
    visible_TS = jnp.arange(S)[None, :] < visible_entries(t_T, ratio, S, jnp.floor_divide)[:, None]
    return jnp.where(visible_TS[None], scores_BTS, -jnp.inf)


# ----------------------------------------------------------------------------------------------- Triton
def _gpu_scores_kernel(t0_ref, q_ref, k_ref, w_ref, out_ref, *, ratio: int, bt: int, bs: int, heads: int,
                       n_entries: int):
    tb, sb = pl.program_id(0), pl.program_id(1)
    first_t = t0_ref[0] + tb * bt
    t_t = first_t + lax.broadcasted_iota(jnp.int32, (bt,), 0)
    s_s = sb * bs + lax.broadcasted_iota(jnp.int32, (bs,), 0)
    visible_ts = s_s[None, :] < visible_entries(t_t, ratio, n_entries)[:, None]

    @pl.when(sb * bs < visible_entries(first_t + bt - 1, ratio, n_entries))
    def _():
        z_rs = lax.dot_general(q_ref[...], k_ref[...], (((1,), (1,)), ((), ())), precision=_HIGHEST,
                               preferred_element_type=_F32)
        y_rs = jnp.maximum(z_rs, 0.0) * w_ref[...][:, None]
        out_ref[...] = jnp.where(visible_ts, jnp.sum(y_rs.reshape(bt, heads, bs), axis=1), -jnp.inf)

    @pl.when(sb * bs >= visible_entries(first_t + bt - 1, ratio, n_entries))
    def _():
        out_ref[...] = jnp.full((bt, bs), -jnp.inf, _F32)


def _gpu_grads(q_rd, k_sd, w_r, dscores_ts, t_t, s_s, *, ratio, bt, bs, heads, n_entries):
    """Recomputes z and returns (g = dI * w * 1[z > 0], dI broadcast to rows, z) for a [rows, bs] tile."""
    visible_ts = s_s[None, :] < visible_entries(t_t, ratio, n_entries)[:, None]
    d_ts = jnp.where(visible_ts, dscores_ts, 0.0)
    d_rs = jnp.broadcast_to(d_ts[:, None, :], (bt, heads, bs)).reshape(bt * heads, bs)
    z_rs = lax.dot_general(q_rd, k_sd, (((1,), (1,)), ((), ())), precision=_HIGHEST, preferred_element_type=_F32)
    return jnp.where(z_rs > 0, d_rs * w_r[:, None], 0.0), d_rs, z_rs


def _gpu_dq_kernel(q_ref, k_ref, w_ref, ds_ref, dq_ref, dw_ref, *, ratio, bt, bs, heads, n_entries):
    tb = pl.program_id(0)
    q_rd, w_r = q_ref[...], w_ref[...]
    t_t = tb * bt + lax.broadcasted_iota(jnp.int32, (bt,), 0)

    def step(j, carry):
        dq_rd, dw_r = carry
        k_sd = k_ref[pl.ds(j * bs, bs), :]
        s_s = j * bs + lax.broadcasted_iota(jnp.int32, (bs,), 0)
        g_rs, d_rs, z_rs = _gpu_grads(q_rd, k_sd, w_r, ds_ref[:, pl.ds(j * bs, bs)], t_t, s_s, ratio=ratio, bt=bt,
                                      bs=bs, heads=heads, n_entries=n_entries)
        dq_rd += jnp.dot(g_rs.astype(k_sd.dtype), k_sd, precision=_HIGHEST, preferred_element_type=_F32)
        return dq_rd, dw_r + jnp.sum(d_rs * jnp.maximum(z_rs, 0.0), axis=1)

    n_blocks = lax.div(visible_entries(tb * bt + bt - 1, ratio, n_entries) + bs - 1, bs)
    dq_rd, dw_r = lax.fori_loop(0, n_blocks, step, (jnp.zeros(q_rd.shape, _F32), jnp.zeros(w_r.shape, _F32)))
    dq_ref[...] = dq_rd.astype(dq_ref.dtype)
    dw_ref[...] = dw_r


def _gpu_dk_kernel(q_ref, k_ref, w_ref, ds_ref, dk_ref, *, ratio, bt, bs, heads, n_entries, n_token_blocks,
                   split_blocks):
    """dk of entry block pl.program_id(0) from the token blocks of split pl.program_id(1) that see it."""
    s0 = pl.program_id(0) * bs
    k_sd = k_ref[...]
    s_s = s0 + lax.broadcasted_iota(jnp.int32, (bs,), 0)
    rows = bt * heads

    def step(tb, dk_sd):
        q_rd = q_ref[pl.ds(tb * rows, rows), :]
        t_t = tb * bt + lax.broadcasted_iota(jnp.int32, (bt,), 0)
        g_rs, _, _ = _gpu_grads(q_rd, k_sd, w_ref[pl.ds(tb * rows, rows)], ds_ref[pl.ds(tb * bt, bt), pl.ds(s0, bs)],
                                t_t, s_s, ratio=ratio, bt=bt, bs=bs, heads=heads, n_entries=n_entries)
        return dk_sd + lax.dot_general(g_rs.astype(q_rd.dtype), q_rd, (((0,), (0,)), ((), ())),
                                       precision=_HIGHEST, preferred_element_type=_F32)

    split_begin = pl.program_id(1) * split_blocks
    first_token = (s0 + 1) * ratio - 1      # the first token that sees entry s0
    tb_begin = jnp.maximum(jnp.minimum(lax.div(first_token, bt), n_token_blocks), split_begin)
    tb_end = jnp.minimum(n_token_blocks, split_begin + split_blocks)
    dk_ref[...] = lax.fori_loop(tb_begin, tb_end, step, jnp.zeros(k_sd.shape, _F32))


class _GpuLayout:
    """Padding to power-of-two tiles; (token, head) rows flattened: q [B, Tp*Hp, Dp], w [B, Tp*Hp]."""

    def __init__(self, q_BTHD, k_BSD, blocks: IndexerBlockSizes):
        B, self.T, H, D = q_BTHD.shape
        self.S = k_BSD.shape[1]
        self.heads, self.Dp = next_pow2(H), max(16, next_pow2(D))
        self.bt = max(blocks.block_t, 16 // min(self.heads, 16))
        self.bs = max(16, blocks.block_s)
        self.Tp, self.Sp = round_up(self.T, self.bt), round_up(max(self.S, 1), self.bs)
        self.params = plgpu.CompilerParams(num_warps=blocks.num_warps, num_stages=blocks.num_stages)

    def rows(self, q_BTHD):
        B, T, H, D = q_BTHD.shape
        q = pad_axis(pad_axis(pad_axis(q_BTHD, 1, self.Tp), 2, self.heads), 3, self.Dp)
        return q.reshape(B, self.Tp * self.heads, self.Dp)

    def weights(self, w_BTH):
        B = w_BTH.shape[0]
        return pad_axis(pad_axis(w_BTH.astype(_F32), 1, self.Tp), 2, self.heads).reshape(B, self.Tp * self.heads)

    def keys(self, k_BSD):
        return pad_axis(pad_axis(k_BSD, 1, self.Sp), 2, self.Dp)

    def static(self):
        return dict(bt=self.bt, bs=self.bs, heads=self.heads, n_entries=self.S)


def _gpu_scores(q_BTHD, k_BSD, w_BTH, t0, *, ratio, blocks, interpret):
    L = _GpuLayout(q_BTHD, k_BSD, blocks)
    B, rows = q_BTHD.shape[0], L.bt * L.heads
    out = pl.pallas_call(
        functools.partial(_gpu_scores_kernel, ratio=ratio, **L.static()),
        grid=(L.Tp // L.bt, L.Sp // L.bs, B),
        in_specs=[pl.BlockSpec((1,), lambda tb, sb, b: (0,)),
                  pl.BlockSpec((None, rows, L.Dp), lambda tb, sb, b: (b, tb, 0)),
                  pl.BlockSpec((None, L.bs, L.Dp), lambda tb, sb, b: (b, sb, 0)),
                  pl.BlockSpec((None, rows), lambda tb, sb, b: (b, tb))],
        out_specs=pl.BlockSpec((None, L.bt, L.bs), lambda tb, sb, b: (b, tb, sb)),
        out_shape=jax.ShapeDtypeStruct((B, L.Tp, L.Sp), _F32),
        compiler_params=L.params, interpret=interpret, name="indexer_scores",
    )(jnp.reshape(t0, (1,)), L.rows(q_BTHD), L.keys(k_BSD), L.weights(w_BTH))
    return out[:, :L.T, :L.S]


def _gpu_scores_backward(q_BTHD, k_BSD, w_BTH, dscores_BTS, *, ratio, blocks, interpret):
    L = _GpuLayout(q_BTHD, k_BSD, blocks)
    B, T, H, D = q_BTHD.shape
    rows, n_tb = L.bt * L.heads, L.Tp // L.bt
    q, k, w = L.rows(q_BTHD), L.keys(k_BSD), L.weights(w_BTH)
    ds = pad_axis(pad_axis(dscores_BTS.astype(_F32), 1, L.Tp), 2, L.Sp)
    dq, dw = pl.pallas_call(
        functools.partial(_gpu_dq_kernel, ratio=ratio, **L.static()),
        grid=(n_tb, B),
        in_specs=[pl.BlockSpec((None, rows, L.Dp), lambda tb, b: (b, tb, 0)),
                  pl.BlockSpec((None, L.Sp, L.Dp), lambda tb, b: (b, 0, 0)),
                  pl.BlockSpec((None, rows), lambda tb, b: (b, tb)),
                  pl.BlockSpec((None, L.bt, L.Sp), lambda tb, b: (b, tb, 0))],
        out_specs=[pl.BlockSpec((None, rows, L.Dp), lambda tb, b: (b, tb, 0)),
                   pl.BlockSpec((None, rows), lambda tb, b: (b, tb))],
        out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct(w.shape, _F32)],
        compiler_params=L.params, interpret=interpret, name="indexer_dq_dw",
    )(q, k, w, ds)
    # Every token block may see an entry block: split the tokens over programs, add the partial sums.
    n_sb = L.Sp // L.bs
    n_splits = max(1, min(n_tb, -(-512 // n_sb)))
    split_blocks = -(-n_tb // n_splits)
    dk = pl.pallas_call(
        functools.partial(_gpu_dk_kernel, ratio=ratio, n_token_blocks=n_tb, split_blocks=split_blocks,
                          **L.static()),
        grid=(n_sb, n_splits, B),
        in_specs=[pl.BlockSpec((None, L.Tp * L.heads, L.Dp), lambda sb, sp, b: (b, 0, 0)),
                  pl.BlockSpec((None, L.bs, L.Dp), lambda sb, sp, b: (b, sb, 0)),
                  pl.BlockSpec((None, L.Tp * L.heads), lambda sb, sp, b: (b, 0)),
                  pl.BlockSpec((None, L.Tp, L.Sp), lambda sb, sp, b: (b, 0, 0))],
        out_specs=pl.BlockSpec((None, None, L.bs, L.Dp), lambda sb, sp, b: (b, sp, sb, 0)),
        out_shape=jax.ShapeDtypeStruct((B, n_splits, *k.shape[1:]), _F32),
        compiler_params=L.params, interpret=interpret, name="indexer_dk",
    )(q, k, w, ds).sum(axis=1)
    dq = dq.reshape(B, L.Tp, L.heads, L.Dp)[:, :T, :H, :D]
    dw = dw.reshape(B, L.Tp, L.heads)[:, :T, :H]
    return dq, dk[:, :L.S, :D], dw


# ------------------------------------------------------------------------------------------- Mosaic TPU
def _token_selector(bt: int, heads: int):
    """[bt, bt * H] float 0/1: row c selects the H (token c, head) lanes; sums heads by a matmul."""
    c = lax.broadcasted_iota(jnp.int32, (bt, bt * heads), 0)
    r = lax.broadcasted_iota(jnp.int32, (bt, bt * heads), 1)
    return ((r >= c * heads) & (r < (c + 1) * heads)).astype(_F32)


def _tpu_tile(q_ref, k_ref, *, first_t, sb, ratio, bt, bs, heads, n_entries):
    """Entries on sublanes, (token, head) rows on lanes: z^T [bs, R], the visibility [bt, bs] and the
    token selector; the tile's tokens are first_t, first_t + 1, ..."""
    q_rd, k_sd = q_ref[...], k_ref[...]
    precision = _HIGHEST if q_rd.dtype == _F32 else lax.Precision.DEFAULT
    zt_sr = lax.dot_general(k_sd, q_rd, (((1,), (1,)), ((), ())), precision=precision, preferred_element_type=_F32)
    t_t1 = first_t + lax.broadcasted_iota(jnp.int32, (bt, 1), 0)
    s_1s = sb * bs + lax.broadcasted_iota(jnp.int32, (1, bs), 1)
    return zt_sr, s_1s < visible_entries(t_t1, ratio, n_entries), _token_selector(bt, heads), precision


def _tpu_scores_kernel(t0_ref, q_ref, k_ref, w_ref, out_ref, *, ratio, bt, bs, heads, n_entries):
    first_t, sb = t0_ref[0] + pl.program_id(1) * bt, pl.program_id(2)
    live = sb * bs < visible_entries(first_t + bt - 1, ratio, n_entries)

    @pl.when(live)
    def _():
        zt_sr, visible_ts, select_tr, _ = _tpu_tile(q_ref, k_ref, first_t=first_t, sb=sb, ratio=ratio, bt=bt,
                                                    bs=bs, heads=heads, n_entries=n_entries)
        yt_sr = jnp.maximum(zt_sr, 0.0) * w_ref[...]
        scores_ts = lax.dot_general(select_tr, yt_sr, (((1,), (1,)), ((), ())), precision=_HIGHEST,
                                    preferred_element_type=_F32)
        out_ref[...] = jnp.where(visible_ts, scores_ts, -jnp.inf)

    @pl.when(jnp.logical_not(live))
    def _():
        out_ref[...] = jnp.full(out_ref.shape, -jnp.inf, _F32)


def _tpu_tile_grads(q_ref, k_ref, w_ref, ds_ref, **tile):
    """g^T = dI * w * 1[z > 0] and dI broadcast over heads, both [bs, R] (entries on sublanes)."""
    zt_sr, visible_ts, select_tr, precision = _tpu_tile(q_ref, k_ref, **tile)
    d_ts = jnp.where(visible_ts, ds_ref[...], 0.0)
    dt_sr = lax.dot_general(d_ts, select_tr, (((0,), (0,)), ((), ())), precision=_HIGHEST,
                            preferred_element_type=_F32)
    return jnp.where(zt_sr > 0, dt_sr * w_ref[...], 0.0), dt_sr, zt_sr, precision


def _tpu_dq_kernel(q_ref, k_ref, w_ref, ds_ref, dq_ref, dw_ref, dq_acc, dw_acc, *, ratio, bt, bs, heads, n_entries):
    tb, sb = pl.program_id(1), pl.program_id(2)

    @pl.when(sb == 0)
    def _():
        dq_acc[...] = jnp.zeros(dq_acc.shape, _F32)
        dw_acc[...] = jnp.zeros(dw_acc.shape, _F32)

    @pl.when(sb * bs < visible_entries(tb * bt + bt - 1, ratio, n_entries))
    def _():
        gt_sr, dt_sr, zt_sr, precision = _tpu_tile_grads(q_ref, k_ref, w_ref, ds_ref, first_t=tb * bt, sb=sb,
                                                         ratio=ratio, bt=bt, bs=bs, heads=heads, n_entries=n_entries)
        k_sd = k_ref[...]
        dq_acc[...] += lax.dot_general(gt_sr.astype(k_sd.dtype), k_sd, (((0,), (0,)), ((), ())),
                                       precision=precision, preferred_element_type=_F32)
        dw_acc[...] += jnp.sum(dt_sr * jnp.maximum(zt_sr, 0.0), axis=0, keepdims=True)

    @pl.when(sb == pl.num_programs(2) - 1)
    def _():
        dq_ref[...] = dq_acc[...].astype(dq_ref.dtype)
        dw_ref[...] = dw_acc[...]


def _tpu_dk_kernel(q_ref, k_ref, w_ref, ds_ref, dk_ref, dk_acc, *, ratio, bt, bs, heads, n_entries):
    sb, tb = pl.program_id(1), pl.program_id(2)

    @pl.when(tb == 0)
    def _():
        dk_acc[...] = jnp.zeros(dk_acc.shape, _F32)

    @pl.when(sb * bs < visible_entries(tb * bt + bt - 1, ratio, n_entries))
    def _():
        gt_sr, _, _, precision = _tpu_tile_grads(q_ref, k_ref, w_ref, ds_ref, first_t=tb * bt, sb=sb, ratio=ratio,
                                                 bt=bt, bs=bs, heads=heads, n_entries=n_entries)
        q_rd = q_ref[...]
        dk_acc[...] += jnp.dot(gt_sr.astype(q_rd.dtype), q_rd, precision=precision, preferred_element_type=_F32)

    @pl.when(tb == pl.num_programs(2) - 1)
    def _():
        dk_ref[...] = dk_acc[...]


class _TpuLayout:
    """Tokens padded to block_t, entries to block_s; (token, head) rows flattened: q [B, Tp*H, D] and the
    weights as a lane vector [B, 1, Tp*H]. Index maps clamp invisible blocks onto visible ones so that
    skipped grid steps fetch nothing new."""

    def __init__(self, q_BTHD, k_BSD, blocks: IndexerBlockSizes, ratio: int):
        B, self.T, self.H, D = q_BTHD.shape
        self.S, self.ratio = k_BSD.shape[1], ratio
        self.bt, self.bs = blocks.block_t, blocks.block_s
        self.Tp, self.Sp = round_up(self.T, self.bt), round_up(max(self.S, 1), self.bs)
        self.n_tb, self.n_sb = self.Tp // self.bt, self.Sp // self.bs

    def rows(self, q_BTHD):
        B, T, H, D = q_BTHD.shape
        return pad_axis(q_BTHD, 1, self.Tp).reshape(B, self.Tp * H, D)

    def weights(self, w_BTH):
        B = w_BTH.shape[0]
        return pad_axis(w_BTH.astype(_F32), 1, self.Tp).reshape(B, 1, self.Tp * self.H)

    def last_visible_block(self, tb, t0=0):
        n = visible_entries(t0 + tb * self.bt + self.bt - 1, self.ratio, self.S)
        return jnp.maximum(lax.div(n + self.bs - 1, self.bs) - 1, 0)

    def first_token_block(self, sb):
        return jnp.minimum(lax.div((sb * self.bs + 1) * self.ratio - 1, self.bt), self.n_tb - 1)

    def static(self):
        return dict(ratio=self.ratio, bt=self.bt, bs=self.bs, heads=self.H, n_entries=self.S)


def _tpu_scores(q_BTHD, k_BSD, w_BTH, t0, *, ratio, blocks, interpret):
    L = _TpuLayout(q_BTHD, k_BSD, blocks, ratio)
    B, T, H, D = q_BTHD.shape
    sb_live = lambda tb, sb, t0_ref: jnp.minimum(sb, L.last_visible_block(tb, t0_ref[0]))
    out = pl.pallas_call(
        functools.partial(_tpu_scores_kernel, **L.static()),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=1, grid=(B, L.n_tb, L.n_sb),
            in_specs=[pl.BlockSpec((None, L.bt * H, D), lambda b, tb, sb, t0_ref: (b, tb, 0)),
                      pl.BlockSpec((None, L.bs, D), lambda b, tb, sb, t0_ref: (b, sb_live(tb, sb, t0_ref), 0)),
                      pl.BlockSpec((None, 1, L.bt * H), lambda b, tb, sb, t0_ref: (b, 0, tb))],
            out_specs=pl.BlockSpec((None, L.bt, L.bs), lambda b, tb, sb, t0_ref: (b, tb, sb))),
        out_shape=jax.ShapeDtypeStruct((B, L.Tp, L.Sp), _F32),
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "parallel")),
        interpret=interpret, name="indexer_scores",
    )(jnp.reshape(t0, (1,)), L.rows(q_BTHD), pad_axis(k_BSD, 1, L.Sp), L.weights(w_BTH))
    return out[:, :T, :L.S]


def _tpu_scores_backward(q_BTHD, k_BSD, w_BTH, dscores_BTS, *, ratio, blocks, interpret):
    L = _TpuLayout(q_BTHD, k_BSD, blocks, ratio)
    B, T, H, D = q_BTHD.shape
    rows = L.bt * H
    q, k, w = L.rows(q_BTHD), pad_axis(k_BSD, 1, L.Sp), L.weights(w_BTH)
    ds = pad_axis(pad_axis(dscores_BTS.astype(_F32), 1, L.Tp), 2, L.Sp)
    sb_live = lambda tb, sb: jnp.minimum(sb, L.last_visible_block(tb))
    dq, dw = pl.pallas_call(
        functools.partial(_tpu_dq_kernel, **L.static()),
        grid=(B, L.n_tb, L.n_sb),
        in_specs=[pl.BlockSpec((None, rows, D), lambda b, tb, sb: (b, tb, 0)),
                  pl.BlockSpec((None, L.bs, D), lambda b, tb, sb: (b, sb_live(tb, sb), 0)),
                  pl.BlockSpec((None, 1, rows), lambda b, tb, sb: (b, 0, tb)),
                  pl.BlockSpec((None, L.bt, L.bs), lambda b, tb, sb: (b, tb, sb_live(tb, sb)))],
        out_specs=[pl.BlockSpec((None, rows, D), lambda b, tb, sb: (b, tb, 0)),
                   pl.BlockSpec((None, 1, rows), lambda b, tb, sb: (b, 0, tb))],
        out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct(w.shape, _F32)],
        scratch_shapes=[pltpu.VMEM((rows, D), _F32), pltpu.VMEM((1, rows), _F32)],
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary")),
        interpret=interpret, name="indexer_dq_dw",
    )(q, k, w, ds)
    tb_live = lambda sb, tb: jnp.maximum(tb, L.first_token_block(sb))
    dk = pl.pallas_call(
        functools.partial(_tpu_dk_kernel, **L.static()),
        grid=(B, L.n_sb, L.n_tb),
        in_specs=[pl.BlockSpec((None, rows, D), lambda b, sb, tb: (b, tb_live(sb, tb), 0)),
                  pl.BlockSpec((None, L.bs, D), lambda b, sb, tb: (b, sb, 0)),
                  pl.BlockSpec((None, 1, rows), lambda b, sb, tb: (b, 0, tb_live(sb, tb))),
                  pl.BlockSpec((None, L.bt, L.bs), lambda b, sb, tb: (b, tb_live(sb, tb), sb))],
        out_specs=pl.BlockSpec((None, L.bs, D), lambda b, sb, tb: (b, sb, 0)),
        out_shape=jax.ShapeDtypeStruct(k.shape, _F32),
        scratch_shapes=[pltpu.VMEM((L.bs, D), _F32)],
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary")),
        interpret=interpret, name="indexer_dk",
    )(q, k, w, ds)
    return dq.reshape(B, L.Tp, H, D)[:, :T], dk[:, :L.S], dw.reshape(B, L.Tp, H)[:, :T]


# ------------------------------------------------------------------------------------------- custom VJP
_LOWERINGS = {"pallas_gpu": (_gpu_scores, _gpu_scores_backward), "pallas_tpu": (_tpu_scores, _tpu_scores_backward)}


@dataclasses.dataclass(frozen=True)
class _Config:
    lowering: Lowering
    ratio: int
    blocks: IndexerBlockSizes


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _scores_kernel(cfg: _Config, q_BTHD, k_BSD, w_BTH):
    forward, _ = _LOWERINGS[cfg.lowering.impl]
    return forward(q_BTHD, k_BSD, w_BTH, jnp.zeros((), jnp.int32), ratio=cfg.ratio, blocks=cfg.blocks,
                   interpret=cfg.lowering.interpret)


def _scores_forward(cfg: _Config, q_BTHD, k_BSD, w_BTH):
    return _scores_kernel(cfg, q_BTHD, k_BSD, w_BTH), (q_BTHD, k_BSD, w_BTH)


def _scores_backward(cfg: _Config, residuals, dscores_BTS):
    q_BTHD, k_BSD, w_BTH = residuals
    _, backward = _LOWERINGS[cfg.lowering.impl]
    dq, dk, dw = backward(q_BTHD, k_BSD, w_BTH, dscores_BTS, ratio=cfg.ratio, blocks=cfg.blocks,
                          interpret=cfg.lowering.interpret)
    return dq, dk.astype(k_BSD.dtype), dw.astype(w_BTH.dtype)


_scores_kernel.defvjp(_scores_forward, _scores_backward)


def _validate(q, k, weights, ratio):
    check_array("q", q, 4, FLOAT_DTYPES, "[B, T, H, D]")
    B, T, H, D = q.shape
    check_array("k", k, 3, (q.dtype,), "[B, S, D] with q's dtype")
    check_dim("k", k, 0, B, "batch"), check_dim("k", k, 2, D, "head dim")
    check_array("weights", weights, 3, FLOAT_DTYPES, "[B, T, H]")
    check_dim("weights", weights, 0, B, "batch"), check_dim("weights", weights, 1, T, "tokens")
    check_dim("weights", weights, 2, H, "heads")
    check_positive("ratio", ratio)


def indexer_scores(q: jax.Array, k: jax.Array, weights: jax.Array, *, ratio: int, impl: str = "auto",
                   interpret=None, block_sizes: IndexerBlockSizes | None = None) -> jax.Array:
    """float32 [B, T, S]: sum_h weights[t, h] relu(q[t, h] . k[s]) for s < (t + 1) // ratio, else -inf.

    q [B, T, H, D] index queries; k [B, S, D] compressed index keys; weights [B, T, H] (scales folded in).
    Differentiable in q, k and weights (the -inf entries get no gradient). impl: "xla", "pallas_gpu",
    "pallas_tpu" or "auto"; a Pallas lowering off its platform runs in interpret mode by default.
    """
    _validate(q, k, weights, ratio)
    lowering = resolve_lowering(impl, interpret)
    if lowering.impl == "xla":
        return indexer_scores_reference(q, k, weights, ratio=ratio)
    blocks = block_sizes or DEFAULT_BLOCKS[lowering.impl]
    return _scores_kernel(_Config(lowering, ratio, blocks), q, k, weights)


def indexer_topk(q: jax.Array, k: jax.Array, weights: jax.Array, *, ratio: int, topk: int,
                 segment_ids: jax.Array | None = None, impl: str = "auto", interpret=None,
                 block_sizes: IndexerBlockSizes | None = None) -> jax.Array:
    """int32 [B, T, topk]: the highest-scoring visible entries per token, best first; slots beyond the
    number of visible entries min((t + 1) // ratio, S) hold -1. Arguments as for `indexer_scores`;
    segment_ids int [B, T] (0 = padding) keep each token to the entries whose last pooled token lies in
    its run of equal ids.

    Memory stays linear in T * topk, never T * S: the tokens go through in chunks (lax.map), and each
    chunk's [B, chunk, S] scores are reduced to their top-k before the next chunk is scored. The result
    is an index set, so nothing here is differentiated (the inputs are cut from the gradient).
    """
    _validate(q, k, weights, ratio)
    check_positive("topk", topk)
    check_segment_ids(segment_ids, *q.shape[:2])
    lowering = resolve_lowering(impl, interpret)
    q, k, weights = (lax.stop_gradient(x) for x in (q, k, weights))
    B, T, H, D = q.shape
    first_BT = first_entry(window_start(segment_ids, B, T), ratio)
    S = k.shape[1]
    if S == 0:
        return jnp.full((B, T, topk), -1, jnp.int32)
    per_token = B * S * 4 * (H if lowering.impl == "xla" else 1)
    chunk = min(round_up(T, 16), max(16, _TOPK_CHUNK_BYTES // per_token // 16 * 16))
    n_chunks = -(-T // chunk)
    to_chunks = lambda x: jnp.moveaxis(pad_axis(x, 1, n_chunks * chunk).reshape(B, n_chunks, chunk, *x.shape[2:]),
                                       1, 0)

    def chunk_topk(args):
        t0, q_BCHD, w_BCH, first_BC = args
        if lowering.impl == "xla":
            scores_BCS = indexer_scores_reference(q_BCHD, k, w_BCH, ratio=ratio, token_offset=t0)
        else:
            forward, _ = _LOWERINGS[lowering.impl]
            scores_BCS = forward(q_BCHD, k, w_BCH, t0, ratio=ratio,
                                 blocks=block_sizes or DEFAULT_BLOCKS[lowering.impl], interpret=lowering.interpret)
        scores_BCS = jnp.where(jnp.arange(S) >= first_BC[:, :, None], scores_BCS, -jnp.inf)
        best_BCK, idx_BCK = lax.top_k(scores_BCS, min(topk, S))
        return jnp.where(jnp.isneginf(best_BCK), -1, idx_BCK).astype(jnp.int32)

    starts = jnp.arange(n_chunks, dtype=jnp.int32) * chunk
    idx_NBCK = lax.map(chunk_topk, (starts, to_chunks(q), to_chunks(weights), to_chunks(first_BT)))
    idx_BTK = jnp.moveaxis(idx_NBCK, 0, 1).reshape(B, n_chunks * chunk, -1)[:, :T]
    return pad_axis(idx_BTK, 2, topk, value=-1)
