"""Triton (Pallas GPU) lowering of the grouped matmul (`grouped_matmul.py`) and its weight gradient.

Rows come sorted by group. The output is cut into row tiles of bm rows that ignore group boundaries (so
no group is padded), and one program computes one [bm, bn] output tile: it walks the groups its rows touch
(their range per tile is precomputed from the group sizes) and, for each, accumulates the tile's rows of
that group (the others zeroed) times the group's weights over the reduction dim in steps of bk. A tile whose
rows span a boundary is thus computed once per group it touches: at most one extra tile per group. Empty
groups are skipped, rows past sum(group sizes) touch no group and come out zero.

The weight gradient (`tgmm`, a transposed grouped matmul) gives each (group, [bd, bf] tile of dw) one
program that walks the group's row tiles, masked to its rows: dw[e] = x_e^T dy_e.

Launch order: the first grid axis varies fastest on the GPU, so it is the column tile; the programs that
share a row tile (forward, dx) or a group's rows (dw) run together and find them in L2.

Shapes: P rows (padded to Pp), E groups, D reduction width, F output width (of the forward product; the
dx product runs the same kernel with w's last two axes swapped by indexing). Tiles: m rows, d, f columns.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.common import F32, dot, dot_nt, dot_tn, next_pow2, pad_axis, round_up

_MIN_TILE = 16   # the smallest Triton dot operand


def fit(block: int, dim: int) -> int:
    """The largest power of two <= block dividing dim (dim a multiple of 16), at least 16."""
    tile = max(_MIN_TILE, block)
    while dim % tile:
        tile //= 2
    return tile


def group_bounds(group_sizes_E: jax.Array, rows: int) -> tuple[jax.Array, jax.Array]:
    """int32 (starts [E], ends [E]): each group's row range, clamped to the `rows` rows that exist."""
    ends_E = jnp.minimum(jnp.cumsum(jnp.maximum(group_sizes_E.astype(jnp.int32), 0)), rows)
    starts_E = jnp.concatenate([jnp.zeros((1,), jnp.int32), ends_E[:-1]])
    return starts_E, ends_E


def tile_groups(starts_E, ends_E, n_tiles: int, bm: int) -> tuple[jax.Array, jax.Array]:
    """int32 (first [n_tiles], last + 1 [n_tiles]): the groups whose rows meet row tile m (empty groups
    inside the range are skipped by the kernel; a tile past every group gets an empty range)."""
    tile_start_M = jnp.arange(n_tiles, dtype=jnp.int32) * bm
    first_M = jnp.searchsorted(ends_E, tile_start_M, side="right").astype(jnp.int32)
    stop_M = jnp.searchsorted(starts_E, tile_start_M + bm, side="left").astype(jnp.int32)
    return first_M, stop_M


def _rows_of_group(first_row, bm: int, start, end):
    """[bm, 1] bool: which rows first_row, first_row + 1, ... lie in [start, end)."""
    rows_m = first_row + lax.broadcasted_iota(jnp.int32, (bm, 1), 0)
    return (rows_m >= start) & (rows_m < end)


def _gmm_kernel(first_ref, stop_ref, starts_ref, ends_ref, x_ref, w_ref, out_ref, *, bm: int, bn: int, bk: int,
                n_k: int, transpose_w: bool):
    m = pl.program_id(1)

    def group(g, acc_mn):
        start, end = starts_ref[g], ends_ref[g]
        in_group_m1 = _rows_of_group(m * bm, bm, start, end)

        def step(k, acc_mn):
            cols = pl.ds(pl.multiple_of(k * bk, bk), bk)
            x_mk = jnp.where(in_group_m1, x_ref[:, cols], 0)
            if transpose_w:                       # w block [E, bn, reduction]: x . w[g]^T
                return acc_mn + dot_nt(x_mk, w_ref[g, :, cols])
            return acc_mn + dot(x_mk, w_ref[g, cols, :])

        nonempty = (end > start).astype(jnp.int32)   # (a scalar select lowers to an i1 loop bound in Triton)
        return lax.fori_loop(jnp.int32(0), nonempty * n_k, step, acc_mn)

    acc_mn = lax.fori_loop(first_ref[m], stop_ref[m], group, jnp.zeros((bm, bn), F32))
    out_ref[...] = acc_mn.astype(out_ref.dtype)


def _tgmm_kernel(starts_ref, ends_ref, x_ref, dy_ref, dw_ref, *, bm: int, bd: int, bf: int):
    g = pl.program_id(2)
    start, end = starts_ref[g], ends_ref[g]
    first_tile = lax.div(start, bm)
    stop_tile = first_tile + (end > start).astype(jnp.int32) * (lax.div(end + bm - 1, bm) - first_tile)

    def step(t, acc_df):
        rows = pl.ds(pl.multiple_of(t * bm, bm), bm)
        in_group_m1 = _rows_of_group(t * bm, bm, start, end)
        x_md = jnp.where(in_group_m1, x_ref[rows, :], 0)
        dy_mf = jnp.where(in_group_m1, dy_ref[rows, :], 0)
        return acc_df + dot_tn(x_md, dy_mf)

    acc_df = lax.fori_loop(first_tile, stop_tile, step, jnp.zeros((bd, bf), F32))
    dw_ref[...] = acc_df.astype(dw_ref.dtype)


def _row_tile(blocks, rows: int) -> int:
    return min(max(_MIN_TILE, blocks.block_m), max(_MIN_TILE, next_pow2(rows)))


def _params(blocks):
    return plgpu.CompilerParams(num_warps=blocks.num_warps, num_stages=blocks.num_stages)


def gmm(x_PD, w_EDF, group_sizes_E, *, transpose_w: bool, blocks, interpret) -> jax.Array:
    """[P, F] = ragged_dot(x [P, D], w [E, D, F]); with transpose_w, w is [E, F, D] read as w[e]^T.
    Output in x's dtype."""
    P, D = x_PD.shape
    F = w_EDF.shape[1] if transpose_w else w_EDF.shape[2]
    bm = _row_tile(blocks, P)
    Pp, Dp, Fp = round_up(P, bm), round_up(D, _MIN_TILE), round_up(F, _MIN_TILE)
    bn, bk = fit(blocks.block_n, Fp), fit(blocks.block_k, Dp)
    x = pad_axis(pad_axis(x_PD, 0, Pp), 1, Dp)
    w = pad_axis(pad_axis(w_EDF, 1, Fp if transpose_w else Dp), 2, Dp if transpose_w else Fp)
    E = w.shape[0]
    starts_E, ends_E = group_bounds(group_sizes_E, P)
    first_M, stop_M = tile_groups(starts_E, ends_E, Pp // bm, bm)
    w_spec = (pl.BlockSpec((E, bn, Dp), lambda n, m: (0, n, 0)) if transpose_w
              else pl.BlockSpec((E, Dp, bn), lambda n, m: (0, 0, n)))
    whole = lambda a: pl.BlockSpec(a.shape, lambda n, m: (0,))
    out = pl.pallas_call(
        functools.partial(_gmm_kernel, bm=bm, bn=bn, bk=bk, n_k=Dp // bk, transpose_w=transpose_w),
        grid=(Fp // bn, Pp // bm),
        in_specs=[whole(first_M), whole(stop_M), whole(starts_E), whole(ends_E),
                  pl.BlockSpec((bm, Dp), lambda n, m: (m, 0)), w_spec],
        out_specs=pl.BlockSpec((bm, bn), lambda n, m: (m, n)),
        out_shape=jax.ShapeDtypeStruct((Pp, Fp), x_PD.dtype),
        compiler_params=_params(blocks), interpret=interpret,
        name="grouped_matmul_transposed" if transpose_w else "grouped_matmul",
    )(first_M, stop_M, starts_E, ends_E, x, w)
    return out[:P, :F]


def tgmm(x_PD, dy_PF, group_sizes_E, *, blocks, interpret, out_dtype) -> jax.Array:
    """[E, D, F]: dw[e] = x[rows of e]^T dy[rows of e] (zeros for an empty group)."""
    P, D = x_PD.shape
    F = dy_PF.shape[1]
    E = group_sizes_E.shape[0]
    bm = _row_tile(blocks, P)
    Pp, Dp, Fp = round_up(P, bm), round_up(D, _MIN_TILE), round_up(F, _MIN_TILE)
    bd, bf = fit(blocks.block_k, Dp), fit(blocks.block_n, Fp)
    x = pad_axis(pad_axis(x_PD, 0, Pp), 1, Dp)
    dy = pad_axis(pad_axis(dy_PF, 0, Pp), 1, Fp)
    starts_E, ends_E = group_bounds(group_sizes_E, P)
    whole = pl.BlockSpec((E,), lambda f, d, g: (0,))
    dw = pl.pallas_call(
        functools.partial(_tgmm_kernel, bm=bm, bd=bd, bf=bf),
        grid=(Fp // bf, Dp // bd, E),
        in_specs=[whole, whole, pl.BlockSpec((Pp, bd), lambda f, d, g: (0, d)),
                  pl.BlockSpec((Pp, bf), lambda f, d, g: (0, f))],
        out_specs=pl.BlockSpec((None, bd, bf), lambda f, d, g: (g, d, f)),
        out_shape=jax.ShapeDtypeStruct((E, Dp, Fp), out_dtype),
        compiler_params=_params(blocks), interpret=interpret, name="transposed_grouped_matmul",
    )(starts_E, ends_E, x, dy)
    return dw[:, :D, :F]
