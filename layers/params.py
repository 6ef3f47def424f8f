"""Parameter creation with logical axis names.

Every weight carries `axes`, a tuple of logical axis names (one per dimension). `zoo.sharding` maps
those names to mesh axes; layers never see a mesh.
"""
from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx


class ShapeOnlyRngs:
    """Stands in for `nnx.Rngs` where only shapes matter (`nnx.eval_shape` builds): every draw takes the
    same key, so no draw counter is updated inside the trace (under jax 0.10 each such update searches the
    whole trace, which made the abstract build of a large preset take minutes)."""

    def params(self) -> jax.Array:
        return jax.random.key(0)


def normal(rngs: nnx.Rngs, shape: Sequence[int], axes: Sequence[str | None], std: float | None = None,
           fan_in_dims: int = 1) -> nnx.Param:
    """A normal-initialised weight; `std` defaults to 1/sqrt(fan_in) over the first `fan_in_dims` dims."""
    if len(shape) != len(axes):
        raise ValueError(f"shape {tuple(shape)} and axes {tuple(axes)} differ in rank")
    if std is None:
        fan_in = 1
        for d in shape[:fan_in_dims]:
            fan_in *= d
        std = fan_in ** -0.5
    value = std * jax.random.normal(rngs.params(), tuple(shape), jnp.float32)
    return nnx.Param(value, axes=tuple(axes))


def constant(shape: Sequence[int], axes: Sequence[str | None], value: float) -> nnx.Param:
    if len(shape) != len(axes):
        raise ValueError(f"shape {tuple(shape)} and axes {tuple(axes)} differ in rank")
    return nnx.Param(jnp.full(tuple(shape), value, jnp.float32), axes=tuple(axes))


def ones(shape, axes) -> nnx.Param:
    return constant(shape, axes, 1.0)


def zeros(shape, axes) -> nnx.Param:
    return constant(shape, axes, 0.0)
