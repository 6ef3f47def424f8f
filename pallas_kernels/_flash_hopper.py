"""Mosaic GPU (Hopper: TMA + wgmma, warp-specialised) forward and backward of dense causal flash attention.

The Triton forward (`_flash_gpu`) cannot issue Hopper's asynchronous warpgroup matmuls from shared
memory; this one can. One program per (query head, query tile, batch) runs three warpgroups:

  two compute warpgroups  S = Q K^T and O = alpha O + P V on the tensor cores (wgmma, O accumulated in
                          place), online softmax in registers (base 2, the scale folded into one multiply);
  one memory warpgroup    streams the tile's key/value blocks into a ring of `stages` shared-memory slots
                          with TMA, refilling a slot once both compute warpgroups have released it.

Up to d 256 each compute warpgroup owns 64 query tokens (tile 128). At d 512 a 64 x 512 float32 accumulator
does not fit one warpgroup's registers: both own the same 64 tokens, each accumulates half of the output
columns, and both compute the full scores (tile 64; one ring slot, as Q and a K/V block take 192 KiB).

Programs of neighbouring query heads of one kv head run as a cluster of `CLUSTER` CTAs: they walk the same key
blocks, so each CTA loads 1/CLUSTER of every K/V block and TMA multicasts it into all of them (a slot is
refilled once every compute warpgroup of the cluster has released it). This halves the L2 traffic per
program, which bounds d 512 (64 query tokens per 128 KiB K/V block). On sliding-window layers a CTA takes
two query heads in turn (`default_heads_per_program`): a program there walks only a few key blocks, and
loading its Q and filling the ring would otherwise stall it each time.

Key blocks are walked over the program's range (the union of both warpgroups' visible blocks, so the cost
per token of a sliding window is flat in the sequence); a warpgroup waits for and releases the blocks
outside its own range without computing, and masks only the blocks it does not see whole. Queries read
their own head, keys and values their kv head (GQA: the G heads of a kv head hit the same blocks in L2).

The backward (d 64-256, below `backward`) is two more kernels of the same make: a dQ walk over key blocks
and a dK/dV walk over the query blocks of every query head of a kv head (at d 256 its two warpgroups share
one key block and split the work by product, dV on one and dK on the other).

Layout is the caller's: q, o [B, T, N, H]; k, v [B, T, K, H]; the log-sum-exp comes out as [B, N, T] in
natural-log units, which this backward reads as it is and the Triton backward once moved to its row
layout. Tokens are padded to whole tiles and key blocks. No interpreter runs these kernels (the GPU
interpreter takes neither a transposed nor a register wgmma operand), so their tests need a Hopper GPU.
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels.common import gpu_compute_capability, pad_axis, round_up
from pallas_kernels._flash_gpu import key_block_range, row_block_range, walk_blocks, whole_key_blocks, \
    whole_row_blocks

_F32 = jnp.float32
ROWS = 64            # query tokens per compute warpgroup (one wgmma M tile)
WARPGROUPS = 2       # compute warpgroups per program
MAX_WARPGROUP_COLUMNS = 256   # float32 accumulator columns one warpgroup holds in registers
HEAD_DIMS = (64, 128, 256, 512)
DTYPES = (jnp.bfloat16, jnp.float16)
CLUSTER = 2          # query heads per cluster sharing K/V loads (1 where a kv head has an odd number of them)
_LOG2E = math.log2(math.e)
_UNSEEN = -1e30      # running max before any visible key: finite, so a fully masked block adds exp2(-inf) = 0


def _smem_tiled(shape, dtype, swizzle: int = 128):
    """Shared memory in the swizzled (8, swizzle bytes) tiling that TMA writes and wgmma reads; a wgmma
    contracts over whole tiles, so a 64-byte swizzle lets it contract over 32 16-bit elements."""
    tile = (8, swizzle // jnp.dtype(dtype).itemsize)
    return plgpu.SMEM(shape, dtype, transforms=(plgpu.TilingTransform(tile), plgpu.SwizzleTransform(swizzle)))


def _masked(s_XY, t_first, key_first, *, keys_axis: int, window: int):
    """Scores (WGMMA layout) of consecutive query tokens from t_first and keys from key_first, keys along
    `keys_axis`: -inf where the key is in the query's future or outside its window."""
    iota = lambda axis: plgpu.broadcasted_iota(jnp.int32, s_XY.shape, axis, layout=plgpu.Layout.WGMMA)
    t, key = t_first + iota(1 - keys_axis), key_first + iota(keys_axis)
    visible = key <= t
    if window:
        visible &= t - key < window
    return jnp.where(visible, s_XY, -jnp.inf)


def _feed_ring(steps, stages: int, streams):
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


def _wait(ready, slot, parts: int = 1):
    """Wait for a ring slot's copies to land; `ready` holds `parts` barriers per slot (one per column part)."""
    for h in range(parts):
        plgpu.barrier_wait(ready.at[slot * parts + h])


def _release(slot, streams, parts: int = 1):
    """Wait for a ring slot and hand it back unread. streams: (ready, free) barrier pairs."""
    for ready, free in streams:
        _wait(ready, slot, parts)
        plgpu.barrier_arrive(free.at[slot])


def _walk(lo_p, lo, hi, hi_p, whole, step, release, carry):
    """A compute warpgroup's pass over the program's blocks [lo_p, hi_p): those outside its own [lo, hi) are
    released unread; step(j, carry, masked) runs over [lo, hi), unmasked on the `whole` range."""
    lax.fori_loop(lo_p, lo, lambda j, _: release(j), None)
    carry = walk_blocks(lo, hi, whole, step, carry, segmented=False)
    lax.fori_loop(hi, hi_p, lambda j, _: release(j), None)
    return carry


def _column_part(ref, h: int, parts: int):
    """Column part h of `parts` of a gmem ref's last axis (the ref itself when there is one part)."""
    width = ref.shape[-1] // parts
    return ref.at[..., pl.ds(h * width, width)] if parts > 1 else ref


def _stream_kv(k_ref, v_ref, k_smem, v_smem, k_ready, v_ready, k_free, v_free, *, b, kv_head, lo, hi,
               block_kv: int, stages: int, parts: int, rounds: int = 1):
    """The memory warpgroup of the forward and of dQ: key and value blocks [lo, hi) of one kv head, `rounds`
    times over, into their rings [stages, parts, block_kv, width], each TMA-multicast over the cluster."""
    def load(src, dst, ready):
        def copy(step, slot):
            j = lo + lax.rem(step, hi - lo)
            for h in range(parts):
                plgpu.copy_gmem_to_smem(_column_part(src.at[b, pl.ds(j * block_kv, block_kv), kv_head], h, parts),
                                        dst.at[slot, h], ready.at[slot * parts + h], collective_axes="cluster")
        return copy
    _feed_ring(rounds * (hi - lo), stages,
               [(k_free, load(k_ref, k_smem, k_ready)), (v_free, load(v_ref, v_smem, v_ready))])


def _kernel(q_ref, k_ref, v_ref, o_ref, lse_ref, q_smem, k_smem, v_smem, lse_smem, q_ready, k_ready, v_ready,
            k_free, v_free, both_done, *, scale: float, window: int, tokens: int, groups: int, block_kv: int,
            stages: int, parts: int, cluster: int, rounds: int):
    """parts = 1: each compute warpgroup owns 64 tokens. parts = 2 (d 512): both own the same 64 tokens, the
    head dim is held in two column parts (each TMA copy and smem buffer contiguous), the scores sum both
    parts and warpgroup w accumulates the output columns of part w. A program takes `rounds` query heads of
    its kv head in turn (parts = 1): the ring streams on from one head's key blocks to the next, and the
    next head's Q loads into a second buffer while this one's is in use."""
    # a cluster holds `cluster` neighbouring query heads of one kv head: they walk the same key blocks, so
    # each CTA loads 1/cluster of every K/V block and TMA multicasts it to all of them
    head = lambda r: (lax.axis_index("heads") * rounds + r) * cluster + lax.axis_index("cluster")
    b = lax.axis_index("batch")
    # CTAs launch in grid order, heads fastest: the last (longest, under causality) tiles go first, so
    # the short ones fill the tail of the last wave
    tile = lax.axis_size("tiles") - 1 - lax.axis_index("tiles")
    wg = lax.axis_index("wg")
    split = parts > 1
    width = q_ref.shape[-1] // parts
    blocks = functools.partial(key_block_range, bq=ROWS, bk=block_kv, groups=1, tokens=tokens, window=window)
    # the program's 64-token row blocks: one per warpgroup, or one shared by both (split)
    first_i, last_i = (tile, tile) if split else (tile * WARPGROUPS, tile * WARPGROUPS + WARPGROUPS - 1)
    lo_p, hi_p = blocks(first_i)[0], blocks(last_i)[1]    # each round walks key blocks [lo_p, hi_p)
    per_round = hi_p - lo_p

    @pl.when(wg < WARPGROUPS)
    def _compute():
        plgpu.set_max_registers(232, action="increase")
        i = first_i if split else first_i + wg            # this warpgroup's row block
        q0 = i * ROWS
        q_bufs = q_smem.shape[1]
        q_buf = lambda r: q_smem.at[lax.rem(r, q_smem.shape[0]), 0 if split else wg]   # [parts, ROWS, width]
        q_landed = lambda r, h: q_ready.at[lax.rem(r, q_smem.shape[0]) * q_bufs * parts + (h if split else wg)]

        def load_q(r):
            def issue():
                for h in range(parts):
                    plgpu.copy_gmem_to_smem(_column_part(q_ref.at[b, pl.ds(q0, ROWS), head(r)], h, parts),
                                            q_buf(r).at[h], q_landed(r, h))
            pl.when(wg == 0)(issue) if split else issue()
        lo, hi = blocks(i)
        whole = whole_key_blocks(i, lo, hi, bq=ROWS, bk=block_kv, groups=1, window=window)

        def one_round(r, _):
            n, q_r = head(r), q_buf(r)

            @pl.when(r + 1 < rounds)
            def _prefetch():          # into the buffer whose output (round r - 1) may still be going out
                plgpu.wait_smem_to_gmem(0, wait_read_only=True)
                load_q(r + 1)
            for h in range(parts):
                plgpu.barrier_wait(q_landed(r, h))
            slot_of = lambda j: lax.rem(r * per_round + j - lo_p, stages)

            def release(j):
                _release(slot_of(j), ((k_ready, k_free), (v_ready, v_free)), parts)

            def step(j, carry, masked: bool):
                acc_RH, m_R, l_R = carry
                slot = slot_of(j)
                _wait(k_ready, slot, parts)

                def scores(s_ref):
                    for h in range(parts):
                        plgpu.wgmma(s_ref, q_r.at[h], k_smem.at[slot, h].transpose((1, 0)))
                    return s_ref[...]
                s_RS = pl.run_scoped(scores, plgpu.ACC((ROWS, block_kv), _F32))
                plgpu.barrier_arrive(k_free.at[slot])
                s_RS = s_RS * (scale * _LOG2E)
                if masked:
                    s_RS = _masked(s_RS, q0, j * block_kv, keys_axis=1, window=window)
                m_new = jnp.maximum(m_R, s_RS.max(axis=1))
                alpha_R = jnp.exp2(m_R - m_new)
                p_RS = jnp.exp2(s_RS - lax.broadcast_in_dim(m_new, s_RS.shape, [0]))
                l_R = l_R * alpha_R + p_RS.sum(axis=1)
                _wait(v_ready, slot, parts)

                def values(acc_ref):     # O = alpha O + P V, accumulated in place on the tensor cores
                    plgpu.wgmma(acc_ref, p_RS.astype(q_ref.dtype), v_smem.at[slot, wg if split else 0])
                acc_RH = pl.run_state(values)(
                    plgpu.ACC.init(acc_RH * lax.broadcast_in_dim(alpha_R, acc_RH.shape, [0])))
                plgpu.barrier_arrive(v_free.at[slot])
                return acc_RH, m_new, l_R

            carry = (plgpu.layout_cast(jnp.zeros((ROWS, width), _F32), plgpu.Layout.WGMMA),
                     plgpu.layout_cast(jnp.full((ROWS,), _UNSEEN, _F32), plgpu.Layout.WGMMA.reduce(1)),
                     plgpu.layout_cast(jnp.zeros((ROWS,), _F32), plgpu.Layout.WGMMA.reduce(1)))
            acc_RH, m_R, l_R = _walk(lo_p, lo, hi, hi_p, whole, step, release, carry)

            if split:    # the shared Q buffer takes the output only once both have read Q for the last time
                plgpu.barrier_arrive(both_done)
                plgpu.barrier_wait(both_done)
            plgpu.wait_smem_to_gmem(0, wait_read_only=True)    # the previous round's lse has gone out
            o_buf = q_r.at[wg if split else 0]
            o_buf[...] = (acc_RH / lax.broadcast_in_dim(l_R, acc_RH.shape, [0])).astype(o_ref.dtype)
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(o_buf, _column_part(o_ref.at[b, pl.ds(q0, ROWS), n], wg, parts))

            def write_lse():
                lse_smem.at[wg][...] = (m_R + jnp.log2(l_R)) / _LOG2E
                plgpu.commit_smem()
                plgpu.copy_smem_to_gmem(lse_smem.at[wg], lse_ref.at[b, n, pl.ds(q0, ROWS)])
            pl.when(wg == 0)(write_lse) if split else write_lse()   # split: both hold the same rows

        load_q(0)
        lax.fori_loop(0, rounds, one_round, None)
        plgpu.wait_smem_to_gmem(0)

    @pl.when(wg == WARPGROUPS)
    def _memory():
        plgpu.set_max_registers(40, action="decrease")
        _stream_kv(k_ref, v_ref, k_smem, v_smem, k_ready, v_ready, k_free, v_free,
                   kv_head=lax.div(head(0), groups), b=b, lo=lo_p, hi=hi_p, block_kv=block_kv, stages=stages,
                   parts=parts, rounds=rounds)


def runs_on_this_device() -> bool:
    """wgmma exists only on Hopper (compute capability 9.x)."""
    return gpu_compute_capability() == 9


def fits(q_BTNH, *, sinks: bool, segmented: bool) -> bool:
    """Whether this forward can run the call: 16-bit operands, head dim 64/128/256/512, no sinks or segments."""
    return (not sinks and not segmented and q_BTNH.dtype in DTYPES and q_BTNH.shape[-1] in HEAD_DIMS)


def default_tiles(head_dim: int) -> tuple[int, int]:
    """(keys per ring slot, slots). 128 x 2 up to d 128; 64 x 2 at d 256 (two slots of 128 x 256 overflow
    shared memory); 64 x 1 at d 512, where the warpgroups split the value columns and Q takes 64 KiB."""
    return {64: (128, 2), 128: (128, 2), 256: (64, 2), 512: (64, 1)}[head_dim]


def default_heads_per_program(T: int, groups: int, head_dim: int, *, window: int, cluster: int) -> int:
    """2 on sliding-window layers (a window shorter than the sequence) at head dim <= 128 where the cluster
    leaves an even number of query heads per kv head, else 1. On the H100 two heads per program took Laguna
    sliding (window 512) from 1.09-1.11x of cuDNN's forward time to 1.01-1.03x at 16K tokens; full-causal
    programs are long enough that it did not pay (docs/benchmarks.md)."""
    return 2 if 0 < window < T and head_dim <= 128 and (groups // cluster) % 2 == 0 else 1


def forward(q_BTNH, k_BTKH, v_BTKH, *, scale: float, window: int, block_kv: int | None = None,
            stages: int | None = None, cluster: int | None = None, heads_per_program: int | None = None):
    """(o [B, T, N, H] in q's dtype, lse [B, N, T] float32); T is padded to whole tiles here (padding keys
    come after every real query, so causality hides them; padding queries are cut off). `cluster` query heads
    share each K/V load; it must divide the query heads per kv head (default CLUSTER where it does, else 1).
    Each CTA takes `heads_per_program` query heads in turn (head dim <= 128, where a second Q buffer fits
    shared memory), so short programs pay the start of a program less often; by default
    `default_heads_per_program`."""
    B, T, N, H = q_BTNH.shape
    K = k_BTKH.shape[2]
    if cluster is None:
        cluster = CLUSTER if (N // K) % CLUSTER == 0 else 1
    elif (N // K) % cluster:
        raise ValueError(f"cluster={cluster} must divide the {N // K} query heads per kv head")
    if heads_per_program is None:
        heads_per_program = default_heads_per_program(T, N // K, H, window=window, cluster=cluster)
    if (N // K) % (cluster * heads_per_program):
        raise ValueError(f"cluster={cluster} x heads_per_program={heads_per_program} must divide the {N // K} "
                         "query heads per kv head")
    if heads_per_program > 1 and H > 128:
        raise ValueError(f"heads_per_program > 1 takes head dim <= 128 (a second Q buffer must fit shared "
                         f"memory), got {H}")
    default_block_kv, default_stages = default_tiles(H)
    block_kv, stages = block_kv or default_block_kv, stages or default_stages
    # d 512: a 64 x 512 float32 accumulator does not fit one warpgroup's registers, so both warpgroups take
    # the same 64 tokens, each half of the value columns (and both compute the full scores)
    parts = -(-H // MAX_WARPGROUP_COLUMNS)
    tile = ROWS if parts > 1 else ROWS * WARPGROUPS
    Tp = round_up(T, math.lcm(tile, block_kv))
    if Tp != T:
        o, lse = forward(*(pad_axis(x, 1, Tp) for x in (q_BTNH, k_BTKH, v_BTKH)), scale=scale, window=window,
                         block_kv=block_kv, stages=stages, cluster=cluster, heads_per_program=heads_per_program)
        return o[:, :T], lse[:, :, :T]
    dtype, width = q_BTNH.dtype, H // parts
    kernel = functools.partial(_kernel, scale=scale, window=window, tokens=T, groups=N // K, block_kv=block_kv,
                               stages=stages, parts=parts, cluster=cluster, rounds=heads_per_program)
    q_bufs = 1 if parts > 1 else WARPGROUPS
    q_rounds = 2 if heads_per_program > 1 else 1      # the next head's Q loads while this one's is in use
    return plgpu.kernel(
        kernel,
        out_type=(jax.ShapeDtypeStruct((B, T, N, H), dtype), jax.ShapeDtypeStruct((B, N, T), _F32)),
        scratch_types=(
            _smem_tiled((q_rounds, q_bufs, parts, ROWS, width), dtype),  # Q, then O
            _smem_tiled((stages, parts, block_kv, width), dtype),   # key ring
            _smem_tiled((stages, parts, block_kv, width), dtype),   # value ring
            plgpu.SMEM((WARPGROUPS, ROWS), _F32),                # log-sum-exp out
            plgpu.Barrier(num_barriers=q_rounds * q_bufs * parts),  # Q landed
            plgpu.Barrier(num_barriers=stages * parts),          # key slot filled (per part)
            plgpu.Barrier(num_barriers=stages * parts),          # value slot filled (per part)
            # key / value slot released by both compute warpgroups of every CTA in the cluster
            plgpu.ClusterBarrier(collective_axes=("cluster",), num_arrivals=WARPGROUPS, num_barriers=stages),
            plgpu.ClusterBarrier(collective_axes=("cluster",), num_arrivals=WARPGROUPS, num_barriers=stages),
            plgpu.Barrier(num_arrivals=WARPGROUPS),              # both done with the shared Q (parts > 1)
        ),
        grid=(N // (cluster * heads_per_program), T // tile, B),
        grid_names=("heads", "tiles", "batch"),
        cluster=(cluster,),
        cluster_names=("cluster",),
        num_threads=WARPGROUPS + 1,
        thread_name="wg",
        compiler_params=plgpu.CompilerParams(approx_math=True),
    )(q_BTNH, k_BTKH, v_BTKH)


# ---------------------------------------------------------------------------------------------------------
# Backward: dQ walks key blocks like the forward; dK/dV walks, for each key tile, the query blocks of every
# query head of its kv head (so GQA needs no reduction over heads afterwards). Both recompute
# P = exp2(S - lse) from the forward's log-sum-exp; delta = rowsum(O * dO) comes in precomputed.
#   dP = dO V^T,  dS = P * (dP - delta),  dQ = scale dS K,  dK = scale dS^T Q,  dV = P^T dO.
BACKWARD_HEAD_DIMS = (64, 128, 256)


def backward_tiles(head_dim: int) -> tuple[int, int, int, int]:
    """(keys per dQ ring slot, dQ slots, query tokens per dK/dV ring slot, dK/dV slots). At d 256 the rows'
    Q and dO take 128 KiB of shared memory in dQ and the K, V and P^T buffers 80 KiB in dK/dV, so the rings
    shrink to what is left of Hopper's 227 KiB."""
    return (32, 2, 64, 2) if head_dim > 128 else (64, 3, 64, 3)


def _dq_kernel(q_ref, k_ref, v_ref, do_ref, lse2_ref, delta_ref, dq_ref, q_smem, do_smem, k_smem, v_smem, vec_smem,
               row_ready, k_ready, v_ready, k_free, v_free, *, scale: float, window: int, tokens: int, groups: int,
               block_kv: int, stages: int, cluster: int):
    """One program per (query head, 128-token tile, batch); warpgroup w owns the tile's 64-token row block w.
    K/V blocks stream through a ring as in the forward (shared by a cluster of query heads)."""
    n = lax.axis_index("heads") * cluster + lax.axis_index("cluster")
    b, wg = lax.axis_index("batch"), lax.axis_index("wg")
    tile = lax.axis_size("tiles") - 1 - lax.axis_index("tiles")    # longest first
    blocks = functools.partial(key_block_range, bq=ROWS, bk=block_kv, groups=1, tokens=tokens, window=window)
    lo_p, hi_p = blocks(tile * WARPGROUPS)[0], blocks(tile * WARPGROUPS + WARPGROUPS - 1)[1]

    @pl.when(wg < WARPGROUPS)
    def _compute():
        plgpu.set_max_registers(232, action="increase")
        i = tile * WARPGROUPS + wg
        q0 = i * ROWS
        rows = (b, pl.ds(q0, ROWS), n)
        q_buf, do_buf = q_smem.at[wg], do_smem.at[wg]
        copies = ((q_ref.at[rows], q_buf), (do_ref.at[rows], do_buf),
                  (lse2_ref.at[b, n, pl.ds(q0, ROWS)], vec_smem.at[wg, 0]),
                  (delta_ref.at[b, n, pl.ds(q0, ROWS)], vec_smem.at[wg, 1]))
        for src, dst in copies:
            plgpu.copy_gmem_to_smem(src, dst, row_ready.at[wg])
        plgpu.barrier_wait(row_ready.at[wg])
        lse2_R, delta_R = (plgpu.load(vec_smem.at[wg, c], (), layout=plgpu.Layout.WGMMA.reduce(1)) for c in (0, 1))
        lo, hi = blocks(i)

        def release(j):
            _release(lax.rem(j - lo_p, stages), ((k_ready, k_free), (v_ready, v_free)))

        def step(j, dq_RH, masked: bool):
            slot = lax.rem(j - lo_p, stages)
            plgpu.barrier_wait(k_ready.at[slot])
            plgpu.barrier_wait(v_ready.at[slot])

            def scores(s_ref, dp_ref):     # S = Q K^T and dP = dO V^T, issued together
                plgpu.wgmma(s_ref, q_buf, k_smem.at[slot, 0].transpose((1, 0)))
                plgpu.wgmma(dp_ref, do_buf, v_smem.at[slot, 0].transpose((1, 0)))
                return s_ref[...], dp_ref[...]
            s_RS, dp_RS = pl.run_scoped(scores, plgpu.ACC((ROWS, block_kv), _F32), plgpu.ACC((ROWS, block_kv), _F32))
            plgpu.barrier_arrive(v_free.at[slot])
            s_RS = s_RS * (scale * _LOG2E)
            if masked:
                s_RS = _masked(s_RS, q0, j * block_kv, keys_axis=1, window=window)
            p_RS = jnp.exp2(s_RS - lax.broadcast_in_dim(lse2_R, s_RS.shape, [0]))
            ds_RS = p_RS * (dp_RS - lax.broadcast_in_dim(delta_R, s_RS.shape, [0]))

            def grad(acc_ref):
                plgpu.wgmma(acc_ref, ds_RS.astype(q_ref.dtype), k_smem.at[slot, 0])
            dq_RH = pl.run_state(grad)(plgpu.ACC.init(dq_RH))
            plgpu.barrier_arrive(k_free.at[slot])
            return dq_RH

        dq_RH = plgpu.layout_cast(jnp.zeros((ROWS, q_ref.shape[-1]), _F32), plgpu.Layout.WGMMA)
        whole = whole_key_blocks(i, lo, hi, bq=ROWS, bk=block_kv, groups=1, window=window)
        dq_RH = _walk(lo_p, lo, hi, hi_p, whole, step, release, dq_RH)
        q_buf[...] = (dq_RH * scale).astype(dq_ref.dtype)
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(q_buf, dq_ref.at[rows])
        plgpu.wait_smem_to_gmem(0)

    @pl.when(wg == WARPGROUPS)
    def _memory():
        plgpu.set_max_registers(40, action="decrease")
        _stream_kv(k_ref, v_ref, k_smem, v_smem, k_ready, v_ready, k_free, v_free, b=b, kv_head=lax.div(n, groups),
                   lo=lo_p, hi=hi_p, block_kv=block_kv, stages=stages, parts=1)


def _query_blocks(*, tokens: int, window: int, block_q: int, keys: int):
    """row_block_range for the dK/dV kernels: the `block_q`-token query blocks that see a block of `keys` keys."""
    return functools.partial(row_block_range, bq=block_q, bk=keys, groups=1, tokens=tokens, window=window,
                             n_row_blocks=tokens // block_q)


def _feed_query_blocks(q_ref, do_ref, lse2_ref, delta_ref, q_smem, do_smem, vec_smem, q_ready, do_ready, q_free,
                       do_free, *, b, kv_head, groups: int, lo_p, per_head, block_q: int, stages: int):
    """The memory warpgroup of dK/dV: for each query head of the kv head in turn, its query blocks
    [lo_p, lo_p + per_head) into two rings, Q with its rows' lse and delta (3 copies per slot) and dO."""
    def rows(step):
        n, i = kv_head * groups + lax.div(step, per_head), lo_p + lax.rem(step, per_head)
        return n, pl.ds(i * block_q, block_q)

    def load_q(step, slot):
        n, t = rows(step)
        plgpu.copy_gmem_to_smem(q_ref.at[b, t, n], q_smem.at[slot], q_ready.at[slot])
        for c, src in enumerate((lse2_ref, delta_ref)):
            plgpu.copy_gmem_to_smem(src.at[b, n, t], vec_smem.at[slot, c], q_ready.at[slot])

    def load_do(step, slot):
        n, t = rows(step)
        plgpu.copy_gmem_to_smem(do_ref.at[b, t, n], do_smem.at[slot], do_ready.at[slot])
    _feed_ring(groups * per_head, stages, [(q_free, load_q), (do_free, load_do)])


def _write_out(pairs):
    """Each (smem buffer, gmem destination) pair out through TMA, once the stores to the buffers are visible."""
    plgpu.commit_smem()
    for buf, dst in pairs:
        plgpu.copy_smem_to_gmem(buf, dst)
    plgpu.wait_smem_to_gmem(0)


def _scores_t(k_buf, q_buf, *, masked: bool, t_first, key_first, scale: float, window: int):
    """S^T = K Q^T of a 64-key block and a query block in base-2 units (keys in rows, queries in columns),
    -inf where invisible on a `masked` block."""
    def scores(st_ref):
        plgpu.wgmma(st_ref, k_buf, q_buf.transpose((1, 0)))
        return st_ref[...]
    st_KQ = pl.run_scoped(scores, plgpu.ACC((ROWS, q_buf.shape[0]), _F32)) * (scale * _LOG2E)
    return _masked(st_KQ, t_first, key_first, keys_axis=0, window=window) if masked else st_KQ


def _dkv_kernel(q_ref, k_ref, v_ref, do_ref, lse2_ref, delta_ref, dk_ref, dv_ref, k_smem, v_smem, q_smem, do_smem,
                vec_smem, key_ready, q_ready, do_ready, q_free, do_free, *, scale: float, window: int, tokens: int,
                groups: int, block_q: int, stages: int):
    """d <= 128. One program per (kv head, 128-key tile, batch); warpgroup w owns the tile's 64-key block w and
    accumulates its dK and dV in registers. The memory warpgroup streams, for each query head g of the kv
    head in turn, the query blocks that see the tile (Q with its lse and delta, and dO) through a ring."""
    kv_head, b, wg = lax.axis_index("heads"), lax.axis_index("batch"), lax.axis_index("wg")
    tile = lax.axis_index("tiles")     # the first key tiles have the most queries and go first
    queries = _query_blocks(tokens=tokens, window=window, block_q=block_q, keys=ROWS)
    lo_p, hi_p = queries(tile * WARPGROUPS)[0], queries(tile * WARPGROUPS + WARPGROUPS - 1)[1]
    per_head = hi_p - lo_p         # query blocks walked per query head; step g * per_head + (i - lo_p)

    @pl.when(wg < WARPGROUPS)
    def _compute():
        plgpu.set_max_registers(232, action="increase")
        j = tile * WARPGROUPS + wg
        s0 = j * ROWS
        k_buf, v_buf = k_smem.at[wg], v_smem.at[wg]
        for src, dst in ((k_ref, k_buf), (v_ref, v_buf)):
            plgpu.copy_gmem_to_smem(src.at[b, pl.ds(s0, ROWS), kv_head], dst, key_ready.at[wg])
        plgpu.barrier_wait(key_ready.at[wg])
        lo, hi = queries(j)
        whole = whole_row_blocks(j, lo, hi, bq=block_q, bk=ROWS, groups=1, window=window)
        zeros_KQ = plgpu.layout_cast(jnp.zeros((ROWS, block_q), _F32), plgpu.Layout.WGMMA)

        def release(step):
            _release(lax.rem(step, stages), ((q_ready, q_free), (do_ready, do_free)))

        def step(i, carry, masked: bool, head: int):
            dk_KH, dv_KH = carry
            slot = lax.rem(head * per_head + i - lo_p, stages)
            plgpu.barrier_wait(q_ready.at[slot])
            st_KQ = _scores_t(k_buf, q_smem.at[slot], masked=masked, t_first=i * block_q, key_first=s0, scale=scale,
                              window=window)
            lse2_Q, delta_Q = (plgpu.load(vec_smem.at[slot, c], (), layout=plgpu.Layout.WGMMA.reduce(0))
                               for c in (0, 1))
            pt_KQ = jnp.exp2(st_KQ - lax.broadcast_in_dim(lse2_Q, st_KQ.shape, [1]))
            plgpu.barrier_wait(do_ready.at[slot])

            def values(refs):              # dV += P^T dO and dP^T = V dO^T, issued together
                dv_ref, dpt_ref = refs
                plgpu.wgmma(dv_ref, pt_KQ.astype(q_ref.dtype), do_smem.at[slot])
                plgpu.wgmma(dpt_ref, v_buf, do_smem.at[slot].transpose((1, 0)))
            dv_KH, dpt_KQ = pl.run_state(values)((plgpu.ACC.init(dv_KH), plgpu.ACC.init(zeros_KQ)))
            plgpu.barrier_arrive(do_free.at[slot])
            dst_KQ = pt_KQ * (dpt_KQ - lax.broadcast_in_dim(delta_Q, st_KQ.shape, [1]))

            def keys(acc_ref):             # dK += dS^T Q
                plgpu.wgmma(acc_ref, dst_KQ.astype(q_ref.dtype), q_smem.at[slot])
            dk_KH = pl.run_state(keys)(plgpu.ACC.init(dk_KH))
            plgpu.barrier_arrive(q_free.at[slot])
            return dk_KH, dv_KH

        def one_head(head, carry):
            return _walk(lo_p, lo, hi, hi_p, whole, functools.partial(step, head=head),
                         lambda i: release(head * per_head + i - lo_p), carry)

        zeros_KH = plgpu.layout_cast(jnp.zeros((ROWS, q_ref.shape[-1]), _F32), plgpu.Layout.WGMMA)
        dk_KH, dv_KH = lax.fori_loop(0, groups, one_head, (zeros_KH, zeros_KH))
        k_buf[...] = (dk_KH * scale).astype(dk_ref.dtype)
        v_buf[...] = dv_KH.astype(dv_ref.dtype)
        _write_out([(buf, dst.at[b, pl.ds(s0, ROWS), kv_head]) for buf, dst in ((k_buf, dk_ref), (v_buf, dv_ref))])

    @pl.when(wg == WARPGROUPS)
    def _memory():
        plgpu.set_max_registers(40, action="decrease")
        _feed_query_blocks(q_ref, do_ref, lse2_ref, delta_ref, q_smem, do_smem, vec_smem, q_ready, do_ready, q_free,
                           do_free, b=b, kv_head=kv_head, groups=groups, lo_p=lo_p, per_head=per_head,
                           block_q=block_q, stages=stages)


def _dkv_split_kernel(q_ref, k_ref, v_ref, do_ref, lse2_ref, delta_ref, dk_ref, dv_ref, k_smem, v_smem, q_smem,
                      do_smem, vec_smem, pt_smem, key_ready, q_ready, do_ready, q_free, do_free, pt_ready, pt_free, *,
                      scale: float, window: int, tokens: int, groups: int, block_q: int, stages: int):
    """d 256: a 64 x 256 float32 accumulator fills a warpgroup's registers, so both own the same 64 keys
    (one program per (kv head, 64-key block, batch)) and split the work by product:
      warpgroup 0  P^T = exp2(K Q^T - lse)  and  dV += P^T dO,
      warpgroup 1  dP^T = V dO^T            and  dK += (P^T * (dP^T - delta)) Q,
    two matmuls each, P^T passing from 0 to 1 through shared memory. Each reads only one of K and V, and
    writes its result over it on the way out."""
    kv_head, b, wg = lax.axis_index("heads"), lax.axis_index("batch"), lax.axis_index("wg")
    j = lax.axis_index("tiles")        # the first key blocks have the most queries and go first
    s0 = j * ROWS
    lo, hi = _query_blocks(tokens=tokens, window=window, block_q=block_q, keys=ROWS)(j)
    per_head = hi - lo
    slot_of = lambda head, i: lax.rem(head * per_head + i - lo, stages)
    rows = (b, pl.ds(s0, ROWS), kv_head)
    zeros_KH = lambda: plgpu.layout_cast(jnp.zeros((ROWS, q_ref.shape[-1]), _F32), plgpu.Layout.WGMMA)

    def accumulate(step):
        """Sum step(i, acc, masked, head) over every query head and its query blocks [lo, hi)."""
        whole = whole_row_blocks(j, lo, hi, bq=block_q, bk=ROWS, groups=1, window=window)
        one_head = lambda head, acc: walk_blocks(lo, hi, whole, functools.partial(step, head=head), acc,
                                                 segmented=False)
        return lax.fori_loop(0, groups, one_head, zeros_KH())

    @pl.when(wg == 0)
    def _values():
        plgpu.set_max_registers(232, action="increase")
        plgpu.copy_gmem_to_smem(k_ref.at[rows], k_smem, key_ready.at[0])
        plgpu.barrier_wait(key_ready.at[0])

        def step(i, dv_KH, masked: bool, head: int):
            slot = slot_of(head, i)
            plgpu.barrier_wait(q_ready.at[slot])
            st_KQ = _scores_t(k_smem, q_smem.at[slot], masked=masked, t_first=i * block_q, key_first=s0,
                              scale=scale, window=window)
            lse2_Q = plgpu.load(vec_smem.at[slot, 0], (), layout=plgpu.Layout.WGMMA.reduce(0))
            plgpu.barrier_arrive(q_free.at[slot])
            pt_KQ = jnp.exp2(st_KQ - lax.broadcast_in_dim(lse2_Q, st_KQ.shape, [1]))
            # the previous P^T must have been read before this one overwrites it
            pl.when(head * per_head + i > lo)(lambda: plgpu.barrier_wait(pt_free))
            pt_smem[...] = pt_KQ
            plgpu.barrier_arrive(pt_ready)
            plgpu.barrier_wait(do_ready.at[slot])

            def values(acc_ref):           # dV += P^T dO
                plgpu.wgmma(acc_ref, pt_KQ.astype(q_ref.dtype), do_smem.at[slot])
            dv_KH = pl.run_state(values)(plgpu.ACC.init(dv_KH))
            plgpu.barrier_arrive(do_free.at[slot])
            return dv_KH

        dv_KH = accumulate(step)
        k_smem[...] = dv_KH.astype(dv_ref.dtype)
        _write_out([(k_smem, dv_ref.at[rows])])

    @pl.when(wg == 1)
    def _keys():
        plgpu.set_max_registers(232, action="increase")
        plgpu.copy_gmem_to_smem(v_ref.at[rows], v_smem, key_ready.at[1])
        plgpu.barrier_wait(key_ready.at[1])

        def step(i, dk_KH, masked: bool, head: int):
            del masked                     # P^T comes in masked
            slot = slot_of(head, i)
            plgpu.barrier_wait(do_ready.at[slot])

            def probabilities_grad(dpt_ref):   # dP^T = V dO^T
                plgpu.wgmma(dpt_ref, v_smem, do_smem.at[slot].transpose((1, 0)))
                return dpt_ref[...]
            dpt_KQ = pl.run_scoped(probabilities_grad, plgpu.ACC((ROWS, block_q), _F32))
            plgpu.barrier_arrive(do_free.at[slot])
            plgpu.barrier_wait(q_ready.at[slot])
            delta_Q = plgpu.load(vec_smem.at[slot, 1], (), layout=plgpu.Layout.WGMMA.reduce(0))
            plgpu.barrier_wait(pt_ready)
            pt_KQ = plgpu.load(pt_smem, (), layout=plgpu.Layout.WGMMA)
            plgpu.barrier_arrive(pt_free)
            dst_KQ = pt_KQ * (dpt_KQ - lax.broadcast_in_dim(delta_Q, dpt_KQ.shape, [1]))

            def keys(acc_ref):             # dK += dS^T Q
                plgpu.wgmma(acc_ref, dst_KQ.astype(q_ref.dtype), q_smem.at[slot])
            dk_KH = pl.run_state(keys)(plgpu.ACC.init(dk_KH))
            plgpu.barrier_arrive(q_free.at[slot])
            return dk_KH

        dk_KH = accumulate(step)
        v_smem[...] = (dk_KH * scale).astype(dk_ref.dtype)
        _write_out([(v_smem, dk_ref.at[rows])])

    @pl.when(wg == WARPGROUPS)
    def _memory():
        plgpu.set_max_registers(40, action="decrease")
        _feed_query_blocks(q_ref, do_ref, lse2_ref, delta_ref, q_smem, do_smem, vec_smem, q_ready, do_ready, q_free,
                           do_free, b=b, kv_head=kv_head, groups=groups, lo_p=lo, per_head=per_head,
                           block_q=block_q, stages=stages)


def backward_fits(q_BTNH) -> bool:
    """Whether the Mosaic GPU backward takes the call (on top of `fits`): head dim 64, 128 or 256."""
    return q_BTNH.shape[-1] in BACKWARD_HEAD_DIMS


def backward(q_BTNH, k_BTKH, v_BTKH, o_BTNH, lse_BNT, do_BTNH, *, scale: float, window: int,
             block_kv: int | None = None, stages_dq: int | None = None, block_q: int | None = None,
             stages_dkv: int | None = None, cluster: int | None = None):
    """(dq, dk, dv) in the inputs' layouts and dtype, from the forward's output and natural-log log-sum-exp
    [B, N, T]. dQ takes `block_kv` keys per ring slot (`stages_dq` slots, `cluster` query heads sharing the
    loads as in the forward); dK/dV `block_q` query tokens per slot (`stages_dkv` slots). Tiles left out
    come from `backward_tiles`."""
    B, T, N, H = q_BTNH.shape
    K = k_BTKH.shape[2]
    G = N // K
    if H not in BACKWARD_HEAD_DIMS:
        raise ValueError(f"the Mosaic GPU backward takes head dim {BACKWARD_HEAD_DIMS}, got {H}")
    if cluster is None:
        cluster = CLUSTER if G % CLUSTER == 0 else 1
    elif G % cluster:
        raise ValueError(f"cluster={cluster} must divide the {G} query heads per kv head")
    defaults = backward_tiles(H)
    block_kv, stages_dq, block_q, stages_dkv = (given or default for given, default in
                                                zip((block_kv, stages_dq, block_q, stages_dkv), defaults))
    split = H > 128
    delta_BNT = jnp.einsum("BTNH,BTNH->BNT", o_BTNH.astype(_F32), do_BTNH.astype(_F32))
    lse2_BNT = lse_BNT * _LOG2E
    tile = ROWS * WARPGROUPS
    Tp = round_up(T, math.lcm(tile, block_kv, block_q))
    # padding: queries get dO = 0 and lse = +inf (P = 0, so they add nothing); keys come after every real query
    q, k, v, do = (pad_axis(x, 1, Tp) for x in (q_BTNH, k_BTKH, v_BTKH, do_BTNH.astype(q_BTNH.dtype)))
    lse2 = jnp.pad(lse2_BNT, ((0, 0), (0, 0), (0, Tp - T)), constant_values=jnp.inf)
    delta = pad_axis(delta_BNT, 2, Tp)
    dtype = q.dtype
    common = dict(scale=scale, window=window, tokens=Tp, groups=G)
    mesh = dict(num_threads=WARPGROUPS + 1, thread_name="wg",
                compiler_params=plgpu.CompilerParams(approx_math=True))
    # dQ += dS K contracts over the `block_kv` keys of a slot, so they must fill whole swizzle tiles
    swizzle = min(128, block_kv * jnp.dtype(dtype).itemsize)
    dq = plgpu.kernel(
        functools.partial(_dq_kernel, block_kv=block_kv, stages=stages_dq, cluster=cluster, **common),
        out_type=jax.ShapeDtypeStruct(q.shape, dtype),
        scratch_types=(
            _smem_tiled((WARPGROUPS, ROWS, H), dtype, swizzle),        # Q, then dQ
            _smem_tiled((WARPGROUPS, ROWS, H), dtype, swizzle),        # dO
            _smem_tiled((stages_dq, 1, block_kv, H), dtype, swizzle),  # key ring (one column part)
            _smem_tiled((stages_dq, 1, block_kv, H), dtype, swizzle),  # value ring
            plgpu.SMEM((WARPGROUPS, 2, ROWS), _F32),                   # the rows' lse (base 2) and delta
            plgpu.Barrier(num_arrivals=4, num_barriers=WARPGROUPS),    # a warpgroup's rows landed
            plgpu.Barrier(num_barriers=stages_dq),                     # key slot filled
            plgpu.Barrier(num_barriers=stages_dq),                     # value slot filled
            plgpu.ClusterBarrier(collective_axes=("cluster",), num_arrivals=WARPGROUPS, num_barriers=stages_dq),
            plgpu.ClusterBarrier(collective_axes=("cluster",), num_arrivals=WARPGROUPS, num_barriers=stages_dq),
        ),
        grid=(N // cluster, Tp // tile, B), grid_names=("heads", "tiles", "batch"),
        cluster=(cluster,), cluster_names=("cluster",), **mesh,
    )(q, k, v, do, lse2, delta)
    swizzle = min(128, block_q * jnp.dtype(dtype).itemsize)    # dK and dV contract over a slot's queries
    rings = (
        _smem_tiled((stages_dkv, block_q, H), dtype, swizzle),     # query ring
        _smem_tiled((stages_dkv, block_q, H), dtype, swizzle),     # dO ring
        plgpu.SMEM((stages_dkv, 2, block_q), _F32),                # lse (base 2) and delta ring
    )
    ring_barriers = (
        plgpu.Barrier(num_arrivals=3, num_barriers=stages_dkv),    # query slot filled (Q, lse, delta)
        plgpu.Barrier(num_barriers=stages_dkv),                    # dO slot filled
        plgpu.Barrier(num_arrivals=WARPGROUPS, num_barriers=stages_dkv),   # query slot released
        plgpu.Barrier(num_arrivals=WARPGROUPS, num_barriers=stages_dkv),   # dO slot released
    )
    if split:
        kernel, keys_per_program = _dkv_split_kernel, ROWS
        scratch = (
            _smem_tiled((ROWS, H), dtype, swizzle),                    # K, then dV
            _smem_tiled((ROWS, H), dtype, swizzle),                    # V, then dK
            *rings,
            plgpu.SMEM((ROWS, block_q), _F32, transforms=(plgpu.TilingTransform((8, 32)),
                                                          plgpu.SwizzleTransform(128))),   # P^T
            plgpu.Barrier(num_barriers=WARPGROUPS),                    # K landed, V landed
            *ring_barriers,
            plgpu.Barrier(),                                           # P^T written
            plgpu.Barrier(),                                           # P^T read
        )
    else:
        kernel, keys_per_program = _dkv_kernel, tile
        scratch = (
            _smem_tiled((WARPGROUPS, ROWS, H), dtype, swizzle),        # K, then dK
            _smem_tiled((WARPGROUPS, ROWS, H), dtype, swizzle),        # V, then dV
            *rings,
            plgpu.Barrier(num_arrivals=2, num_barriers=WARPGROUPS),    # a warpgroup's keys and values landed
            *ring_barriers,
        )
    dk, dv = plgpu.kernel(
        functools.partial(kernel, block_q=block_q, stages=stages_dkv, **common),
        out_type=(jax.ShapeDtypeStruct(k.shape, dtype), jax.ShapeDtypeStruct(v.shape, dtype)),
        scratch_types=scratch,
        grid=(K, Tp // keys_per_program, B), grid_names=("heads", "tiles", "batch"), **mesh,
    )(q, k, v, do, lse2, delta)
    return dq[:, :T], dk[:, :T], dv[:, :T]
