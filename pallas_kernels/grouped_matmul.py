"""Grouped matmul of routed experts, with the semantics of `jax.lax.ragged_dot`:

    y[p] = x[p] . w[e]   for row p of group e (rows sorted by group), 0 for rows past sum(group_sizes),

and its custom VJP: dx = the same product of dy with w[e]^T (the kernel reads w transposed by indexing, no
transposed copy), dw[e] = x_e^T dy_e (a second, "transposed grouped" kernel). The Triton lowering
(`grouped_matmul_gpu`) pads no group: a row tile spanning a group boundary is computed once per group it
touches. On TPU and CPU `jax.lax.ragged_dot` is the implementation ("xla"; native on TPU), which is also
the reference.

Shapes: P rows, E groups (experts), D input width, F output width.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from pallas_kernels import grouped_matmul_gpu
from pallas_kernels.common import (FLOAT_DTYPES, HIGHEST, Lowering, check_array, check_block_sizes, check_dim,
                                   resolve_lowering)

IMPLS = ("xla", "pallas_gpu", "auto")


@dataclasses.dataclass(frozen=True)
class GroupedMatmulBlockSizes:
    """Tiles of the Triton kernels (powers of two >= 16). A tile need not divide its dim (edge tiles are
    masked); one larger than the dim shrinks to the dim's next power of two.

    block_m: rows per output tile (forward, dx) and per step of the dw kernel.
    block_n: output columns per tile (F forward, D for dx; dw's F tile).
    block_k: reduction step (D forward, F for dx; dw's D tile).
    num_warps, num_stages: Triton launch parameters.
    """
    block_m: int = 128
    block_n: int = 64
    block_k: int = 64
    num_warps: int = 4
    num_stages: int = 3

    def __post_init__(self):
        check_block_sizes(self, ("block_m", "block_n", "block_k"), 16)
        for field in ("num_warps", "num_stages"):
            if getattr(self, field) < 1:
                raise ValueError(f"GroupedMatmulBlockSizes.{field} must be >= 1, got {getattr(self, field)}")


def grouped_matmul_reference(x_PD: jax.Array, w_EDF: jax.Array, group_sizes_E: jax.Array) -> jax.Array:
    """jax.lax.ragged_dot at float32 precision (IEEE float32 products for float32 inputs)."""
    return jax.lax.ragged_dot(x_PD, w_EDF, group_sizes_E.astype(jnp.int32), precision=HIGHEST)


@dataclasses.dataclass(frozen=True)
class _Config:
    lowering: Lowering
    blocks: GroupedMatmulBlockSizes


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _kernel(cfg: _Config, x_PD, w_EDF, group_sizes_E):
    return grouped_matmul_gpu.gmm(x_PD, w_EDF, group_sizes_E, transpose_w=False, blocks=cfg.blocks,
                                  interpret=cfg.lowering.interpret)


def _forward(cfg: _Config, x_PD, w_EDF, group_sizes_E):
    return _kernel(cfg, x_PD, w_EDF, group_sizes_E), (x_PD, w_EDF, group_sizes_E)


def _backward(cfg: _Config, residuals, dy_PF):
    x_PD, w_EDF, group_sizes_E = residuals
    dy_PF = dy_PF.astype(x_PD.dtype)
    dx_PD = grouped_matmul_gpu.gmm(dy_PF, w_EDF, group_sizes_E, transpose_w=True, blocks=cfg.blocks,
                                   interpret=cfg.lowering.interpret)
    dw_EDF = grouped_matmul_gpu.tgmm(x_PD, dy_PF, group_sizes_E, blocks=cfg.blocks, interpret=cfg.lowering.interpret,
                                     out_dtype=w_EDF.dtype)
    return dx_PD, dw_EDF, None


_kernel.defvjp(_forward, _backward)


def _validate(x_PD, w_EDF, group_sizes_E):
    check_array("x", x_PD, 2, FLOAT_DTYPES, "[P, D]")
    check_array("w", w_EDF, 3, (x_PD.dtype,), "[E, D, F] with x's dtype")
    check_dim("w", w_EDF, 1, x_PD.shape[1], "input width D of x")
    check_array("group_sizes", group_sizes_E, 1, (jnp.int32, jnp.int64), "[E] int")
    check_dim("group_sizes", group_sizes_E, 0, w_EDF.shape[0], "experts E of w")


def grouped_matmul(x_PD: jax.Array, w_EDF: jax.Array, group_sizes_E: jax.Array, *, impl: str = "auto",
                   interpret=None, block_sizes: GroupedMatmulBlockSizes | None = None) -> jax.Array:
    """[P, F] in x's dtype: row p of group e (rows sorted by group) times w[e]; rows past sum(group_sizes)
    give zeros (group sizes summing past P are cut at P).

    x [P, D] float32/bfloat16; w [E, D, F] of x's dtype; group_sizes [E] int. Differentiable in x and w.
    impl: "xla" (jax.lax.ragged_dot), "pallas_gpu" (the Triton kernels; interpret mode off GPU unless
    `interpret` says otherwise) or "auto" ("pallas_gpu" on GPU, else "xla": native ragged_dot on TPU).
    """
    if impl not in IMPLS:
        raise ValueError(f"grouped_matmul: unknown impl {impl!r}; expected one of {IMPLS} (on TPU "
                         f"ragged_dot is native: use 'xla')")
    _validate(x_PD, w_EDF, group_sizes_E)
    lowering = resolve_lowering(impl if impl != "auto" or jax.default_backend() == "gpu" else "xla", interpret)
    if lowering.impl == "xla" or 0 in (*x_PD.shape, *w_EDF.shape):   # (an empty operand: nothing to tile)
        return grouped_matmul_reference(x_PD, w_EDF, group_sizes_E).astype(x_PD.dtype)
    return _kernel(_Config(lowering, block_sizes or GroupedMatmulBlockSizes()), x_PD, w_EDF,
                   group_sizes_E.astype(jnp.int32))
