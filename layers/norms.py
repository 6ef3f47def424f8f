"""RMSNorm, computed in float32 and cast back to the input dtype."""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from layers import params


def rms_normalize(x: jax.Array, eps: float) -> jax.Array:
    """x / sqrt(mean(x^2) + eps) over the last axis, in float32."""
    x32 = x.astype(jnp.float32)
    return x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)


class RMSNorm(nnx.Module):
    """`x * rsqrt(mean(x^2) + eps) * w` with the weight used as is (w starts at 1), or no weight at all.

    `scale_offset=1.0` gives the `(1 + w)` form of Gemma 2/3-style checkpoints (w starts at 0).
    """

    def __init__(self, dim: int, *, eps: float = 1e-6, use_scale: bool = True, scale_offset: float = 0.0,
                 axis_name: str = "norm"):
        self.eps = eps
        self.scale_offset = scale_offset
        self.scale = params.constant((dim,), (axis_name,), 1.0 - scale_offset) if use_scale else None

    def __call__(self, x: jax.Array) -> jax.Array:
        y = rms_normalize(x, self.eps)
        if self.scale is not None:
            y = y * (self.scale_offset + self.scale[...].astype(jnp.float32))
        return y.astype(x.dtype)
