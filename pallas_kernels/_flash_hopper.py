"""Mosaic GPU (Hopper: TMA + wgmma, warp-specialised) forward of dense causal flash attention.

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
program, which bounds d 512 (64 query tokens per 128 KiB K/V block).

Key blocks are walked over the program's range (the union of both warpgroups' visible blocks, so the cost
per token of a sliding window is flat in the sequence); a warpgroup waits for and releases the blocks
outside its own range without computing, and masks only the blocks it does not see whole. Queries read
their own head, keys and values their kv head (GQA: the G heads of a kv head hit the same blocks in L2).

Layout is the caller's: q, o [B, T, N, H]; k, v [B, T, K, H]; the log-sum-exp comes out as [B, N, T] in
natural-log units, as the Triton backward expects it once moved to its row layout. Tokens are padded to
whole tiles and key blocks. No interpreter runs this kernel (the GPU interpreter takes neither a
transposed nor a register wgmma operand), so its tests need a Hopper GPU.
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels._common import gpu_compute_capability, pad_axis, round_up
from pallas_kernels._flash_gpu import key_block_range, whole_key_blocks

_F32 = jnp.float32
ROWS = 64            # query tokens per compute warpgroup (one wgmma M tile)
WARPGROUPS = 2       # compute warpgroups per program
MAX_WARPGROUP_COLUMNS = 256   # float32 accumulator columns one warpgroup holds in registers
HEAD_DIMS = (64, 128, 256, 512)
DTYPES = (jnp.bfloat16, jnp.float16)
CLUSTER = 2          # query heads per cluster sharing K/V loads (1 where a kv head has an odd number of them)
_LOG2E = math.log2(math.e)
_UNSEEN = -1e30      # running max before any visible key: finite, so a fully masked block adds exp2(-inf) = 0


def _smem_tiled(shape, dtype):
    """Shared memory in the 128-byte-swizzled (8, 64) tiling that TMA writes and wgmma reads."""
    return plgpu.SMEM(shape, dtype, transforms=(plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128)))


def _kernel(q_ref, k_ref, v_ref, o_ref, lse_ref, q_smem, k_smem, v_smem, lse_smem, q_ready, k_ready, v_ready,
            k_free, v_free, both_done, *, scale: float, window: int, tokens: int, groups: int, block_kv: int,
            stages: int, parts: int, cluster: int):
    """parts = 1: each compute warpgroup owns 64 tokens. parts = 2 (d 512): both own the same 64 tokens, the
    head dim is held in two column parts (each TMA copy and smem buffer contiguous), the scores sum both
    parts and warpgroup w accumulates the output columns of part w."""
    # a cluster holds `cluster` neighbouring query heads of one kv head: they walk the same key blocks, so
    # each CTA loads 1/cluster of every K/V block and TMA multicasts it to all of them
    n = lax.axis_index("heads") * cluster + lax.axis_index("cluster")
    b = lax.axis_index("batch")
    # CTAs launch in grid order, heads fastest: the last (longest, under causality) tiles go first, so
    # the short ones fill the tail of the last wave
    tile = lax.axis_size("tiles") - 1 - lax.axis_index("tiles")
    wg = lax.axis_index("wg")
    split = parts > 1
    width = q_ref.shape[-1] // parts
    part = lambda ref, h: ref.at[..., pl.ds(h * width, width)] if split else ref   # gmem column part h
    blocks = functools.partial(key_block_range, bq=ROWS, bk=block_kv, groups=1, tokens=tokens, window=window)
    # the program's 64-token row blocks: one per warpgroup, or one shared by both (split)
    first_i, last_i = (tile, tile) if split else (tile * WARPGROUPS, tile * WARPGROUPS + WARPGROUPS - 1)
    lo_p, hi_p = blocks(first_i)[0], blocks(last_i)[1]    # the program walks key blocks [lo_p, hi_p)

    @pl.when(wg < WARPGROUPS)
    def _compute():
        plgpu.set_max_registers(232, action="increase")
        i = first_i if split else first_i + wg            # this warpgroup's row block
        q0 = i * ROWS
        q_buf = q_smem.at[0 if split else wg]             # [parts, ROWS, width]

        def load_q():
            for h in range(parts):
                plgpu.copy_gmem_to_smem(part(q_ref.at[b, pl.ds(q0, ROWS), n], h), q_buf.at[h],
                                        q_ready.at[h if split else wg])
        pl.when(wg == 0)(load_q) if split else load_q()
        for h in range(parts):
            plgpu.barrier_wait(q_ready.at[h if split else wg])
        lo, hi = blocks(i)

        def wait(ready, slot):
            for h in range(parts):
                plgpu.barrier_wait(ready.at[slot * parts + h])

        def release(j):
            """Wait for block j and hand its slot back unread (outside this warpgroup's range)."""
            slot = lax.rem(j - lo_p, stages)
            for ready, free in ((k_ready, k_free), (v_ready, v_free)):
                wait(ready, slot)
                plgpu.barrier_arrive(free.at[slot])

        def step(j, carry, masked: bool):
            acc_RH, m_R, l_R = carry
            slot = lax.rem(j - lo_p, stages)
            wait(k_ready, slot)

            def scores(s_ref):
                for h in range(parts):
                    plgpu.wgmma(s_ref, q_buf.at[h], k_smem.at[slot, h].transpose((1, 0)))
                return s_ref[...]
            s_RS = pl.run_scoped(scores, plgpu.ACC((ROWS, block_kv), _F32))
            plgpu.barrier_arrive(k_free.at[slot])
            s_RS = s_RS * (scale * _LOG2E)
            if masked:
                t_RS = q0 + plgpu.broadcasted_iota(jnp.int32, s_RS.shape, 0, layout=plgpu.Layout.WGMMA)
                s_RS_key = j * block_kv + plgpu.broadcasted_iota(jnp.int32, s_RS.shape, 1, layout=plgpu.Layout.WGMMA)
                visible = s_RS_key <= t_RS
                if window:
                    visible &= t_RS - s_RS_key < window
                s_RS = jnp.where(visible, s_RS, -jnp.inf)
            m_new = jnp.maximum(m_R, s_RS.max(axis=1))
            alpha_R = jnp.exp2(m_R - m_new)
            p_RS = jnp.exp2(s_RS - lax.broadcast_in_dim(m_new, s_RS.shape, [0]))
            l_R = l_R * alpha_R + p_RS.sum(axis=1)
            wait(v_ready, slot)

            def values(acc_ref):     # O = alpha O + P V, accumulated in place on the tensor cores
                plgpu.wgmma(acc_ref, p_RS.astype(q_ref.dtype), v_smem.at[slot, wg if split else 0])
            acc_RH = pl.run_state(values)(plgpu.ACC.init(acc_RH * lax.broadcast_in_dim(alpha_R, acc_RH.shape, [0])))
            plgpu.barrier_arrive(v_free.at[slot])
            return acc_RH, m_new, l_R

        carry = (plgpu.layout_cast(jnp.zeros((ROWS, width), _F32), plgpu.Layout.WGMMA),
                 plgpu.layout_cast(jnp.full((ROWS,), _UNSEEN, _F32), plgpu.Layout.WGMMA.reduce(1)),
                 plgpu.layout_cast(jnp.zeros((ROWS,), _F32), plgpu.Layout.WGMMA.reduce(1)))
        whole_lo, whole_hi = whole_key_blocks(i, lo, hi, bq=ROWS, bk=block_kv, groups=1, window=window)
        skip = lambda j, c: (release(j), c)[1]
        carry = lax.fori_loop(lo_p, lo, skip, carry)
        carry = lax.fori_loop(lo, whole_lo, functools.partial(step, masked=True), carry)
        carry = lax.fori_loop(whole_lo, whole_hi, functools.partial(step, masked=False), carry)
        acc_RH, m_R, l_R = lax.fori_loop(whole_hi, hi, functools.partial(step, masked=True), carry)
        lax.fori_loop(hi, hi_p, skip, None)

        if split:    # the shared Q buffer takes the output only once both have read Q for the last time
            plgpu.barrier_arrive(both_done)
            plgpu.barrier_wait(both_done)
        o_buf = q_buf.at[wg if split else 0]
        o_buf[...] = (acc_RH / lax.broadcast_in_dim(l_R, acc_RH.shape, [0])).astype(o_ref.dtype)
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(o_buf, part(o_ref.at[b, pl.ds(q0, ROWS), n], wg))

        def write_lse():
            lse_smem.at[wg][...] = (m_R + jnp.log2(l_R)) / _LOG2E
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(lse_smem.at[wg], lse_ref.at[b, n, pl.ds(q0, ROWS)])
        pl.when(wg == 0)(write_lse) if split else write_lse()   # split: both hold the same rows
        plgpu.wait_smem_to_gmem(0)

    @pl.when(wg == WARPGROUPS)
    def _memory():
        plgpu.set_max_registers(40, action="decrease")
        kv_head = lax.div(n, groups)

        def load(j, wait_free: bool):
            slot = lax.rem(j - lo_p, stages)
            keys = (b, pl.ds(j * block_kv, block_kv), kv_head)
            for src, dst, ready, free in ((k_ref, k_smem, k_ready, k_free), (v_ref, v_smem, v_ready, v_free)):
                if wait_free:
                    plgpu.barrier_wait(free.at[slot])
                for h in range(parts):
                    plgpu.copy_gmem_to_smem(part(src.at[keys], h), dst.at[slot, h], ready.at[slot * parts + h],
                                        collective_axes="cluster")

        for first in range(stages):
            pl.when(lo_p + first < hi_p)(functools.partial(load, lo_p + first, wait_free=False))

        @pl.loop(lo_p + stages, hi_p)
        def _refill(j):
            load(j, wait_free=True)

        # the last blocks' releases, peers' included: no CTA of the cluster exits while another still
        # signals its barriers
        @pl.loop(lax.max(lo_p, hi_p - stages), hi_p)
        def _drain(j):
            slot = lax.rem(j - lo_p, stages)
            plgpu.barrier_wait(k_free.at[slot])
            plgpu.barrier_wait(v_free.at[slot])


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


def forward(q_BTNH, k_BTKH, v_BTKH, *, scale: float, window: int, block_kv: int | None = None,
            stages: int | None = None, cluster: int | None = None):
    """(o [B, T, N, H] in q's dtype, lse [B, N, T] float32); T is padded to whole tiles here (padding keys
    come after every real query, so causality hides them; padding queries are cut off). `cluster` query heads
    share each K/V load; it must divide the query heads per kv head (default CLUSTER where it does, else 1)."""
    B, T, N, H = q_BTNH.shape
    K = k_BTKH.shape[2]
    if cluster is None:
        cluster = CLUSTER if (N // K) % CLUSTER == 0 else 1
    elif (N // K) % cluster:
        raise ValueError(f"cluster={cluster} must divide the {N // K} query heads per kv head")
    default_block_kv, default_stages = default_tiles(H)
    block_kv, stages = block_kv or default_block_kv, stages or default_stages
    # d 512: a 64 x 512 float32 accumulator does not fit one warpgroup's registers, so both warpgroups take
    # the same 64 tokens, each half of the value columns (and both compute the full scores)
    parts = -(-H // MAX_WARPGROUP_COLUMNS)
    tile = ROWS if parts > 1 else ROWS * WARPGROUPS
    Tp = round_up(T, math.lcm(tile, block_kv))
    if Tp != T:
        o, lse = forward(*(pad_axis(x, 1, Tp) for x in (q_BTNH, k_BTKH, v_BTKH)), scale=scale, window=window,
                         block_kv=block_kv, stages=stages, cluster=cluster)
        return o[:, :T], lse[:, :, :T]
    dtype, width = q_BTNH.dtype, H // parts
    kernel = functools.partial(_kernel, scale=scale, window=window, tokens=T, groups=N // K, block_kv=block_kv,
                               stages=stages, parts=parts, cluster=cluster)
    q_bufs = 1 if parts > 1 else WARPGROUPS
    return plgpu.kernel(
        kernel,
        out_type=(jax.ShapeDtypeStruct((B, T, N, H), dtype), jax.ShapeDtypeStruct((B, N, T), _F32)),
        scratch_types=(
            _smem_tiled((q_bufs, parts, ROWS, width), dtype),    # Q, then O
            _smem_tiled((stages, parts, block_kv, width), dtype),   # key ring
            _smem_tiled((stages, parts, block_kv, width), dtype),   # value ring
            plgpu.SMEM((WARPGROUPS, ROWS), _F32),                # log-sum-exp out
            plgpu.Barrier(num_barriers=q_bufs * parts),          # Q landed
            plgpu.Barrier(num_barriers=stages * parts),          # key slot filled (per part)
            plgpu.Barrier(num_barriers=stages * parts),          # value slot filled (per part)
            # key / value slot released by both compute warpgroups of every CTA in the cluster
            plgpu.ClusterBarrier(collective_axes=("cluster",), num_arrivals=WARPGROUPS, num_barriers=stages),
            plgpu.ClusterBarrier(collective_axes=("cluster",), num_arrivals=WARPGROUPS, num_barriers=stages),
            plgpu.Barrier(num_arrivals=WARPGROUPS),              # both done with the shared Q (parts > 1)
        ),
        grid=(N // cluster, T // tile, B),
        grid_names=("heads", "tiles", "batch"),
        cluster=(cluster,),
        cluster_names=("cluster",),
        num_threads=WARPGROUPS + 1,
        thread_name="wg",
        compiler_params=plgpu.CompilerParams(approx_math=True),
    )(q_BTNH, k_BTKH, v_BTKH)
