"""Learned scales and biases on the residual stream: the model input and the residual merge."""
from __future__ import annotations

import jax
from flax import nnx

from layers import params


class ScaleBias(nnx.Module):
    """`(x + b) * s` with learned [D] vectors (b starts at 0, s at 1), e.g. on the embedded input."""

    def __init__(self, dim: int):
        self.bias = params.zeros((dim,), ("embed",))
        self.scale = params.ones((dim,), ("embed",))

    def __call__(self, x_BTD: jax.Array) -> jax.Array:
        return (x_BTD + self.bias[...]) * self.scale[...]


class ScaledResidual(nnx.Module):
    """Merges a branch output a into the residual stream x as `(a + hb) * hs + (x + rb) * rs`.

    Each side has its own learned [D] bias and scale (biases start at 0, scales at 1: a plain `x + a`).
    The sum takes the wider dtype of the two sides, so an fp32 stream stays fp32 under a bf16 branch.
    """

    def __init__(self, dim: int):
        self.branch = ScaleBias(dim)
        self.residual = ScaleBias(dim)

    def __call__(self, branch_BTD: jax.Array, residual_BTD: jax.Array) -> jax.Array:
        return self.branch(branch_BTD) + self.residual(residual_BTD)
