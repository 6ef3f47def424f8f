"""Parameter creation with logical axis names.

Every weight carries `axes`, a tuple of logical axis names (one per dimension). `zoo.sharding` maps
those names to mesh axes; layers never see a mesh.
"""
from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx


class SeededRngs:
    """The draws of `nnx.Rngs(params=seed)` (the i-th is fold_in(key(seed), i)) with the count kept in
    Python: a model built inside a trace (`nnx.eval_shape`, a sharded `jax.jit` init) updates no traced
    counter. (Under jax 0.10 each traced counter update searches the whole trace, so building a large
    preset that way took minutes.)"""

    def __init__(self, seed: int = 0):
        self._key, self._count = jax.random.key(seed), 0

    def params(self) -> jax.Array:
        key = jax.random.fold_in(self._key, self._count)
        self._count += 1
        return key


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
