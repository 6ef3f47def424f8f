"""Mosaic GPU (Hopper: TMA + wgmma, warp-specialised) forwards of CSA and HCA (`compressed.py`), MQA with
K = V.

One program per (64 query heads, token, batch): the heads are the rows of one wgmma M tile, and every key
block serves all of them. A token's keys are its raw-token window (contiguous rows of kv: one TMA copy per
block) and its compressed entries: CSA's top-k rows of kv_comp (not contiguous), or HCA's visible prefix of
kv_comp (contiguous: loaded as the window is). Hopper's TMA has no row gather (tile::gather4 is Blackwell's),
so for CSA the memory warpgroup copies each selected row with its own small TMA copy into an untiled
staging buffer, then rewrites the block into the swizzled tiling wgmma reads; window blocks and HCA's entry
blocks land there directly. The ring holds one K = V block per slot, released once both compute warpgroups
have used it as values.

The head dim is held in two column parts (as the dense d 512 forward does): both compute warpgroups take the
same 64 heads, compute the full scores S = Q K^T over both parts (or, with `split_scores`, each its own
part's, summed and softmaxed by warpgroup 0, which hands P back through shared memory), run the online
softmax (base 2, seeded with the sink: m = sink, l = 1, so the sink only enters the denominator) and each
accumulates the output columns of its own part, O = alpha O + P V on the tensor cores. Outputs: O [B, T, N, H]
and the natural log-sum-exp [B, T, N] (sink included), what `compressed_gpu.forward` returns, so its
backward applies.

Per 64-key block at head dim 512 the tensor cores run 1.5x the useful FLOPs when both warpgroups compute the
full scores (1x with `split_scores`, at the price of two hand-overs per block), and for CSA, with one ring
slot (all that fits next to Q and the staging buffer), re-tiling a gathered block waits for the compute
warpgroups to release the slot (HCA, which stages nothing, has two). Under the Mosaic GPU interpreter
(jax 0.10, which has no run_state, no layout casts and no wgmma with a transposed or register operand) the
two matmuls run as plain dots; everything else is the compiled path.

Shapes: B batch, T tokens, N heads (padded to a multiple of 64), H head dim, C compressed entries, K top-k
slots (padded to whole key blocks with -1), W window.
"""
from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels import compressed
from pallas_kernels.common import (F32, BlockSizes, Lowering, cdiv, check_positive, first_entry,
                                   gpu_compute_capability, pad_axis, round_up, window_start)
from pallas_kernels.flash_hopper_common import LOG2E, column_part, smem_tiled

ROWS = 64            # query heads per program (one wgmma M tile)
WARPGROUPS = 2       # compute warpgroups, one per column part of the head dim
PARTS = 2
HEAD_DIMS = (128, 256, 512)
DTYPES = (jnp.bfloat16, jnp.float16)
TILE_COLUMNS = 64    # columns of one swizzled (8, 128-byte) tile of 16-bit elements
MAX_COPY = 256       # elements per axis of one TMA copy
STAGE_PAD = 8        # 16-bit elements after each staged row


def default_tiles(head_dim: int, hca: bool = False) -> tuple[int, int]:
    """(keys per ring slot, ring slots): Q, CSA's staging buffer and the ring share 227 KiB of shared memory."""
    return {128: (64, 4), 256: (64, 4), 512: (64, 2 if hca else 1)}[head_dim]


def _kernel(lo_ref, count_ref, q_ref, kv_ref, comp_ref, idx_ref, sinks_ref, o_ref, lse_ref,
            q_smem, key_smem, stage_smem, idx_smem, sink_smem, lse_smem, s_smem, p_smem, alpha_smem, sum_smem,
            q_ready, idx_ready, key_ready, key_free, stage_ready, both_done, s_ready, p_ready, *,
            scale: float, window: int, ratio: int | None, w_blocks: int, block_k: int, stages: int, split: bool,
            interpreted: bool):
    """ratio None: CSA (count = used top-k slots, idx the rows); else HCA (count = visible entries, from
    first_entry(lo, ratio); idx and the staging buffer unused). split: warpgroup w computes only Q_w K_w^T
    over its own column part; warpgroup 1 hands its partial scores to warpgroup 0 (s_smem), which runs the
    softmax for both and hands back P and the rescale (p_smem, alpha_smem); both then take P from shared
    memory for P V, and 1 the final sum (sum_smem). Otherwise both compute the full scores and the softmax
    in registers."""
    hg, t, b = lax.axis_index("heads"), lax.axis_index("tokens"), lax.axis_index("batch")
    wg = lax.axis_index("wg")
    h0 = hg * ROWS
    width = q_smem.shape[-1]
    w_pad = w_blocks * block_k
    # window keys: positions [first, t], walked in the blocks of [t + 1 - w_pad, t] that hold one of them
    first = jnp.maximum(lo_ref[b, t], t - window + 1)
    w_lo = w_blocks - cdiv(t + 1 - first, block_k)
    n_window = w_blocks - w_lo
    hca = ratio is not None
    count = count_ref[b, t]
    # HCA: entries [first_c, count) visible, walked from the key block holding first_c (CSA: from slot 0)
    first_c = first_entry(lo_ref[b, t], ratio) if hca else 0
    c_lo = first_c // block_k * block_k if hca else 0
    steps = n_window + cdiv(jnp.maximum(count - c_lo, 0), block_k)
    block_start = lambda j: t + 1 - (w_blocks - w_lo - j) * block_k    # window block j's first position
    # the interpreter (jax 0.10) has neither run_state nor layout casts: layouts are only register placement
    accumulate = _accumulate_interpreted if interpreted else _accumulate
    scores = _scores_interpreted if interpreted else _scores
    cast = (lambda x, layout: x) if interpreted else plgpu.layout_cast
    WGMMA, ROW, COL = plgpu.Layout.WGMMA, plgpu.Layout.WGMMA.reduce(1), plgpu.Layout.WGMMA.reduce(0)

    @pl.when(wg < WARPGROUPS)
    def _compute():
        plgpu.set_max_registers(232, action="increase")

        @pl.when(wg == 0)
        def _load_q():
            for h in range(PARTS):
                plgpu.copy_gmem_to_smem(column_part(q_ref.at[b, t, pl.ds(h0, ROWS)], h, PARTS), q_smem.at[h],
                                        q_ready.at[h])
            plgpu.copy_gmem_to_smem(sinks_ref.at[pl.ds(h0, ROWS)], sink_smem, q_ready.at[PARTS])

        for h in range(PARTS + 1):
            plgpu.barrier_wait(q_ready.at[h])
        if not hca:
            plgpu.barrier_wait(idx_ready)

        def step(j, carry):
            acc_RH, m_R, l_R = carry
            slot = lax.rem(j, stages)
            for h in range(PARTS):
                plgpu.barrier_wait(key_ready.at[slot * PARTS + h])

            if split:
                s_RK = scores([(q_smem.at[wg], key_smem.at[slot, wg])])

                @pl.when(wg == 1)
                def _hand_scores():
                    s_smem[...] = s_RK
                    plgpu.barrier_arrive(s_ready)
                pl.when(wg == 0)(lambda: plgpu.barrier_wait(s_ready))
                s_RK = s_RK + cast(s_smem[...], WGMMA)    # warpgroup 0: the full scores (1's result is unused)
            else:
                s_RK = scores([(q_smem.at[h], key_smem.at[slot, h]) for h in range(PARTS)])
            s_RK = s_RK * (scale * LOG2E)
            iota_RK = cast(lax.broadcasted_iota(jnp.int32, s_RK.shape, 1), WGMMA)
            # window slots: position >= first (and <= t by construction); top-k slots: index >= 0;
            # HCA entries: first_c <= c < count
            c0 = (j - n_window) * block_k
            if hca:
                c_RK = c_lo + c0 + iota_RK
                comp_key_RK = jnp.minimum(c_RK - first_c, count - 1 - c_RK)
            else:
                rows_K = cast(idx_smem[pl.ds(jnp.maximum(c0, 0), block_k)], COL)
                comp_key_RK = lax.broadcast_in_dim(rows_K, s_RK.shape, [1])
            in_window = (j < n_window).astype(jnp.int32)
            # >= 0 exactly where visible: the key's distance past `first` (window), its row (top-k) or its
            # distance inside [first_c, count) (HCA)
            key_RK = in_window * (block_start(j) + iota_RK - first) + (1 - in_window) * comp_key_RK
            s_RK = jnp.where(key_RK >= 0, s_RK, -jnp.inf)
            m_new = jnp.maximum(m_R, s_RK.max(axis=1))
            alpha_R = jnp.exp2(m_R - m_new)
            p_RK = jnp.exp2(s_RK - lax.broadcast_in_dim(m_new, s_RK.shape, [0]))
            l_R = l_R * alpha_R + p_RK.sum(axis=1)

            p_RK = p_RK.astype(q_ref.dtype)
            if split:
                @pl.when(wg == 0)
                def _hand_probabilities():
                    p_smem[...] = p_RK
                    alpha_smem[...] = alpha_R
                    plgpu.commit_smem()
                    plgpu.barrier_arrive(p_ready)
                pl.when(wg == 1)(lambda: plgpu.barrier_wait(p_ready))
                # P V reads P from shared memory (the interpreter's plain dot from registers)
                p_RK, alpha_R = p_smem[...] if interpreted else p_smem, cast(alpha_smem[...], ROW)
            acc_RH = acc_RH * lax.broadcast_in_dim(alpha_R, acc_RH.shape, [0])
            acc_RH = accumulate(acc_RH, p_RK, key_smem.at[slot, wg])   # V = K: this warpgroup's columns
            plgpu.barrier_arrive(key_free.at[slot])
            return acc_RH, m_new, l_R

        carry = (cast(jnp.zeros((ROWS, width), F32), WGMMA), cast(sink_smem[...], ROW) * LOG2E,
                 cast(jnp.ones((ROWS,), F32), ROW))
        acc_RH, m_R, l_R = lax.fori_loop(0, steps, step, carry)

        if split:     # warpgroup 0 holds the softmax sum
            @pl.when(wg == 0)
            def _hand_sum():
                sum_smem[...] = l_R
        plgpu.barrier_arrive(both_done)    # Q's buffers take the output once both have read Q for the last time
        plgpu.barrier_wait(both_done)
        if split:
            l_R = cast(sum_smem[...], ROW)
        o_buf = q_smem.at[wg]
        o_buf[...] = (acc_RH / lax.broadcast_in_dim(l_R, acc_RH.shape, [0])).astype(o_ref.dtype)
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(o_buf, column_part(o_ref.at[b, t, pl.ds(h0, ROWS)], wg, PARTS))

        @pl.when(wg == 0)
        def _write_lse():
            lse_smem[...] = (m_R + jnp.log2(l_R)) / LOG2E
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(lse_smem, lse_ref.at[b, t, pl.ds(h0, ROWS)])
        plgpu.wait_smem_to_gmem(0)

    @pl.when(wg == WARPGROUPS)
    def _memory():
        plgpu.set_max_registers(48, action="decrease")
        if not hca:
            for c in range(0, idx_smem.shape[0], MAX_COPY):     # a TMA copy moves <= 256 elements per axis
                chunk = pl.ds(c, min(MAX_COPY, idx_smem.shape[0] - c))
                plgpu.copy_gmem_to_smem(idx_ref.at[b, t, chunk], idx_smem.at[chunk], idx_ready)
            plgpu.barrier_wait(idx_ready)

        def gather(j):
            """Each selected row of top-k block j into the staging buffer, one TMA copy per row and part."""
            c0 = (j - n_window) * block_k

            @pl.loop(0, block_k)
            def _row(r):
                row = jnp.maximum(idx_smem[c0 + r], 0)      # -1 slots load row 0, masked by the compute side
                for h in range(PARTS):
                    plgpu.copy_gmem_to_smem(column_part(comp_ref.at[b, pl.ds(row, 1)], h, PARTS),
                                            stage_smem.at[h, pl.ds(r, 1), pl.ds(0, width)], stage_ready)

        def load_block(rows, slot):
            """A contiguous block of K = V rows straight into the ring slot's swizzled tiles."""
            for h in range(PARTS):
                plgpu.copy_gmem_to_smem(column_part(rows, h, PARTS), key_smem.at[slot, h],
                                        key_ready.at[slot * PARTS + h])

        def fill(j):
            slot = lax.rem(j, stages)
            is_window = j < n_window
            if not hca:
                pl.when(jnp.logical_not(is_window))(lambda: gather(j))

            @pl.when(j >= stages)
            def _wait_free():
                plgpu.barrier_wait(key_free.at[slot])

            pl.when(is_window)(lambda: load_block(kv_ref.at[b, pl.ds(block_start(j) + w_pad, block_k)], slot))
            if hca:
                pl.when(jnp.logical_not(is_window))(
                    lambda: load_block(comp_ref.at[b, pl.ds(c_lo + (j - n_window) * block_k, block_k)], slot))
                return

            @pl.when(jnp.logical_not(is_window))
            def _retile():        # staged rows -> the swizzled tiles wgmma reads
                plgpu.barrier_wait(stage_ready)
                for h in range(PARTS):
                    for c in range(width // TILE_COLUMNS):
                        cols = pl.ds(c * TILE_COLUMNS, TILE_COLUMNS)
                        key_smem.at[slot, h, :, cols][...] = cast(stage_smem[h, :, cols], WGMMA)
                    plgpu.commit_smem()
                    plgpu.barrier_arrive(key_ready.at[slot * PARTS + h])

        pl.loop(0, steps)(fill)

        @pl.loop(jnp.maximum(steps - stages, 0), steps)
        def _drain(j):       # the last slots are released before the program ends
            plgpu.barrier_wait(key_free.at[lax.rem(j, stages)])


def _scores(pairs):
    """S = sum over (Q part, K part) smem pairs of Q K^T [ROWS, keys], on the tensor cores."""
    def product(s_ref):
        for q_smem, keys_smem in pairs:
            plgpu.wgmma(s_ref, q_smem, keys_smem.transpose((1, 0)))
        return s_ref[...]
    return pl.run_scoped(product, plgpu.ACC((pairs[0][0].shape[0], pairs[0][1].shape[0]), F32))


def _scores_interpreted(pairs):
    """S = sum of Q K^T for the Mosaic GPU interpreter, whose wgmma takes no transposed operand (jax 0.10)."""
    dims = (((1,), (1,)), ((), ()))
    return sum(lax.dot_general(q_smem[...], keys_smem[...], dims, preferred_element_type=F32)
               for q_smem, keys_smem in pairs)


def _accumulate(acc_MN, a_MK, b_smem_KN):
    """acc + a @ b, accumulated in place on the tensor cores."""
    def product(acc_ref):
        plgpu.wgmma(acc_ref, a_MK, b_smem_KN)
    return pl.run_state(product)(plgpu.ACC.init(acc_MN))


def _accumulate_interpreted(acc_MN, a_MK, b_smem_KN):
    """acc + a @ b for the Mosaic GPU interpreter, which has no run_state and takes no register operand in
    wgmma (jax 0.10)."""
    return acc_MN + jnp.dot(a_MK, b_smem_KN[...], preferred_element_type=F32)


@dataclasses.dataclass(frozen=True)
class _Config:
    base: compressed._Config     # window, scale and the Triton backward's lowering and blocks
    block_k: int
    stages: int
    split_scores: bool
    interpret: object            # False, or the Mosaic GPU interpreter's params


def _check_hopper(name: str, q_BTNH) -> None:
    """The Hopper kernels' conditions on q: a 16-bit dtype and a head dim of HEAD_DIMS."""
    H = q_BTNH.shape[-1]
    if H not in HEAD_DIMS or q_BTNH.dtype not in DTYPES:
        raise ValueError(f"{name} takes 16-bit q with head dim in {HEAD_DIMS}, got {q_BTNH.dtype} and head dim {H}")


def runs_on_this_device() -> bool:
    """wgmma exists only on Hopper (compute capability 9.x)."""
    return gpu_compute_capability() == 9


def forward(q_BTNH, kv_BTH, comp_BCH, idx_BTK, sinks_N, lo_BT, count_BT, *, window: int, scale: float,
            ratio: int | None = None, block_k: int | None = None, stages: int | None = None,
            split_scores: bool = False, interpret=False) -> tuple[jax.Array, jax.Array]:
    """O [B, T, N, H] in q's dtype and the log-sum-exp [B, T, N] (float32, natural log, sink included).
    lo_BT: window starts. CSA (ratio None): idx_BTK the top-k rows, count_BT the used slots (those after it
    are skipped). HCA (ratio set, idx_BTK None): count_BT the visible entries. split_scores: each compute
    warpgroup computes the scores of its own column part only, and warpgroup 0 runs the softmax for both (a
    third less tensor-core work, two hand-overs through shared memory per key block)."""
    B, T, N, H = q_BTNH.shape
    hca = ratio is not None
    if hca != (idx_BTK is None):
        raise ValueError("forward: pass top-k indices for CSA (ratio None), or a ratio and no indices for HCA")
    if interpret is not False and type(interpret).__name__ != "InterpretGPUParams":
        raise ValueError(f"interpret must be False or the Mosaic GPU interpreter's InterpretGPUParams(), got "
                         f"{interpret!r}")
    _check_hopper("the Hopper forward", q_BTNH)
    default_block_k, default_stages = default_tiles(H, hca)
    block_k, stages = block_k or default_block_k, stages or default_stages
    check_positive("block_k", block_k), check_positive("stages", stages)
    if block_k % ROWS:   # P V contracts over the block: whole 64-key groups of the 128-byte swizzle
        raise ValueError(f"block_k must be a multiple of {ROWS}, got {block_k}")
    w_blocks = -(-window // block_k)
    w_pad = w_blocks * block_k
    # whole key blocks of slots, and whole 128-byte copies of them (HCA: a token-independent stand-in, unread)
    Np = round_up(N, ROWS)
    Kp = 32 if hca else round_up(max(idx_BTK.shape[2], 1), math.lcm(block_k, 32))
    q = pad_axis(q_BTNH, 2, Np)
    kv = pad_axis(kv_BTH, 1, w_pad + T, before=w_pad)       # zero rows before position 0
    comp = comp_BCH if comp_BCH.shape[1] else jnp.zeros((B, 1, H), comp_BCH.dtype)
    if hca:   # HCA reads whole blocks of entries: the last one padded
        comp = pad_axis(comp, 1, round_up(comp.shape[1], block_k))
    idx = jnp.full((B, 1, Kp), -1, jnp.int32) if hca else pad_axis(idx_BTK, 2, Kp, value=-1)
    sinks = pad_axis(sinks_N.astype(F32), 0, Np)
    dtype, width = q.dtype, H // PARTS
    kernel = functools.partial(_kernel, scale=scale, window=window, ratio=ratio, w_blocks=w_blocks,
                               block_k=block_k, stages=stages, split=split_scores,
                               interpreted=interpret is not False)
    stage_rows, stage_width = (8, 8) if hca else (block_k, width + STAGE_PAD)   # HCA stages nothing
    o, lse = plgpu.kernel(
        kernel,
        out_type=(jax.ShapeDtypeStruct((B, T, Np, H), dtype), jax.ShapeDtypeStruct((B, T, Np), F32)),
        scratch_types=(
            smem_tiled((PARTS, ROWS, width), dtype),               # Q, then O
            smem_tiled((stages, PARTS, block_k, width), dtype),    # K = V ring
            # gathered rows, untiled; rows padded by 16 bytes so that a warp's reads spread over all banks
            plgpu.SMEM((PARTS, stage_rows, stage_width), dtype),
            plgpu.SMEM((Kp,), jnp.int32),                          # the token's top-k rows
            plgpu.SMEM((ROWS,), F32),                              # sinks
            plgpu.SMEM((ROWS,), F32),                              # log-sum-exp out
            # split_scores: warpgroup 1's partial scores; P; the rescale; the final softmax sum
            smem_tiled((ROWS, block_k) if split_scores else (8, 32), F32),
            smem_tiled((ROWS, block_k) if split_scores else (8, TILE_COLUMNS), dtype),
            plgpu.SMEM((ROWS,), F32),
            plgpu.SMEM((ROWS,), F32),
            plgpu.Barrier(num_barriers=PARTS + 1),                 # Q parts and sinks landed
            plgpu.Barrier(num_arrivals=-(-Kp // MAX_COPY)),        # top-k rows landed
            plgpu.Barrier(num_barriers=stages * PARTS),            # ring slot filled (per part)
            plgpu.Barrier(num_arrivals=WARPGROUPS, num_barriers=stages),   # ring slot released
            plgpu.Barrier(num_arrivals=stage_rows * PARTS),        # staged rows landed
            plgpu.Barrier(num_arrivals=WARPGROUPS),                # both done with Q
            plgpu.Barrier(),                                       # split: partial scores handed over
            plgpu.Barrier(),                                       # split: P and the rescale handed over
        ),
        grid=(Np // ROWS, T, B),
        grid_names=("heads", "tokens", "batch"),
        num_threads=WARPGROUPS + 1,
        thread_name="wg",
        compiler_params=plgpu.CompilerParams(approx_math=True),
        interpret=None if interpret is False else interpret,
    )(lo_BT, count_BT, q, kv, comp, idx, sinks)
    return o[:, :, :N], lse[:, :, :N]


# ------------------------------------------------- public entries: this forward, the Triton backward
@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _compressed(cfg: _Config, q_BTNH, kv_BTH, kv_comp_BCH, indices_BTK, sinks_N, lo_BT, count_BT):
    """indices_BTK None: HCA (cfg.base.ratio set)."""
    return _compressed_forward(cfg, q_BTNH, kv_BTH, kv_comp_BCH, indices_BTK, sinks_N, lo_BT, count_BT)[0]


def _compressed_forward(cfg: _Config, q_BTNH, kv_BTH, kv_comp_BCH, indices_BTK, sinks_N, lo_BT, count_BT):
    o_BTNH, lse_BTN = forward(q_BTNH, kv_BTH, kv_comp_BCH, indices_BTK, sinks_N, lo_BT, count_BT,
                              window=cfg.base.window, scale=cfg.base.scale, ratio=cfg.base.ratio,
                              block_k=cfg.block_k, stages=cfg.stages, split_scores=cfg.split_scores,
                              interpret=cfg.interpret)
    return o_BTNH, (q_BTNH, kv_BTH, kv_comp_BCH, indices_BTK, sinks_N, lo_BT, count_BT, o_BTNH, lse_BTN)


def _compressed_backward(cfg: _Config, residuals, do_BTNH):
    return compressed._compressed_backward(cfg.base, residuals, do_BTNH)


_compressed.defvjp(_compressed_forward, _compressed_backward)


def csa_attention_hopper(q_BTNH: jax.Array, kv_BTH: jax.Array, kv_comp_BCH: jax.Array, indices_BTK: jax.Array,
                         sinks_N: jax.Array, *, window: int, scale: float | None = None,
                         segment_ids_BT: jax.Array | None = None, block_k: int | None = None,
                         stages: int | None = None, split_scores: bool = False, interpret=False,
                         backward_blocks: BlockSizes | None = None) -> jax.Array:
    """`compressed.csa_attention` with this Mosaic GPU forward (Hopper) and the Triton backward; same
    arguments and result. Takes 16-bit q with head dim 128, 256 or 512. interpret: False (compile for the
    GPU) or `InterpretGPUParams()` (the Mosaic GPU interpreter, on CPU; the backward then runs the Triton
    kernels in interpret mode too)."""
    B, T, N, H = compressed._check_inputs(q_BTNH, kv_BTH, kv_comp_BCH, sinks_N, segment_ids_BT, window)
    compressed._check_indices(indices_BTK, B, T)
    _check_hopper("csa_attention_hopper", q_BTNH)
    scale = H ** -0.5 if scale is None else float(scale)
    base = compressed._Config(Lowering("pallas_gpu", interpret is not False), window, None, scale,
                              backward_blocks or compressed.CSA_DEFAULT_BLOCKS["pallas_gpu"])
    lo_BT, count_BT = window_start(segment_ids_BT, B, T), compressed.csa_slot_counts(indices_BTK)
    return _compressed(_Config(base, block_k, stages, split_scores, interpret), q_BTNH, kv_BTH, kv_comp_BCH,
                       indices_BTK, sinks_N, lo_BT, count_BT)


def hca_attention_hopper(q_BTNH: jax.Array, kv_BTH: jax.Array, kv_comp_BCH: jax.Array, sinks_N: jax.Array, *,
                         window: int, ratio: int, scale: float | None = None,
                         segment_ids_BT: jax.Array | None = None, block_k: int | None = None,
                         stages: int | None = None, split_scores: bool = False, interpret=False,
                         backward_blocks: BlockSizes | None = None) -> jax.Array:
    """`compressed.hca_attention` with this Mosaic GPU forward (Hopper) and the Triton backward; same
    arguments and result, and the same conditions as `csa_attention_hopper`."""
    B, T, N, H = compressed._check_inputs(q_BTNH, kv_BTH, kv_comp_BCH, sinks_N, segment_ids_BT, window)
    check_positive("ratio", ratio)
    _check_hopper("hca_attention_hopper", q_BTNH)
    scale = H ** -0.5 if scale is None else float(scale)
    base = compressed._Config(Lowering("pallas_gpu", interpret is not False), window, ratio, scale,
                              backward_blocks or compressed.HCA_DEFAULT_BLOCKS["pallas_gpu"])
    lo_BT = window_start(segment_ids_BT, B, T)
    count_BT = compressed.hca_entry_counts(B, T, kv_comp_BCH.shape[1], ratio)
    return _compressed(_Config(base, block_k, stages, split_scores, interpret), q_BTNH, kv_BTH, kv_comp_BCH,
                       None, sinks_N, lo_BT, count_BT)


def flops_per_token(heads: int, head_dim: int, window: int, topk: int) -> int:
    """Useful matmul FLOPs of the forward per token: QK^T and PV over window + top-k keys."""
    return 4 * heads * head_dim * (window + topk)


__all__ = ["csa_attention_hopper", "hca_attention_hopper", "forward", "runs_on_this_device", "flops_per_token"]
