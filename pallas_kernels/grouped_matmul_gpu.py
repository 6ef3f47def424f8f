"""Triton (Pallas GPU) lowering of the grouped matmul (`grouped_matmul.py`) and its weight gradient.

Rows come sorted by group. The output is cut into row tiles of bm rows that ignore group boundaries (so
no group is padded), and one program computes one [bm, bn] output tile: it walks the groups its rows touch
(their range per tile is precomputed from the group sizes) and, for each, accumulates the tile's rows of
that group (the others zeroed) times the group's weights over the reduction dim in steps of bk. A tile whose
rows span a boundary is thus computed once per group it touches: at most one extra tile per group. Empty
groups are skipped, rows past sum(group sizes) touch no group and come out zero.

The weight gradient (`tgmm`, a transposed grouped matmul) gives each (group, [bd, bf] tile of dw) one
program that walks the group's row tiles, masked to its rows: dw[e] = x_e^T dy_e.

No operand is padded or copied: tiles that run past an array's edge load under a mask (Triton leaves
masked lanes undefined, so they are zeroed after the load) and store under a mask.

Launch order: the first grid axis varies fastest on the GPU, so it is the column tile; the programs that
share a row tile (forward, dx) or a group's rows (dw) run together and find them in L2.

Shapes: P rows, E groups, D reduction width, F output width (of the forward product; the dx product runs
the same kernel with w's last two axes swapped by indexing). Tiles: m rows, n output columns, k reduction
step; d, f the dw tile's rows and columns.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.common import F32, dot, dot_nt, dot_tn, next_pow2

_MIN_TILE = 16   # the smallest Triton dot operand


def tile(block: int, dim: int) -> int:
    """The tile of a dim: `block`, or the dim rounded up to a power of two (>= 16) where that is smaller."""
    return min(block, max(_MIN_TILE, next_pow2(dim)))


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


def _iota(first, size: int, axis: int):
    """first, first + 1, ... along `axis` of a [size, 1] (axis 0) or [1, size] (axis 1) int32 array."""
    return first + lax.broadcasted_iota(jnp.int32, (size, 1) if axis == 0 else (1, size), axis)


def _within(first, size: int, axis: int, bound: int, aligned: bool):
    """The positions of a tile along `axis` that lie before `bound`; None when all do (`aligned`)."""
    return None if aligned else _iota(first, size, axis) < bound


def _both(a, b):
    return b if a is None else a if b is None else a & b


def _load(ref, mask):
    """ref's tile, zero where `mask` (broadcast to the tile) is False; a plain load without a mask."""
    if mask is None:
        return ref[...]
    mask = jnp.broadcast_to(mask, ref.shape)
    return jnp.where(mask, plgpu.load(ref, mask=mask), 0)


def _store(ref, value, mask):
    if mask is None:
        ref[...] = value
    else:
        plgpu.store(ref, value, mask=jnp.broadcast_to(mask, ref.shape))


def _gmm_kernel(first_ref, stop_ref, starts_ref, ends_ref, x_ref, w_ref, out_ref, *, bm: int, bn: int, bk: int,
                rows: int, width_k: int, width_n: int, transpose_w: bool):
    n, m = pl.program_id(0), pl.program_id(1)
    rows_m1 = _iota(m * bm, bm, 0)
    n_ok_1n = _within(n * bn, bn, 1, width_n, width_n % bn == 0)
    n_ok_n1 = _within(n * bn, bn, 0, width_n, width_n % bn == 0)

    def group(g, acc_mn):
        start, end = starts_ref[g], ends_ref[g]
        in_group_m1 = (rows_m1 >= start) & (rows_m1 < end)

        def step(k, acc_mn):
            k_cols = pl.ds(pl.multiple_of(k * bk, bk), bk)
            k_ok_1k = _within(k * bk, bk, 1, width_k, width_k % bk == 0)
            k_ok_k1 = _within(k * bk, bk, 0, width_k, width_k % bk == 0)
            x_mk = _load(x_ref.at[:, k_cols], _both(in_group_m1, k_ok_1k))
            if transpose_w:                       # w block [E, bn, width_k]: x . w[g]^T
                return acc_mn + dot_nt(x_mk, _load(w_ref.at[g, :, k_cols], _both(n_ok_n1, k_ok_1k)))
            return acc_mn + dot(x_mk, _load(w_ref.at[g, k_cols, :], _both(k_ok_k1, n_ok_1n)))

        nonempty = (end > start).astype(jnp.int32)   # (a scalar select lowers to an i1 loop bound in Triton)
        return lax.fori_loop(jnp.int32(0), nonempty * -(-width_k // bk), step, acc_mn)

    acc_mn = lax.fori_loop(first_ref[m], stop_ref[m], group, jnp.zeros((bm, bn), F32))
    _store(out_ref, acc_mn.astype(out_ref.dtype), _both(_within(m * bm, bm, 0, rows, rows % bm == 0), n_ok_1n))


def _tgmm_kernel(starts_ref, ends_ref, x_ref, dy_ref, dw_ref, *, bm: int, bd: int, bf: int, width_d: int,
                 width_f: int):
    f, d, g = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    start, end = starts_ref[g], ends_ref[g]
    first_tile = lax.div(start, bm)
    stop_tile = first_tile + (end > start).astype(jnp.int32) * (lax.div(end + bm - 1, bm) - first_tile)
    d_ok_1d = _within(d * bd, bd, 1, width_d, width_d % bd == 0)
    f_ok_1f = _within(f * bf, bf, 1, width_f, width_f % bf == 0)

    def step(t, acc_df):
        rows = pl.ds(pl.multiple_of(t * bm, bm), bm)
        rows_m1 = _iota(t * bm, bm, 0)
        in_group_m1 = (rows_m1 >= start) & (rows_m1 < end)
        x_md = _load(x_ref.at[rows, :], _both(in_group_m1, d_ok_1d))
        dy_mf = _load(dy_ref.at[rows, :], _both(in_group_m1, f_ok_1f))
        return acc_df + dot_tn(x_md, dy_mf)

    acc_df = lax.fori_loop(first_tile, stop_tile, step, jnp.zeros((bd, bf), F32))
    d_ok_d1 = _within(d * bd, bd, 0, width_d, width_d % bd == 0)
    _store(dw_ref, acc_df.astype(dw_ref.dtype), _both(d_ok_d1, f_ok_1f))


def _params(blocks):
    return plgpu.CompilerParams(num_warps=blocks.num_warps, num_stages=blocks.num_stages)


def gmm(x_PD, w_EDF, group_sizes_E, *, transpose_w: bool, blocks, interpret) -> jax.Array:
    """[P, F] = ragged_dot(x [P, D], w [E, D, F]); with transpose_w, w is [E, F, D] read as w[e]^T.
    Output in x's dtype."""
    P, D = x_PD.shape
    E = w_EDF.shape[0]
    F = w_EDF.shape[1] if transpose_w else w_EDF.shape[2]
    bm, bn, bk = tile(blocks.block_m, P), tile(blocks.block_n, F), tile(blocks.block_k, D)
    n_m = -(-P // bm)
    starts_E, ends_E = group_bounds(group_sizes_E, P)
    first_M, stop_M = tile_groups(starts_E, ends_E, n_m, bm)
    w_spec = (pl.BlockSpec((E, bn, D), lambda n, m: (0, n, 0)) if transpose_w
              else pl.BlockSpec((E, D, bn), lambda n, m: (0, 0, n)))
    whole = lambda a: pl.BlockSpec(a.shape, lambda n, m: (0,))
    return pl.pallas_call(
        functools.partial(_gmm_kernel, bm=bm, bn=bn, bk=bk, rows=P, width_k=D, width_n=F,
                          transpose_w=transpose_w),
        grid=(-(-F // bn), n_m),
        in_specs=[whole(first_M), whole(stop_M), whole(starts_E), whole(ends_E),
                  pl.BlockSpec((bm, D), lambda n, m: (m, 0)), w_spec],
        out_specs=pl.BlockSpec((bm, bn), lambda n, m: (m, n)),
        out_shape=jax.ShapeDtypeStruct((P, F), x_PD.dtype),
        compiler_params=_params(blocks), interpret=interpret,
        name="grouped_matmul_transposed" if transpose_w else "grouped_matmul",
    )(first_M, stop_M, starts_E, ends_E, x_PD, w_EDF)


def tgmm(x_PD, dy_PF, group_sizes_E, *, blocks, interpret, out_dtype) -> jax.Array:
    """[E, D, F]: dw[e] = x[rows of e]^T dy[rows of e] (zeros for an empty group)."""
    P, D = x_PD.shape
    F = dy_PF.shape[1]
    E = group_sizes_E.shape[0]
    bm, bd, bf = tile(blocks.block_m, P), tile(blocks.block_k, D), tile(blocks.block_n, F)
    starts_E, ends_E = group_bounds(group_sizes_E, P)
    whole = pl.BlockSpec((E,), lambda f, d, g: (0,))
    return pl.pallas_call(
        functools.partial(_tgmm_kernel, bm=bm, bd=bd, bf=bf, width_d=D, width_f=F),
        grid=(-(-F // bf), -(-D // bd), E),
        in_specs=[whole, whole, pl.BlockSpec((P, bd), lambda f, d, g: (0, d)),
                  pl.BlockSpec((P, bf), lambda f, d, g: (0, f))],
        out_specs=pl.BlockSpec((None, bd, bf), lambda f, d, g: (g, d, f)),
        out_shape=jax.ShapeDtypeStruct((E, D, F), out_dtype),
        compiler_params=_params(blocks), interpret=interpret, name="transposed_grouped_matmul",
    )(starts_E, ends_E, x_PD, dy_PF)
