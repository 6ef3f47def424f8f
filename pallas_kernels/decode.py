"""Decode attention (flash-decoding): a few new query tokens per row (T = 1..16: a decode step or a
speculative verification) against a cache of S slots, reading the cache once.

    o[t, n] = sum_s softmax_s(scale * q[t, n] . k[s, n // G] ; sink_n) v[s, n // G]
              over the slots s with kv_pos[s] <= q_pos[t] (and q_pos[t] - kv_pos[s] < window)

Slots carry their own positions, so full caches (slot = position) and rings (layers.kv_cache.ring_positions,
EMPTY_POSITION for an empty slot: later than any query, never visible) are one case. The G query heads of
a kv head and the T tokens are the rows of one tile ([T * G, H] against a block of slots). Two steps:
  1. partials (the Pallas kernels): the S axis is split over programs; each writes its unnormalised
     accumulator, running max and sum (float32) for its slots;
  2. combine (pure JAX, small): one softmax over all splits plus the per-head sink logit, which enters the
     denominator only. A query that sees no slot (and has no sink) gets 0.
`compressed_decode_attention` (DeepSeek-V4) feeds the window ring and the compressed entries through step 1
and combines them in ONE softmax with the sink: CSA in one kernel call over each token's window slots and
its gathered top-k entries, HCA in one call per part (window ring; every visible entry);
`indexer_decode_topk` picks a new token's top-k entries. Forward only: decoding is never differentiated.
The references are pure JAX (float32 logits and softmax), independent of the kernels.

Shapes: B batch, T query tokens, S cache slots, N query heads, K kv heads, G = N // K, H head dim, C
compressed entries, R = T * G rows per kv head, P slot splits.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax import lax

from pallas_kernels import decode_gpu, decode_tpu, indexer_gpu, indexer_tpu
from pallas_kernels.common import (F32, FLOAT_DTYPES, HIGHEST, Lowering, check_array, check_block_sizes, check_dim,
                                   check_positive, next_pow2, pad_axis, resolve_lowering, round_up)
from pallas_kernels.indexer import DEFAULT_BLOCKS as INDEXER_BLOCKS, IndexerBlockSizes

_ENGINES = {"pallas_gpu": decode_gpu, "pallas_tpu": decode_tpu}
# The position of an empty slot (layers.kv_cache.EMPTY_POSITION): later than any query.
EMPTY_POSITION = 2 ** 30


@dataclasses.dataclass(frozen=True)
class DecodeBlockSizes:
    """block_s slots per step; block_r rows (tokens x heads of one kv head) per program; min_programs:
    the slot axis is split until batch x kv heads x row blocks x splits reaches it (fills the GPU's SMs;
    on TPU 1 keeps one split per row), but a split keeps at least min_split_blocks slot blocks (so the
    partials stay small next to the cache); num_warps, num_stages: Triton launch parameters (GPU only)."""
    block_s: int = 64
    block_r: int = 64
    min_programs: int = 264
    min_split_blocks: int = 4
    num_warps: int = 4
    num_stages: int = 2

    def __post_init__(self):
        check_block_sizes(self, ("block_s", "block_r"), 8)
        check_positive("DecodeBlockSizes.min_programs", self.min_programs)
        check_positive("DecodeBlockSizes.min_split_blocks", self.min_split_blocks)
        check_positive("DecodeBlockSizes.min_split_blocks", self.min_split_blocks)


def default_block_sizes(impl: str, head_dim: int) -> DecodeBlockSizes:
    """GPU: [64, H] slot tiles up to H = 256, [32, H] above (shared memory), 8 warps for wide heads;
    TPU: 512-slot blocks, one split per row."""
    if impl == "pallas_tpu":
        return DecodeBlockSizes(block_s=512, block_r=128, min_programs=1)
    if head_dim > 256:
        return DecodeBlockSizes(block_s=32, num_warps=8)
    return DecodeBlockSizes()


# ------------------------------------------------------------------------------------- pure-JAX references
def _sink_softmax_attend(q_BTKGH, parts, sinks_N, scale: float) -> jax.Array:
    """One float32 softmax over the parts' visible slots plus the sink logit; [B, T, K, G, H] in q's dtype.
    parts: (keys = values, [B, S_i, K, H] shared by the tokens or [B, T, S_i, K, H] per token; visible
    [B, T, S_i])."""
    B, T, K, G, H = q_BTKGH.shape
    spec = lambda kv: "BSKH" if kv.ndim == 4 else "BTSKH"
    logits = [jnp.where(visible_BTS[:, :, None, None],
                        jnp.einsum(f"BTKGH,{spec(keys)}->BTKGS", q_BTKGH, keys, precision=HIGHEST,
                                   preferred_element_type=F32) * scale, -jnp.inf)
              for keys, _, visible_BTS in parts]
    all_BTKGX = jnp.concatenate(logits, axis=-1)
    sink_BTKG = (jnp.full((B, T, K, G), -jnp.inf, F32) if sinks_N is None
                 else jnp.broadcast_to(sinks_N.astype(F32).reshape(K, G), (B, T, K, G)))
    m_BTKG = jnp.maximum(jnp.max(all_BTKGX, axis=-1), sink_BTKG)
    m_BTKG = jnp.where(jnp.isfinite(m_BTKG), m_BTKG, 0.0)    # nothing visible: every term is 0
    e_BTKGX = jnp.exp(all_BTKGX - m_BTKG[..., None])
    denom_BTKG = jnp.sum(e_BTKGX, axis=-1) + jnp.exp(sink_BTKG - m_BTKG)
    p_BTKGX = e_BTKGX / jnp.where(denom_BTKG > 0, denom_BTKG, 1.0)[..., None]
    out_BTKGH, offset = 0.0, 0
    for _, values, _ in parts:
        S = values.shape[-3]
        out_BTKGH += jnp.einsum(f"BTKGS,{spec(values)}->BTKGH", p_BTKGX[..., offset:offset + S],
                                values.astype(F32), precision=HIGHEST)
        offset += S
    return out_BTKGH.astype(q_BTKGH.dtype)


def _visible(q_positions_BT, kv_positions_BS, window: int) -> jax.Array:
    q_BT1, kv_B1S = q_positions_BT[:, :, None], kv_positions_BS[:, None, :]
    visible_BTS = kv_B1S <= q_BT1
    if window:
        visible_BTS &= q_BT1 - kv_B1S < window
    return visible_BTS


def decode_attention_reference(q_BTNH: jax.Array, k_BSKH: jax.Array, v_BSKH: jax.Array | None,
                               q_positions_BT: jax.Array, kv_positions_BS: jax.Array, *, window: int = 0,
                               sinks_N: jax.Array | None = None, scale: float | None = None) -> jax.Array:
    """Pure JAX: float32 logits [B, T, N, S], masked by position, one softmax with the sink."""
    B, T, N, H = q_BTNH.shape
    K = k_BSKH.shape[2]
    scale = H ** -0.5 if scale is None else scale
    v_BSKH = k_BSKH if v_BSKH is None else v_BSKH
    out_BTKGH = _sink_softmax_attend(
        q_BTNH.reshape(B, T, K, N // K, H),
        [(k_BSKH, v_BSKH, _visible(q_positions_BT, kv_positions_BS, window))], sinks_N, scale)
    return out_BTKGH.reshape(B, T, N, -1)


# ----------------------------------------------------------------------------- step 1 (kernels), step 2
def _slot_bounds(qpos_BR: jax.Array, kpos_BS: jax.Array, window: int) -> jax.Array:
    """int32 [B, 2]: [lo, hi), the first and one past the last slot some row may see (a superset of the
    visible slots: positions in [min q_pos - window + 1, max q_pos]); [0, 0) where none."""
    S = kpos_BS.shape[1]
    top_B1 = jnp.max(qpos_BR, axis=1, keepdims=True)
    any_BS = kpos_BS <= top_B1
    if window:
        any_BS &= kpos_BS > jnp.min(jnp.where(qpos_BR >= 0, qpos_BR, top_B1), axis=1, keepdims=True) - window
    slot_S = jnp.arange(S, dtype=jnp.int32)
    lo_B = jnp.min(jnp.where(any_BS, slot_S, S), axis=1)
    hi_B = jnp.max(jnp.where(any_BS, slot_S + 1, 0), axis=1)
    return jnp.stack([jnp.minimum(lo_B, hi_B), hi_B], axis=1).astype(jnp.int32)


def _partials(lowering: Lowering, blocks: DecodeBlockSizes, q_BKRH, qpos_BR, k_BSKH, v_BSKH, kpos_BS, *,
              window: int, scale: float):
    """Step 1 for R rows per kv head: (acc [B, K, P, R, H], max, sum [B, K, P, R]) in float32. Pads rows
    (and on GPU a head dim that is not a power of two >= 16, which copies the cache); a cache shorter than a
    slot block is padded with empty slots."""
    B, K, R, H = q_BKRH.shape
    S = k_BSKH.shape[1]
    gpu = lowering.impl == "pallas_gpu"
    Hp = max(16, next_pow2(H)) if gpu else H
    br = min(blocks.block_r, max(16 if gpu else 8, next_pow2(R)))
    Rp = round_up(R, br)
    q = pad_axis(pad_axis(q_BKRH, 2, Rp), 3, Hp)
    qpos = pad_axis(qpos_BR.astype(jnp.int32), 1, Rp, value=-1)   # padding rows see nothing
    kpos = kpos_BS.astype(jnp.int32)
    caches = [k_BSKH] + ([] if v_BSKH is None else [v_BSKH])
    if Hp != H:
        caches = [pad_axis(c, 3, Hp) for c in caches]
    if S < blocks.block_s:
        caches = [pad_axis(c, 1, blocks.block_s) for c in caches]
        kpos = pad_axis(kpos, 1, blocks.block_s, value=EMPTY_POSITION)
    caches = [c.reshape(B, c.shape[1], K * Hp) for c in caches]   # a kv head is a column block: no copy
    n_blocks = -(-kpos.shape[1] // blocks.block_s)
    splits = max(1, min(-(-n_blocks // blocks.min_split_blocks), -(-blocks.min_programs // (B * K * (Rp // br)))))
    bounds_B2 = _slot_bounds(qpos, kpos, window)
    acc, m, l = _ENGINES[lowering.impl].partials(
        q, qpos, caches[0], caches[1] if v_BSKH is not None else None, kpos, bounds_B2, window=window,
        scale=scale, blocks=dataclasses.replace(blocks, block_r=br), splits=splits,
        interpret=lowering.interpret)
    return acc[..., :R, :H], m[..., :R], l[..., :R]


def _combine(partials: list, sinks_KR: jax.Array | None) -> jax.Array:
    """Step 2: float32 [B, K, R, H], one softmax over every split of every part plus the sink logit."""
    acc = jnp.concatenate([p[0] for p in partials], axis=2)
    m = jnp.concatenate([p[1] for p in partials], axis=2)
    l = jnp.concatenate([p[2] for p in partials], axis=2)
    m_BKR = jnp.max(m, axis=2)
    if sinks_KR is not None:
        m_BKR = jnp.maximum(m_BKR, sinks_KR.astype(F32)[None])
    w_BKPR = jnp.exp(m - m_BKR[:, :, None])
    num_BKRH = jnp.einsum("BKPR,BKPRH->BKRH", w_BKPR, acc, precision=HIGHEST)
    den_BKR = jnp.sum(w_BKPR * l, axis=2)
    if sinks_KR is not None:
        den_BKR = den_BKR + jnp.exp(sinks_KR.astype(F32)[None] - m_BKR)
    return num_BKRH / jnp.where(den_BKR > 0, den_BKR, 1.0)[..., None]


def _rows(x_BTKG, K: int):
    """[B, T, K, G, ...] -> [B, K, T * G, ...]: the rows of a kv head, token major."""
    B, T, _, G = x_BTKG.shape[:4]
    return jnp.moveaxis(x_BTKG, 2, 1).reshape(B, K, T * G, *x_BTKG.shape[4:])


def _check_decode(q_BTNH, q_positions_BT, window, sinks_N):
    check_array("q", q_BTNH, 4, FLOAT_DTYPES, "[B, T, N, H]")
    B, T, N, H = q_BTNH.shape
    check_array("q_positions", q_positions_BT, 2, (jnp.int32,), "[B, T] int32")
    check_dim("q_positions", q_positions_BT, 0, B, "batch"), check_dim("q_positions", q_positions_BT, 1, T, "tokens")
    if not isinstance(window, int) or window < 0:
        raise ValueError(f"window must be an int >= 0 (0: no window), got {window!r}")
    if sinks_N is not None:
        check_array("sinks", sinks_N, 1, FLOAT_DTYPES, "[N]")
        check_dim("sinks", sinks_N, 0, N, "heads")
    return B, T, N, H


def _check_cache(name, x, ndim, q_BTNH, layout):
    check_array(name, x, ndim, FLOAT_DTYPES, layout)
    check_dim(name, x, 0, q_BTNH.shape[0], "batch"), check_dim(name, x, ndim - 1, q_BTNH.shape[3], "head dim")


def decode_attention(q_BTNH: jax.Array, k_BSKH: jax.Array, v_BSKH: jax.Array | None, q_positions_BT: jax.Array,
                     kv_positions_BS: jax.Array, *, window: int = 0, sinks_N: jax.Array | None = None,
                     scale: float | None = None, impl: str = "auto", interpret=None,
                     block_sizes: DecodeBlockSizes | None = None) -> jax.Array:
    """Attention of T new tokens over a cache; returns [B, T, N, H] in q's dtype.

    q [B, T, N, H]; k, v [B, S, K, H] (v None: the values are the keys); q_positions int32 [B, T];
    kv_positions int32 [B, S] (EMPTY_POSITION or any position past the queries for an empty slot).
    window: keys within the last `window` positions (0 = all); sinks [N]: a per-head logit in the
    denominator only; scale defaults to H**-0.5. impl: "xla" (reference), "pallas_gpu", "pallas_tpu" or
    "auto" (by platform); a Pallas lowering off its platform runs in interpret mode unless `interpret` says
    otherwise. Forward only (no VJP: decoding is not differentiated).
    """
    B, T, N, H = _check_decode(q_BTNH, q_positions_BT, window, sinks_N)
    _check_cache("k", k_BSKH, 4, q_BTNH, "[B, S, K, H]")
    S, K = k_BSKH.shape[1:3]
    if N % K:
        raise ValueError(f"{N} query heads are not a multiple of {K} kv heads")
    if v_BSKH is not None:
        check_array("v", v_BSKH, 4, (k_BSKH.dtype,), "[B, S, K, H] with k's dtype")
        if v_BSKH.shape != k_BSKH.shape:
            raise ValueError(f"v has shape {tuple(v_BSKH.shape)}, k has {tuple(k_BSKH.shape)}: they must agree")
    check_array("kv_positions", kv_positions_BS, 2, (jnp.int32,), "[B, S] int32")
    check_dim("kv_positions", kv_positions_BS, 0, B, "batch"), check_dim("kv_positions", kv_positions_BS, 1, S, "slots")
    scale = H ** -0.5 if scale is None else float(scale)
    lowering = resolve_lowering(impl, interpret)
    if lowering.impl == "xla":
        return decode_attention_reference(q_BTNH, k_BSKH, v_BSKH, q_positions_BT, kv_positions_BS, window=window,
                                          sinks_N=sinks_N, scale=scale)
    blocks = block_sizes or default_block_sizes(lowering.impl, H)
    G = N // K
    q_BKRH = _rows(q_BTNH.reshape(B, T, K, G, H), K)
    qpos_BR = jnp.repeat(q_positions_BT, G, axis=1)
    part = _partials(lowering, blocks, q_BKRH, qpos_BR, k_BSKH, v_BSKH, kv_positions_BS, window=window,
                     scale=scale)
    sinks_KR = None if sinks_N is None else jnp.tile(sinks_N.reshape(K, G), (1, T))
    out_BKRH = _combine([part], sinks_KR)
    out_BTKGH = jnp.moveaxis(out_BKRH.reshape(B, K, T, G, H), 1, 2)
    return out_BTKGH.reshape(B, T, N, H).astype(q_BTNH.dtype)


# ------------------------------------------------------------------------------- DeepSeek-V4 (K = V, MQA)
def compressed_decode_attention_reference(q_BTNH, window_kv_BSH, window_positions_BS, q_positions_BT,
                                          entries_BCH, sinks_N, *, window: int, ratio: int | None = None,
                                          indices_BTK: jax.Array | None = None, scale: float | None = None
                                          ) -> jax.Array:
    """Pure JAX: the window slots and the compressed entries (HCA: c < (q_pos + 1) // ratio; CSA: the
    entries `indices` names, -1 unused) as logits of one float32 softmax with the sink."""
    B, T, N, H = q_BTNH.shape
    scale = H ** -0.5 if scale is None else scale
    window_BS1H = window_kv_BSH[:, :, None]
    parts = [(window_BS1H, window_BS1H, _visible(q_positions_BT, window_positions_BS, window))]
    if entries_BCH is not None and entries_BCH.shape[1]:
        C = entries_BCH.shape[1]
        if indices_BTK is None:
            visible_BTC = jnp.arange(C)[None, None] < (q_positions_BT[:, :, None] + 1) // ratio
            parts.append((entries_BCH[:, :, None], entries_BCH[:, :, None], visible_BTC))
        else:
            rows_BTK = jnp.clip(indices_BTK, 0, C - 1)
            picked_BTKH = jax.vmap(lambda e_CH, r_TK: e_CH[r_TK])(entries_BCH, rows_BTK)
            picked_BTK1H = picked_BTKH[:, :, :, None]
            parts.append((picked_BTK1H, picked_BTK1H, indices_BTK >= 0))
    return _sink_softmax_attend(q_BTNH[:, :, None], parts, sinks_N, scale)[:, :, 0]


def compressed_decode_attention(q_BTNH: jax.Array, window_kv_BSH: jax.Array, window_positions_BS: jax.Array,
                                q_positions_BT: jax.Array, entries_BCH: jax.Array | None, sinks_N: jax.Array, *,
                                window: int, ratio: int | None = None, indices_BTK: jax.Array | None = None,
                                scale: float | None = None, impl: str = "auto", interpret=None,
                                block_sizes: DecodeBlockSizes | None = None) -> jax.Array:
    """DeepSeek-V4 decode attention (one K = V vector per slot, MQA); returns [B, T, N, H] in q's dtype.

    q [B, T, N, H]; window_kv [B, S, H] the window ring (and chunk) with positions window_positions int32
    [B, S]; q_positions int32 [B, T]; entries [B, C, H] the compressed cache (None: sliding window only);
    sinks [N]. HCA: `ratio` given, a token sees entries c < (q_pos + 1) // ratio. CSA: `indices_BTK` int32
    [B, T, K] the indexer's top-k per token (-1: unused; each listed entry counted once per listing). All in
    ONE softmax with the sink. impl and interpret as in `decode_attention`; forward only.
    """
    B, T, N, H = _check_decode(q_BTNH, q_positions_BT, window, sinks_N)
    check_positive("window", window)
    if sinks_N is None:
        raise ValueError("compressed decode attention needs sinks [N]")
    _check_cache("window_kv", window_kv_BSH, 3, q_BTNH, "[B, S, H]")
    check_array("window_positions", window_positions_BS, 2, (jnp.int32,), "[B, S] int32")
    check_dim("window_positions", window_positions_BS, 1, window_kv_BSH.shape[1], "slots")
    if entries_BCH is not None:
        _check_cache("entries", entries_BCH, 3, q_BTNH, "[B, C, H]")
        if (ratio is None) == (indices_BTK is None):
            raise ValueError("compressed entries need exactly one of ratio (HCA) and indices_BTK (CSA)")
        if ratio is not None:
            check_positive("ratio", ratio)
        else:
            check_array("indices", indices_BTK, 3, (jnp.int32,), "[B, T, K] int32")
            check_dim("indices", indices_BTK, 0, B, "batch"), check_dim("indices", indices_BTK, 1, T, "tokens")
    scale = H ** -0.5 if scale is None else float(scale)
    lowering = resolve_lowering(impl, interpret)
    if lowering.impl == "xla":
        return compressed_decode_attention_reference(
            q_BTNH, window_kv_BSH, window_positions_BS, q_positions_BT, entries_BCH, sinks_N, window=window,
            ratio=ratio, indices_BTK=indices_BTK, scale=scale)
    blocks = block_sizes or default_block_sizes(lowering.impl, H)
    q_B1RH = q_BTNH.reshape(B, 1, T * N, H)                  # one kv head: rows (token, head)
    qpos_BR = jnp.repeat(q_positions_BT, N, axis=1)
    S = window_kv_BSH.shape[1]
    if entries_BCH is not None and entries_BCH.shape[1] and indices_BTK is not None:
        # CSA, one kernel call per token: its window slots followed by its selected entries (gathered, K
        # rows), each entry at the token's own position (visible, inside the window) or, unused, empty.
        Kt, C = indices_BTK.shape[2], entries_BCH.shape[1]
        picked_BTKH = jax.vmap(lambda e_CH, r_TK: e_CH[r_TK])(entries_BCH, jnp.clip(indices_BTK, 0, C - 1))
        slots_BTXH = jnp.concatenate([jnp.broadcast_to(window_kv_BSH[:, None], (B, T, S, H)), picked_BTKH], axis=2)
        entry_pos_BTK = jnp.where(indices_BTK >= 0, q_positions_BT[:, :, None], EMPTY_POSITION)
        kpos_BTX = jnp.concatenate([jnp.broadcast_to(window_positions_BS[:, None], (B, T, S)), entry_pos_BTK], 2)
        acc, m, l = _partials(lowering, blocks, q_BTNH.reshape(B * T, 1, N, H),
                              jnp.repeat(q_positions_BT.reshape(B * T, 1), N, axis=1),
                              slots_BTXH.reshape(B * T, S + Kt, 1, H), None,
                              kpos_BTX.reshape(B * T, S + Kt).astype(jnp.int32), window=window, scale=scale)
        per_token = lambda x: jnp.moveaxis(x.reshape(B, T, *x.shape[2:]), 1, 2).reshape(
            B, 1, x.shape[2], T * N, *x.shape[4:])
        parts = [(per_token(acc), per_token(m), per_token(l))]
    else:
        parts = [_partials(lowering, blocks, q_B1RH, qpos_BR, window_kv_BSH[:, :, None], None, window_positions_BS,
                           window=window, scale=scale)]
    if entries_BCH is not None and entries_BCH.shape[1] and indices_BTK is None:
        # HCA: entry c pools positions [c * ratio, (c + 1) * ratio): visible from its last one on.
        C = entries_BCH.shape[1]
        kpos_BC = jnp.broadcast_to((jnp.arange(C, dtype=jnp.int32) + 1) * ratio - 1, (B, C))
        parts.append(_partials(lowering, blocks, q_B1RH, qpos_BR, entries_BCH[:, :, None], None, kpos_BC, window=0,
                               scale=scale))
    out_BRH = _combine(parts, jnp.tile(sinks_N, T)[None])[:, 0]
    return out_BRH.reshape(B, T, N, H).astype(q_BTNH.dtype)


# --------------------------------------------------------------------------------------- indexer at decode
def indexer_decode_topk_reference(q_BTNH, k_BCH, weights_BTN, q_positions_BT, *, ratio: int, topk: int
                                  ) -> jax.Array:
    """Pure JAX: float32 scores of every cached index key, -inf past (q_pos + 1) // ratio, lax.top_k."""
    z_BTNC = jnp.einsum("BTNH,BCH->BTNC", q_BTNH, k_BCH, precision=HIGHEST, preferred_element_type=F32)
    scores_BTC = jnp.einsum("BTNC,BTN->BTC", jax.nn.relu(z_BTNC), weights_BTN.astype(F32), precision=HIGHEST)
    return _topk(scores_BTC, q_positions_BT, ratio, topk)


def _topk(scores_BTC, q_positions_BT, ratio: int, topk: int) -> jax.Array:
    C = scores_BTC.shape[2]
    visible_BTC = jnp.arange(C)[None, None] < (q_positions_BT[:, :, None] + 1) // ratio
    best_BTK, idx_BTK = lax.top_k(jnp.where(visible_BTC, scores_BTC, -jnp.inf), min(topk, C))
    idx_BTK = jnp.where(jnp.isneginf(best_BTK), -1, idx_BTK).astype(jnp.int32)
    return pad_axis(idx_BTK, 2, topk, value=-1)


def indexer_decode_topk(q_BTNH: jax.Array, k_BCH: jax.Array, weights_BTN: jax.Array, q_positions_BT: jax.Array, *,
                        ratio: int, topk: int, impl: str = "auto", interpret=None,
                        block_sizes: IndexerBlockSizes | None = None) -> jax.Array:
    """int32 [B, T, topk]: each new token's best visible cached index keys (c < (q_pos + 1) // ratio), best
    first, -1 past the visible ones; ties go to the lower entry (lax.top_k).

    q [B, T, N, H] index queries, k [B, C, H] the cached index keys, weights [B, T, N] (scales folded in),
    q_positions int32 [B, T]. The Pallas lowerings score through the lightning indexer's kernels (heads
    reduced in registers, [B, T, N, C] never exists; entry blocks past the longest row are skipped); the
    [B, T, C] float32 scores of the few new tokens (4 bytes per entry and token, against 2H bytes of index
    key read per entry) are ranked by lax.top_k. Forward only.
    """
    check_array("q", q_BTNH, 4, FLOAT_DTYPES, "[B, T, N, H]")
    B, T, N, H = q_BTNH.shape
    check_array("k", k_BCH, 3, (q_BTNH.dtype,), "[B, C, H] with q's dtype")
    check_dim("k", k_BCH, 0, B, "batch"), check_dim("k", k_BCH, 2, H, "head dim")
    check_array("weights", weights_BTN, 3, FLOAT_DTYPES, "[B, T, N]")
    check_dim("weights", weights_BTN, 1, T, "tokens"), check_dim("weights", weights_BTN, 2, N, "heads")
    check_array("q_positions", q_positions_BT, 2, (jnp.int32,), "[B, T] int32")
    check_dim("q_positions", q_positions_BT, 1, T, "tokens")
    check_positive("ratio", ratio), check_positive("topk", topk)
    lowering = resolve_lowering(impl, interpret)
    if k_BCH.shape[1] == 0:
        return jnp.full((B, T, topk), -1, jnp.int32)
    if lowering.impl == "xla":
        return indexer_decode_topk_reference(q_BTNH, k_BCH, weights_BTN, q_positions_BT, ratio=ratio, topk=topk)
    engine = {"pallas_gpu": indexer_gpu, "pallas_tpu": indexer_tpu}[lowering.impl]
    # The kernels take token t at position t0 + t: t0 = the latest query position sees a superset of
    # every token's entries; the exact per-token visibility is applied in _topk.
    t0 = jnp.max(q_positions_BT).astype(jnp.int32)
    scores_BTC = engine.forward(q_BTNH, k_BCH, weights_BTN, t0, ratio=ratio,
                                blocks=block_sizes or INDEXER_BLOCKS[lowering.impl], interpret=lowering.interpret)
    return _topk(scores_BTC, q_positions_BT, ratio, topk)
