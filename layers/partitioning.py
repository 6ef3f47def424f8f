"""Kernel calls shard by shard: the seam through which a device mesh reaches fused kernels.

A fused kernel (our Pallas kernels, cuDNN's or splash attention) is one opaque call to XLA's partitioner:
it cannot split a Pallas call, so it gathers the operands and runs the whole call on every device, and
cuDNN's partitioner rejects operands laid out unlike each other. Layers therefore call their kernels
through `per_shard`, naming the logical axes of each operand and result, as they name the axes of their
weights; `zoo.sharding` swaps in a shard_map that gives each device its slice of every named axis the
rules put on the mesh. A kernel called this way must be independent along those axes (batch rows,
heads). Outside a mesh `per_shard` returns the function itself.
"""
from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable, Iterator, Sequence

Axes = Sequence[str | None] | None   # one logical name per dim; None for an argument that is None
PerShard = Callable[[Callable, Sequence[Axes], Axes], Callable]

_PER_SHARD: contextvars.ContextVar[PerShard | None] = contextvars.ContextVar("per_shard", default=None)


def per_shard(fn: Callable, in_axes: Sequence[Axes], out_axes: Axes) -> Callable:
    """`fn`, to be computed on each device's slice of its arguments where a mesh is in use (see
    `use_per_shard`); `in_axes` holds the logical axes of each positional argument, `out_axes` those of
    the (single array) result."""
    wrap = _PER_SHARD.get()
    return fn if wrap is None else wrap(fn, in_axes, out_axes)


@contextlib.contextmanager
def use_per_shard(wrap: PerShard) -> Iterator[None]:
    """While active, `per_shard(fn, in_axes, out_axes)` returns `wrap(fn, in_axes, out_axes)`. A jitted
    function keeps what it traced: enter this around its first call."""
    token = _PER_SHARD.set(wrap)
    try:
        yield
    finally:
        _PER_SHARD.reset(token)
