"""Mosaic GPU (Hopper) forward of dense causal flash attention: TMA + wgmma, warp-specialised.

The Triton forward (`flash_gpu`) cannot issue Hopper's asynchronous warpgroup matmuls from shared memory;
this one can. One program per (query heads of a cluster, query tile, batch): two compute warpgroups run
S = Q K^T and O = alpha O + P V on the tensor cores (O accumulated in place) with the online softmax in
registers (base 2, the scale folded into one multiply), while the memory warpgroup streams the tile's
key/value blocks (`flash_hopper_common`). Up to d 256 each compute warpgroup owns 64 query tokens; at
d 512 a 64 x 512 float32 accumulator does not fit one warpgroup's registers, so both own the same 64
tokens and each accumulates half of the output columns. On sliding-window layers a program may take
several query heads in turn (`default_heads_per_program`), as its walk is short. Key blocks are walked
over the program's visible range, so the cost per token of a sliding window is flat in the sequence.

Layout is the caller's: q, o [B, T, N, H]; k, v [B, T, K, H]; the log-sum-exp comes out as [B, N, T]
(natural log). Tokens are padded to whole tiles.
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
from pallas_kernels.flash_blocks import key_block_range, whole_key_blocks
from pallas_kernels.flash_hopper_common import (CLUSTER, LOG2E, ROWS, WARPGROUPS, column_part, mask_invisible,
                                                release_slot, smem_tiled, stream_kv, wait_slot,
                                                walk_program_blocks)

_F32 = jnp.float32
MAX_WARPGROUP_COLUMNS = 256   # float32 accumulator columns one warpgroup holds in registers
HEAD_DIMS = (64, 128, 256, 512)
DTYPES = (jnp.bfloat16, jnp.float16)
_UNSEEN = -1e30      # running max before any visible key: finite, so a fully masked block adds exp2(-inf) = 0


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
                    plgpu.copy_gmem_to_smem(column_part(q_ref.at[b, pl.ds(q0, ROWS), head(r)], h, parts),
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
                release_slot(slot_of(j), ((k_ready, k_free), (v_ready, v_free)), parts)

            def step(j, carry, masked: bool):
                acc_RH, m_R, l_R = carry
                slot = slot_of(j)
                wait_slot(k_ready, slot, parts)

                def scores(s_ref):
                    for h in range(parts):
                        plgpu.wgmma(s_ref, q_r.at[h], k_smem.at[slot, h].transpose((1, 0)))
                    return s_ref[...]
                s_RS = pl.run_scoped(scores, plgpu.ACC((ROWS, block_kv), _F32))
                plgpu.barrier_arrive(k_free.at[slot])
                s_RS = s_RS * (scale * LOG2E)
                if masked:
                    s_RS = mask_invisible(s_RS, q0, j * block_kv, keys_axis=1, window=window)
                m_new = jnp.maximum(m_R, s_RS.max(axis=1))
                alpha_R = jnp.exp2(m_R - m_new)
                p_RS = jnp.exp2(s_RS - lax.broadcast_in_dim(m_new, s_RS.shape, [0]))
                l_R = l_R * alpha_R + p_RS.sum(axis=1)
                wait_slot(v_ready, slot, parts)

                def values(acc_ref):     # O = alpha O + P V, accumulated in place on the tensor cores
                    plgpu.wgmma(acc_ref, p_RS.astype(q_ref.dtype), v_smem.at[slot, wg if split else 0])
                acc_RH = pl.run_state(values)(
                    plgpu.ACC.init(acc_RH * lax.broadcast_in_dim(alpha_R, acc_RH.shape, [0])))
                plgpu.barrier_arrive(v_free.at[slot])
                return acc_RH, m_new, l_R

            carry = (plgpu.layout_cast(jnp.zeros((ROWS, width), _F32), plgpu.Layout.WGMMA),
                     plgpu.layout_cast(jnp.full((ROWS,), _UNSEEN, _F32), plgpu.Layout.WGMMA.reduce(1)),
                     plgpu.layout_cast(jnp.zeros((ROWS,), _F32), plgpu.Layout.WGMMA.reduce(1)))
            acc_RH, m_R, l_R = walk_program_blocks(lo_p, lo, hi, hi_p, whole, step, release, carry)

            if split:    # the shared Q buffer takes the output only once both have read Q for the last time
                plgpu.barrier_arrive(both_done)
                plgpu.barrier_wait(both_done)
            plgpu.wait_smem_to_gmem(0, wait_read_only=True)    # the previous round's lse has gone out
            o_buf = q_r.at[wg if split else 0]
            o_buf[...] = (acc_RH / lax.broadcast_in_dim(l_R, acc_RH.shape, [0])).astype(o_ref.dtype)
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(o_buf, column_part(o_ref.at[b, pl.ds(q0, ROWS), n], wg, parts))

            def write_lse():
                lse_smem.at[wg][...] = (m_R + jnp.log2(l_R)) / LOG2E
                plgpu.commit_smem()
                plgpu.copy_smem_to_gmem(lse_smem.at[wg], lse_ref.at[b, n, pl.ds(q0, ROWS)])
            pl.when(wg == 0)(write_lse) if split else write_lse()   # split: both hold the same rows

        load_q(0)
        lax.fori_loop(0, rounds, one_round, None)
        plgpu.wait_smem_to_gmem(0)

    @pl.when(wg == WARPGROUPS)
    def _memory():
        plgpu.set_max_registers(40, action="decrease")
        stream_kv(k_ref, v_ref, k_smem, v_smem, k_ready, v_ready, k_free, v_free,
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
    leaves an even number of query heads per kv head, else 1: a windowed program walks only a few key
    blocks, so loading its Q and filling the ring would otherwise stall it each time; full-causal programs
    are long enough that it does not pay (measured in docs/benchmarks.md)."""
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
            smem_tiled((q_rounds, q_bufs, parts, ROWS, width), dtype),  # Q, then O
            smem_tiled((stages, parts, block_kv, width), dtype),   # key ring
            smem_tiled((stages, parts, block_kv, width), dtype),   # value ring
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
