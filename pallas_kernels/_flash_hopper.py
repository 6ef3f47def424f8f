"""Mosaic GPU (Hopper: TMA + wgmma, warp-specialised) forward of dense causal flash attention.

The Triton forward (`_flash_gpu`) cannot issue Hopper's asynchronous warpgroup matmuls from shared
memory; this one can. One program per (query head, 128-token query tile, batch) runs three warpgroups:

  two compute warpgroups  64 query tokens each: S = Q K^T and O += P V on the tensor cores (wgmma), online
                          softmax in registers (base 2, the scale folded into one multiply);
  one memory warpgroup    streams the tile's key/value blocks into a ring of `stages` shared-memory slots
                          with TMA, refilling a slot once both compute warpgroups have released it.

Key blocks are walked over the program's range (the union of both warpgroups' visible blocks, so the cost
per token of a sliding window is flat in the sequence); a warpgroup waits for and releases the blocks
outside its own range without computing, and masks only the blocks it does not see whole. Queries read
their own head, keys and values their kv head (GQA: the G heads of a kv head hit the same blocks in L2).

Layout is the caller's: q, o [B, T, N, H]; k, v [B, T, K, H]; the log-sum-exp comes out as [B, N, T] in
natural-log units, as the Triton backward expects it once moved to its row layout. Tokens are padded to
whole 128-token tiles and key blocks. No interpreter runs this kernel (the GPU interpreter takes neither a
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

from pallas_kernels._common import pad_axis, round_up
from pallas_kernels._flash_gpu import key_block_range, whole_key_blocks

_F32 = jnp.float32
ROWS = 64            # query tokens per compute warpgroup (one wgmma M tile)
WARPGROUPS = 2       # compute warpgroups per program
TILE = ROWS * WARPGROUPS
HEAD_DIMS = (64, 128, 256)
DTYPES = (jnp.bfloat16, jnp.float16)
_LOG2E = math.log2(math.e)
_UNSEEN = -1e30      # running max before any visible key: finite, so a fully masked block adds exp2(-inf) = 0


def _smem_tiled(shape, dtype):
    """Shared memory in the 128-byte-swizzled (8, 64) tiling that TMA writes and wgmma reads."""
    return plgpu.SMEM(shape, dtype, transforms=(plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128)))


def _kernel(q_ref, k_ref, v_ref, o_ref, lse_ref, q_smem, k_smem, v_smem, lse_smem, q_ready, k_ready, v_ready,
            k_free, v_free, *, scale: float, window: int, tokens: int, groups: int, block_kv: int, stages: int):
    n, tile, b = lax.axis_index("heads"), lax.axis_index("tiles"), lax.axis_index("batch")
    wg = lax.axis_index("wg")
    blocks = functools.partial(key_block_range, bq=ROWS, bk=block_kv, groups=1, tokens=tokens, window=window)
    lo_p = blocks(tile * WARPGROUPS)[0]                    # the program walks [lo_p, hi_p)
    hi_p = blocks(tile * WARPGROUPS + WARPGROUPS - 1)[1]

    @pl.when(wg < WARPGROUPS)
    def _compute():
        plgpu.set_max_registers(232, action="increase")
        i = tile * WARPGROUPS + wg                         # this warpgroup's 64-token row block
        q0 = i * ROWS
        plgpu.copy_gmem_to_smem(q_ref.at[b, pl.ds(q0, ROWS), n], q_smem.at[wg], q_ready.at[wg])
        plgpu.barrier_wait(q_ready.at[wg])
        lo, hi = blocks(i)

        def release(j):
            """Wait for block j and hand its slot back unread (outside this warpgroup's range)."""
            slot = lax.rem(j - lo_p, stages)
            for ready, free in ((k_ready, k_free), (v_ready, v_free)):
                plgpu.barrier_wait(ready.at[slot])
                plgpu.barrier_arrive(free.at[slot])

        def step(j, carry, masked: bool):
            acc_RH, m_R, l_R = carry
            slot = lax.rem(j - lo_p, stages)
            plgpu.barrier_wait(k_ready.at[slot])

            def scores(s_ref):
                plgpu.wgmma(s_ref, q_smem.at[wg], k_smem.at[slot].transpose((1, 0)))
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
            plgpu.barrier_wait(v_ready.at[slot])

            def values(acc_ref):     # O = alpha O + P V, accumulated in place on the tensor cores
                plgpu.wgmma(acc_ref, p_RS.astype(q_ref.dtype), v_smem.at[slot])
            acc_RH = pl.run_state(values)(plgpu.ACC.init(acc_RH * lax.broadcast_in_dim(alpha_R, acc_RH.shape, [0])))
            plgpu.barrier_arrive(v_free.at[slot])
            return acc_RH, m_new, l_R

        head_dim = q_ref.shape[-1]
        carry = (plgpu.layout_cast(jnp.zeros((ROWS, head_dim), _F32), plgpu.Layout.WGMMA),
                 plgpu.layout_cast(jnp.full((ROWS,), _UNSEEN, _F32), plgpu.Layout.WGMMA.reduce(1)),
                 plgpu.layout_cast(jnp.zeros((ROWS,), _F32), plgpu.Layout.WGMMA.reduce(1)))
        whole_lo, whole_hi = whole_key_blocks(i, lo, hi, bq=ROWS, bk=block_kv, groups=1, window=window)
        skip = lambda j, c: (release(j), c)[1]
        carry = lax.fori_loop(lo_p, lo, skip, carry)
        carry = lax.fori_loop(lo, whole_lo, functools.partial(step, masked=True), carry)
        carry = lax.fori_loop(whole_lo, whole_hi, functools.partial(step, masked=False), carry)
        acc_RH, m_R, l_R = lax.fori_loop(whole_hi, hi, functools.partial(step, masked=True), carry)
        lax.fori_loop(hi, hi_p, skip, None)

        q_smem.at[wg][...] = (acc_RH / lax.broadcast_in_dim(l_R, acc_RH.shape, [0])).astype(o_ref.dtype)
        lse_smem.at[wg][...] = (m_R + jnp.log2(l_R)) / _LOG2E
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(q_smem.at[wg], o_ref.at[b, pl.ds(q0, ROWS), n])
        plgpu.copy_smem_to_gmem(lse_smem.at[wg], lse_ref.at[b, n, pl.ds(q0, ROWS)])
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
                plgpu.copy_gmem_to_smem(src.at[keys], dst.at[slot], ready.at[slot])

        for first in range(stages):
            pl.when(lo_p + first < hi_p)(functools.partial(load, lo_p + first, wait_free=False))

        @pl.loop(lo_p + stages, hi_p)
        def _refill(j):
            load(j, wait_free=True)


def runs_on_this_device() -> bool:
    """wgmma exists only on Hopper (compute capability 9.x)."""
    device = jax.devices()[0]
    return device.platform == "gpu" and getattr(device, "compute_capability", "").split(".")[0] == "9"


def fits(q_BTNH, *, sinks: bool, segmented: bool) -> bool:
    """Whether this forward can run the call: 16-bit operands, head dim 64/128/256, no sinks, no segments."""
    return (not sinks and not segmented and q_BTNH.dtype in DTYPES and q_BTNH.shape[-1] in HEAD_DIMS)


def default_block_kv(head_dim: int) -> int:
    """Keys per ring slot: 128 up to d 128; 64 at d 256 (two slots of 128 x 256 overflow shared memory)."""
    return 128 if head_dim <= 128 else 64


def forward(q_BTNH, k_BTKH, v_BTKH, *, scale: float, window: int, block_kv: int | None = None, stages: int = 2):
    """(o [B, T, N, H] in q's dtype, lse [B, N, T] float32); T is padded to whole tiles here (padding keys
    come after every real query, so causality hides them; padding queries are cut off)."""
    B, T, N, H = q_BTNH.shape
    K = k_BTKH.shape[2]
    block_kv = block_kv or default_block_kv(H)
    Tp = round_up(T, math.lcm(TILE, block_kv))
    if Tp != T:
        o, lse = forward(*(pad_axis(x, 1, Tp) for x in (q_BTNH, k_BTKH, v_BTKH)), scale=scale, window=window,
                         block_kv=block_kv, stages=stages)
        return o[:, :T], lse[:, :, :T]
    dtype = q_BTNH.dtype
    kernel = functools.partial(_kernel, scale=scale, window=window, tokens=T, groups=N // K, block_kv=block_kv,
                               stages=stages)
    return plgpu.kernel(
        kernel,
        out_type=(jax.ShapeDtypeStruct((B, T, N, H), dtype), jax.ShapeDtypeStruct((B, N, T), _F32)),
        scratch_types=(
            _smem_tiled((WARPGROUPS, ROWS, H), dtype),           # Q, then O, per compute warpgroup
            _smem_tiled((stages, block_kv, H), dtype),           # key ring
            _smem_tiled((stages, block_kv, H), dtype),           # value ring
            plgpu.SMEM((WARPGROUPS, ROWS), _F32),                # log-sum-exp out
            plgpu.Barrier(num_barriers=WARPGROUPS),              # Q landed
            plgpu.Barrier(num_barriers=stages),                  # key slot filled
            plgpu.Barrier(num_barriers=stages),                  # value slot filled
            plgpu.Barrier(num_arrivals=WARPGROUPS, num_barriers=stages),   # key slot released by both
            plgpu.Barrier(num_arrivals=WARPGROUPS, num_barriers=stages),   # value slot released by both
        ),
        grid=(N, T // TILE, B),
        grid_names=("heads", "tiles", "batch"),
        num_threads=WARPGROUPS + 1,
        thread_name="wg",
        compiler_params=plgpu.CompilerParams(approx_math=True),
    )(q_BTNH, k_BTKH, v_BTKH)
