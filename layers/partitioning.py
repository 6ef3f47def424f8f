"""How layers reach a device mesh without seeing one: a small object passed with the layer context.

A fused kernel (our Pallas kernels, cuDNN's or splash attention) is one opaque call to XLA's partitioner:
it cannot split a Pallas call, so it gathers the operands and runs the whole call on every device, and
cuDNN's partitioner rejects operands laid out unlike each other. Layers therefore call their kernels
through `partitioning.per_shard(fn, in_axes, out_axes)`, naming the logical axes of each operand and of
the result, as they name the axes of their weights; `zoo.sharding.partitioning` builds the object whose
`per_shard` wraps the call in a shard_map giving each device its slice of every named axis the rules put
on the mesh (a kernel called this way must be independent along those axes: batch rows, heads). MoE
layers compute their routed experts with `partitioning.routed_experts` (an expert-parallel version on a
mesh with an `expert` axis). `UNPARTITIONED`, the default, calls everything as it is.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

Axes = Sequence[str | None] | None   # one logical name per dim; None for an argument that is None
PerShard = Callable[[Callable, Sequence[Axes], Axes], Callable]


def whole(fn: Callable, in_axes: Sequence[Axes], out_axes: Axes) -> Callable:
    """`fn` itself: no mesh, every call sees whole arrays."""
    return fn


@dataclasses.dataclass(frozen=True)
class Partitioning:
    """per_shard(fn, in_axes, out_axes): `fn` computed on each device's slice of its arguments (`in_axes`:
    the logical axes of each positional argument; `out_axes`: those of the single array result).
    routed_experts: a drop-in for `layers.moe.routed_experts` (same arguments, same result), or None for
    that function itself."""
    per_shard: PerShard = whole
    routed_experts: Callable | None = None


UNPARTITIONED = Partitioning()
