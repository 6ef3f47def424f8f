"""Mosaic GPU (Hopper) backward of dense causal flash attention (head dim 64-256), kernels of the same
make as the forward (`flash_hopper_forward`): a dQ walk over key blocks (here) and a dK/dV walk, for each
key tile, over the query blocks of every query head of its kv head (`flash_hopper_dkv`, so GQA needs no
reduction over heads afterwards). Both recompute P = exp2(S - lse) from the forward's log-sum-exp;
delta = rowsum(O * dO) comes in precomputed.

    dP = dO V^T,  dS = P * (dP - delta),  dQ = scale dS K,  dK = scale dS^T Q,  dV = P^T dO.

Layout is the caller's: q, o, dO [B, T, N, H]; k, v [B, T, K, H]; the log-sum-exp [B, N, T] as the
forward writes it.
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels.common import pad_axis, round_up
from pallas_kernels.flash_blocks import key_block_range, whole_key_blocks
from pallas_kernels.flash_hopper_common import (CLUSTER, LOG2E, ROWS, WARPGROUPS, mask_invisible, release_slot,
                                                smem_tiled, stream_kv, walk_program_blocks)
from pallas_kernels.flash_hopper_dkv import dkv_kernel, dkv_split_kernel

_F32 = jnp.float32
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
            release_slot(lax.rem(j - lo_p, stages), ((k_ready, k_free), (v_ready, v_free)))

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
            s_RS = s_RS * (scale * LOG2E)
            if masked:
                s_RS = mask_invisible(s_RS, q0, j * block_kv, keys_axis=1, window=window)
            p_RS = jnp.exp2(s_RS - lax.broadcast_in_dim(lse2_R, s_RS.shape, [0]))
            ds_RS = p_RS * (dp_RS - lax.broadcast_in_dim(delta_R, s_RS.shape, [0]))

            def grad(acc_ref):
                plgpu.wgmma(acc_ref, ds_RS.astype(q_ref.dtype), k_smem.at[slot, 0])
            dq_RH = pl.run_state(grad)(plgpu.ACC.init(dq_RH))
            plgpu.barrier_arrive(k_free.at[slot])
            return dq_RH

        dq_RH = plgpu.layout_cast(jnp.zeros((ROWS, q_ref.shape[-1]), _F32), plgpu.Layout.WGMMA)
        whole = whole_key_blocks(i, lo, hi, bq=ROWS, bk=block_kv, groups=1, window=window)
        dq_RH = walk_program_blocks(lo_p, lo, hi, hi_p, whole, step, release, dq_RH)
        q_buf[...] = (dq_RH * scale).astype(dq_ref.dtype)
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(q_buf, dq_ref.at[rows])
        plgpu.wait_smem_to_gmem(0)

    @pl.when(wg == WARPGROUPS)
    def _memory():
        plgpu.set_max_registers(40, action="decrease")
        stream_kv(k_ref, v_ref, k_smem, v_smem, k_ready, v_ready, k_free, v_free, b=b, kv_head=lax.div(n, groups),
                   lo=lo_p, hi=hi_p, block_kv=block_kv, stages=stages, parts=1)


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
    lse2_BNT = lse_BNT * LOG2E
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
            smem_tiled((WARPGROUPS, ROWS, H), dtype, swizzle),        # Q, then dQ
            smem_tiled((WARPGROUPS, ROWS, H), dtype, swizzle),        # dO
            smem_tiled((stages_dq, 1, block_kv, H), dtype, swizzle),  # key ring (one column part)
            smem_tiled((stages_dq, 1, block_kv, H), dtype, swizzle),  # value ring
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
        smem_tiled((stages_dkv, block_q, H), dtype, swizzle),     # query ring
        smem_tiled((stages_dkv, block_q, H), dtype, swizzle),     # dO ring
        plgpu.SMEM((stages_dkv, 2, block_q), _F32),                # lse (base 2) and delta ring
    )
    ring_barriers = (
        plgpu.Barrier(num_arrivals=3, num_barriers=stages_dkv),    # query slot filled (Q, lse, delta)
        plgpu.Barrier(num_barriers=stages_dkv),                    # dO slot filled
        plgpu.Barrier(num_arrivals=WARPGROUPS, num_barriers=stages_dkv),   # query slot released
        plgpu.Barrier(num_arrivals=WARPGROUPS, num_barriers=stages_dkv),   # dO slot released
    )
    if split:
        kernel, keys_per_program = dkv_split_kernel, ROWS
        scratch = (
            smem_tiled((ROWS, H), dtype, swizzle),                    # K, then dV
            smem_tiled((ROWS, H), dtype, swizzle),                    # V, then dK
            *rings,
            plgpu.SMEM((ROWS, block_q), _F32, transforms=(plgpu.TilingTransform((8, 32)),
                                                          plgpu.SwizzleTransform(128))),   # P^T
            plgpu.Barrier(num_barriers=WARPGROUPS),                    # K landed, V landed
            *ring_barriers,
            plgpu.Barrier(),                                           # P^T written
            plgpu.Barrier(),                                           # P^T read
        )
    else:
        kernel, keys_per_program = dkv_kernel, tile
        scratch = (
            smem_tiled((WARPGROUPS, ROWS, H), dtype, swizzle),        # K, then dK
            smem_tiled((WARPGROUPS, ROWS, H), dtype, swizzle),        # V, then dV
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
