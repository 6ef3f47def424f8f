"""Pieces shared by the Mosaic GPU (Hopper: TMA + wgmma, warp-specialised) flash-attention kernels.

Every program runs WARPGROUPS compute warpgroups of ROWS rows each and one memory warpgroup that streams
blocks through a ring of shared-memory slots with TMA; a slot is refilled once every compute warpgroup
has released it. Neighbouring query heads of one kv head run as a cluster of CLUSTER CTAs that walk the
same key blocks, so each CTA loads 1/CLUSTER of every K/V block and TMA multicasts it into all of them
(this halves the L2 traffic per program). These kernels need a Hopper GPU: no interpreter runs them.
"""
from __future__ import annotations

import functools
import math

import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels.flash_blocks import walk_blocks

ROWS = 64            # query tokens per compute warpgroup (one wgmma M tile)
WARPGROUPS = 2       # compute warpgroups per program
CLUSTER = 2          # query heads per cluster sharing K/V loads (1 where a kv head has an odd number of them)
LOG2E = math.log2(math.e)


def smem_tiled(shape, dtype, swizzle: int = 128):
    """Shared memory in the swizzled (8, swizzle bytes) tiling that TMA writes and wgmma reads; a wgmma
    contracts over whole tiles, so a 64-byte swizzle lets it contract over 32 16-bit elements."""
    tile = (8, swizzle // jnp.dtype(dtype).itemsize)
    return plgpu.SMEM(shape, dtype, transforms=(plgpu.TilingTransform(tile), plgpu.SwizzleTransform(swizzle)))


def mask_invisible(s_XY, t_first, key_first, *, keys_axis: int, window: int):
    """Scores (WGMMA layout) of consecutive query tokens from t_first and keys from key_first, keys along
    `keys_axis`: -inf where the key is in the query's future or outside its window."""
    iota = lambda axis: plgpu.broadcasted_iota(jnp.int32, s_XY.shape, axis, layout=plgpu.Layout.WGMMA)
    t, key = t_first + iota(1 - keys_axis), key_first + iota(keys_axis)
    visible = key <= t
    if window:
        visible &= t - key < window
    return jnp.where(visible, s_XY, -jnp.inf)


def feed_ring(steps, stages: int, streams):
    """The memory warpgroup's loop: for each step j in [0, steps), each stream's copy(j, slot) into ring slot
    j % stages, once the stream's `free` barrier reports the slot's previous step released. At the end it
    waits for the last releases too, so no CTA of a cluster exits while a peer still signals its barriers.
    streams: (free barriers [stages], copy) pairs."""
    def fill(j, wait: bool):
        slot = lax.rem(j, stages)
        for free, copy in streams:
            if wait:
                plgpu.barrier_wait(free.at[slot])
            copy(j, slot)

    for first in range(stages):
        pl.when(first < steps)(functools.partial(fill, first, wait=False))
    pl.loop(stages, steps)(functools.partial(fill, wait=True))

    @pl.loop(lax.max(0, steps - stages), steps)
    def _drain(j):
        for free, _ in streams:
            plgpu.barrier_wait(free.at[lax.rem(j, stages)])


def wait_slot(ready, slot, parts: int = 1):
    """Wait for a ring slot's copies to land; `ready` holds `parts` barriers per slot (one per column part)."""
    for h in range(parts):
        plgpu.barrier_wait(ready.at[slot * parts + h])


def release_slot(slot, streams, parts: int = 1):
    """Wait for a ring slot and hand it back unread. streams: (ready, free) barrier pairs."""
    for ready, free in streams:
        wait_slot(ready, slot, parts)
        plgpu.barrier_arrive(free.at[slot])


def walk_program_blocks(lo_p, lo, hi, hi_p, whole, step, release, carry):
    """A compute warpgroup's pass over the program's blocks [lo_p, hi_p): those outside its own [lo, hi) are
    released unread; step(j, carry, masked) runs over [lo, hi), unmasked on the `whole` range."""
    lax.fori_loop(lo_p, lo, lambda j, _: release(j), None)
    carry = walk_blocks(lo, hi, whole, step, carry, segmented=False)
    lax.fori_loop(hi, hi_p, lambda j, _: release(j), None)
    return carry


def column_part(ref, h: int, parts: int):
    """Column part h of `parts` of a gmem ref's last axis (the ref itself when there is one part)."""
    width = ref.shape[-1] // parts
    return ref.at[..., pl.ds(h * width, width)] if parts > 1 else ref


def stream_kv(k_ref, v_ref, k_smem, v_smem, k_ready, v_ready, k_free, v_free, *, b, kv_head, lo, hi,
               block_kv: int, stages: int, parts: int, rounds: int = 1):
    """The memory warpgroup of the forward and of dQ: key and value blocks [lo, hi) of one kv head, `rounds`
    times over, into their rings [stages, parts, block_kv, width], each TMA-multicast over the cluster."""
    def load(src, dst, ready):
        def copy(step, slot):
            j = lo + lax.rem(step, hi - lo)
            for h in range(parts):
                plgpu.copy_gmem_to_smem(column_part(src.at[b, pl.ds(j * block_kv, block_kv), kv_head], h, parts),
                                        dst.at[slot, h], ready.at[slot * parts + h], collective_axes="cluster")
        return copy
    feed_ring(rounds * (hi - lo), stages,
               [(k_free, load(k_ref, k_smem, k_ready)), (v_free, load(v_ref, v_smem, v_ready))])

