"""Triton (Pallas GPU) fused lightning-indexer top-k: each token's scores are selected as they are
computed, so no [T, C] (nor [chunk, C]) scores are ever written.

One program owns bt tokens and walks their visible entry blocks in entry order. A block's [bt, bs] scores
(the same tile arithmetic as `indexer_gpu`) are compared with a per-token floor; the entries above it are
appended (cumsum slots, a masked scatter) to the token's candidate list, `capacity` slots of the output.
When a list could overflow on the next block it is compacted to exactly its top-k: the k-th largest key
comes from a bisection over int32 order keys, the entries above it and the first ones equal to it (the
lowest entry indices, as jax.lax.top_k breaks ties) stay, in order, and the floor rises to that key.
So every entry of a token's final top-k is in its list, which stays in entry order; the caller takes
jax.lax.top_k of the [T, capacity] lists.

Scores compare as int32 order keys: the float32 bits with the magnitude bits of negative values flipped,
the total order jax.lax.top_k ranks by (-0.0 below +0.0). Entries scoring -inf are never taken (the
chunked path reports them as -1 too).

Shapes: B batch, T tokens, N index heads, H index head dim, C compressed entries. Tiles: r (token, head)
rows, t tokens, s entries of a block, p candidate slots of a compaction part, x any row length.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.common import cdiv, dot_nt, next_pow2, pad_axis, visible_entries
from pallas_kernels.indexer_gpu import TileLayout, block_entries

EMPTY_KEY = int(np.iinfo(np.int32).min)          # an unused candidate slot (below every score's key)
_MAGNITUDE_BITS = 0x7FFFFFFF


def order_key(x):
    """int32 keys ordered as the float32 values x (total order: -inf < ... < -0.0 < +0.0 < ... < inf)."""
    bits = lax.bitcast_convert_type(x.astype(jnp.float32), jnp.int32)
    return bits ^ ((bits >> 31) & _MAGNITUDE_BITS)


_NEG_INF_BITS = int(np.float32(-np.inf).view(np.int32))
NEG_INF_KEY = _NEG_INF_BITS ^ _MAGNITUDE_BITS     # order_key(-inf): entries at or below it are never taken


def candidate_capacity(topk: int, blocks) -> int:
    """Candidate slots per token: room for the top-k and at least one more entry block, a power of two."""
    return next_pow2(max(2 * topk, topk + block_entries(blocks)))


def kth_largest(count_at_least, k: int, rows: int):
    """int32 [rows]: per row the largest x with count_at_least(x) >= k, i.e. the k-th largest key of a row
    holding at least k keys above EMPTY_KEY. Bisection: lo keeps count(key >= lo) >= k, hi + 1 keeps it
    < k; 32 halvings close the int32 range."""
    def halve(_, bounds):
        lo_t, hi_t = bounds
        mid_t = (lo_t >> 1) + (hi_t >> 1) + ((lo_t | hi_t) & 1)      # ceil((lo + hi) / 2), no overflow
        enough_t = count_at_least(mid_t) >= k
        return jnp.where(enough_t, mid_t, lo_t), jnp.where(enough_t, hi_t, mid_t - 1)

    lo_t, _ = lax.fori_loop(0, 32, halve, (jnp.full((rows,), EMPTY_KEY, jnp.int32),
                                           jnp.full((rows,), np.iinfo(np.int32).max, jnp.int32)))
    return lo_t


def distinct_slots(mask_tx):
    """int32 [t, x]: where mask, the rank of the element among the masked ones of its row (a stable
    compaction); elsewhere the slots after those, so every lane has its own slot. (Triton stores no masked
    lane; the interpreter stores them all, old values back, which is harmless only without collisions.)"""
    mask_i = mask_tx.astype(jnp.int32)
    taken_tx = jnp.cumsum(mask_i, axis=1)
    skipped_tx = lax.broadcasted_iota(jnp.int32, mask_tx.shape, 1) + 1 - taken_tx
    return jnp.where(mask_tx, taken_tx, jnp.sum(mask_i, axis=1)[:, None] + skipped_tx) - 1


def _barrier(interpret):
    """Orders a program's global-memory writes before its other threads read them (the interpreter runs
    sequentially and has no barrier)."""
    if not interpret:
        plgpu.debug_barrier()


def _topk_kernel(t0_ref, q_ref, k_ref, w_ref, first_ref, key_ref, idx_ref, count_ref, *, ratio: int, bt: int,
                 bs: int, heads: int, n_entries: int, n_token_blocks: int, topk: int, capacity: int, part: int,
                 interpret):
    tb = n_token_blocks - 1 - pl.program_id(0)          # the longest walks (last tokens) start first
    t_t = t0_ref[0] + tb * bt + lax.broadcasted_iota(jnp.int32, (bt,), 0)
    first_t = first_ref[...]
    end_t = visible_entries(t_t, ratio, n_entries)
    q_rh, w_r = q_ref[...], w_ref[...]
    row_ts = lax.broadcasted_iota(jnp.int32, (bt, bs), 0)
    row_tp = lax.broadcasted_iota(jnp.int32, (bt, part), 0)
    n_parts = capacity // part
    count_of = lambda x_tp: jnp.sum(x_tp.astype(jnp.int32), axis=1)

    def compact(count_t, floor_t):
        """Lists that could overflow on the next block keep exactly their top-k, in entry order. The list
        goes through in parts of `part` slots (few registers); a part's entries move to lower slots only,
        which belong to parts already read."""
        _barrier(interpret)
        full_t = count_t > capacity - bs                 # such lists hold > topk candidates

        def keys(p):
            slot_tp = p * part + lax.broadcasted_iota(jnp.int32, (bt, part), 1)
            return jnp.where(slot_tp < count_t[:, None], key_ref[:, pl.ds(p * part, part)], EMPTY_KEY)

        def count_at_least(x_t):
            return lax.fori_loop(0, n_parts, lambda p, n_t: n_t + count_of(keys(p) >= x_t[:, None]),
                                 jnp.zeros((bt,), jnp.int32))

        kth_t = kth_largest(count_at_least, topk, bt)
        n_above_t = lax.fori_loop(0, n_parts, lambda p, n_t: n_t + count_of(keys(p) > kth_t[:, None]),
                                  jnp.zeros((bt,), jnp.int32))

        def move(p, carry):
            kept_t, ties_t = carry
            key_tp, idx_tp = keys(p), idx_ref[:, pl.ds(p * part, part)]
            tie_tp = key_tp == kth_t[:, None]
            tie_rank_tp = ties_t[:, None] + jnp.cumsum(tie_tp.astype(jnp.int32), axis=1)
            keep_tp = full_t[:, None] & ((key_tp > kth_t[:, None])
                                         | (tie_tp & (tie_rank_tp <= (topk - n_above_t)[:, None])))
            slot_tp = kept_t[:, None] + distinct_slots(keep_tp)
            _barrier(interpret)                          # the part is read before its slots are overwritten
            plgpu.store(key_ref.at[row_tp, slot_tp], key_tp, mask=keep_tp)
            plgpu.store(idx_ref.at[row_tp, slot_tp], idx_tp, mask=keep_tp)
            return kept_t + count_of(keep_tp), ties_t + count_of(tie_tp)

        lax.fori_loop(0, n_parts, move, (jnp.zeros((bt,), jnp.int32), jnp.zeros((bt,), jnp.int32)))
        return jnp.where(full_t, topk, count_t), jnp.where(full_t, kth_t, floor_t)

    def block(j, carry):
        count_t, floor_t = carry
        s_s = j * bs + lax.broadcasted_iota(jnp.int32, (bs,), 0)
        z_rs = dot_nt(q_rh, k_ref[pl.ds(j * bs, bs), :])
        scores_ts = jnp.sum((jnp.maximum(z_rs, 0.0) * w_r[:, None]).reshape(bt, heads, bs), axis=1)
        key_ts = order_key(scores_ts)
        seen_ts = (s_s[None, :] >= first_t[:, None]) & (s_s[None, :] < end_t[:, None])
        take_ts = seen_ts & (key_ts > floor_t[:, None])
        # No branch on "anything taken": a store with every lane masked off costs less than the reduction.
        slot_ts = count_t[:, None] + distinct_slots(take_ts)
        plgpu.store(key_ref.at[row_ts, slot_ts], key_ts, mask=take_ts)
        plgpu.store(idx_ref.at[row_ts, slot_ts], jnp.broadcast_to(s_s[None, :], (bt, bs)), mask=take_ts)
        count_t = count_t + count_of(take_ts)
        return lax.cond(jnp.max(count_t) > capacity - bs, compact, lambda c, f: (c, f), count_t, floor_t)

    j_begin = lax.div(jnp.min(first_t), bs)
    j_end = cdiv(jnp.max(end_t), bs)
    count_t, _ = lax.fori_loop(j_begin, j_end, block, (jnp.zeros((bt,), jnp.int32),
                                                       jnp.full((bt,), NEG_INF_KEY, jnp.int32)))
    count_ref[...] = count_t


def candidates(q_BTNH, k_BCH, weights_BTN, first_BT, t0, *, ratio, topk, blocks, interpret):
    """Each token's candidate list, a superset of its top-k visible entries c in [first, end) (ties to the
    lowest index), for tokens t0, t0 + 1, ...: (keys int32 [B, T, capacity] (order_key of the scores,
    EMPTY_KEY in unused slots), entry indices int32 [B, T, capacity]), slots in entry order."""
    L = TileLayout(q_BTNH, k_BCH, blocks)
    B = q_BTNH.shape[0]
    rows, n_tb = L.bt * L.heads, L.Tp // L.bt
    capacity = candidate_capacity(topk, blocks)
    part = min(capacity, blocks.topk_part)
    last = lambda tb: n_tb - 1 - tb
    first = pad_axis(first_BT.astype(jnp.int32), 1, L.Tp, value=np.iinfo(np.int32).max)
    keys, idx, count = pl.pallas_call(
        functools.partial(_topk_kernel, ratio=ratio, n_token_blocks=n_tb, topk=topk, capacity=capacity,
                          part=part, interpret=interpret, **L.static()),
        grid=(n_tb, B),
        in_specs=[pl.BlockSpec((1,), lambda tb, b: (0,)),
                  pl.BlockSpec((None, rows, L.Hp), lambda tb, b: (b, last(tb), 0)),
                  pl.BlockSpec((None, L.Cp, L.Hp), lambda tb, b: (b, 0, 0)),
                  pl.BlockSpec((None, rows), lambda tb, b: (b, last(tb))),
                  pl.BlockSpec((None, L.bt), lambda tb, b: (b, last(tb)))],
        out_specs=[pl.BlockSpec((None, L.bt, capacity), lambda tb, b: (b, last(tb), 0)),
                   pl.BlockSpec((None, L.bt, capacity), lambda tb, b: (b, last(tb), 0)),
                   pl.BlockSpec((None, L.bt), lambda tb, b: (b, last(tb)))],
        out_shape=[jax.ShapeDtypeStruct((B, L.Tp, capacity), jnp.int32),
                   jax.ShapeDtypeStruct((B, L.Tp, capacity), jnp.int32),
                   jax.ShapeDtypeStruct((B, L.Tp), jnp.int32)],
        compiler_params=L.params, interpret=interpret, name="indexer_topk_fused",
    )(jnp.reshape(t0, (1,)).astype(jnp.int32), L.rows(q_BTNH), L.keys(k_BCH), L.weights(weights_BTN), first)
    live = jnp.arange(capacity)[None, None, :] < count[:, :, None]
    return jnp.where(live, keys, EMPTY_KEY)[:, :L.T], idx[:, :L.T]


def fused_topk(q_BTNH, k_BCH, weights_BTN, first_BT, t0, *, ratio, topk, blocks, interpret):
    """int32 [B, T, topk]: the top-k entries of tokens t0, t0 + 1, ... best first (ties: lowest index), -1
    in slots beyond the entries a token may take (topk <= C)."""
    keys_BTc, idx_BTc = candidates(q_BTNH, k_BCH, weights_BTN, first_BT, t0, ratio=ratio, topk=topk, blocks=blocks,
                                   interpret=interpret)
    best_BTK, slot_BTK = lax.top_k(keys_BTc, topk)
    return jnp.where(best_BTK > NEG_INF_KEY, jnp.take_along_axis(idx_BTc, slot_BTK, axis=-1), -1)
