"""Mosaic GPU (Hopper) dK/dV kernels of the flash-attention backward (`flash_hopper_backward`): for each
key tile, the memory warpgroup streams the query blocks that see it (Q with its rows' lse and delta, and
dO) for every query head of the kv head in turn, and the compute warpgroups accumulate dK and dV in
registers. At d 256 a 64 x 256 float32 accumulator fills a warpgroup's registers, so both warpgroups share
one key block and split the work by product (`dkv_split_kernel`).
"""
from __future__ import annotations

import functools

import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels.flash_blocks import row_block_range, walk_blocks, whole_row_blocks
from pallas_kernels.flash_hopper_common import (LOG2E, ROWS, WARPGROUPS, feed_ring, mask_invisible, release_slot,
                                                walk_program_blocks)

_F32 = jnp.float32


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
    feed_ring(groups * per_head, stages, [(q_free, load_q), (do_free, load_do)])


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
    st_KQ = pl.run_scoped(scores, plgpu.ACC((ROWS, q_buf.shape[0]), _F32)) * (scale * LOG2E)
    return mask_invisible(st_KQ, t_first, key_first, keys_axis=0, window=window) if masked else st_KQ


def dkv_kernel(q_ref, k_ref, v_ref, do_ref, lse2_ref, delta_ref, dk_ref, dv_ref, k_smem, v_smem, q_smem, do_smem,
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
            release_slot(lax.rem(step, stages), ((q_ready, q_free), (do_ready, do_free)))

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
            return walk_program_blocks(lo_p, lo, hi, hi_p, whole, functools.partial(step, head=head),
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


def dkv_split_kernel(q_ref, k_ref, v_ref, do_ref, lse2_ref, delta_ref, dk_ref, dv_ref, k_smem, v_smem, q_smem,
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
