"""DeepSeek-V4 compressed attention: per query token and head ONE softmax over the raw-token sliding window
and compressed entries, plus a learned per-head sink logit that only enters the denominator (K = V, MQA):

    CSA  o[t, n] = sum_{j in window(t) U topk(t)}  softmax_j(scale * q[t, n] . k_j ; sink_n) k_j
    HCA  o[t, n] = sum_{j in window(t) U {c : c < (t + 1) // ratio}}  softmax_j(...) k_j

The window is the raw keys s with t - W < s <= t (restricted to t's segment when segment ids are given).
CSA's topk(t) are the rows indices[t, :] of kv_comp, -1 marking an unused slot (no de-duplication: a row
listed twice counts twice). HCA's entry c pools tokens [c * ratio, (c + 1) * ratio), so it is visible once
all of them are in the past; the kernels walk only the visible prefix. Each has a pure-JAX reference; the
Triton (`compressed_gpu`) and Mosaic TPU (`compressed_tpu`) lowerings share one custom VJP whose backward
is also a kernel.

Shapes: B batch, T tokens, N query heads, H head dim, C compressed entries, K top-k slots, W window slots.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from pallas_kernels import compressed_gpu, compressed_tpu
from pallas_kernels.common import (F32, FLOAT_DTYPES, HIGHEST, BlockSizes, Lowering, check_array, check_dim,
                                   check_positive, check_segment_ids, first_entry, resolve_lowering,
                                   visible_entries, window_start)

_ENGINES = {"pallas_gpu": compressed_gpu, "pallas_tpu": compressed_tpu}
# GPU: chosen on the H100 at V4-Flash shapes (docs/benchmarks.md); TPU: (8, 128)-aligned tiles.
_TPU_BLOCKS = BlockSizes(block_k=128, block_kv_bwd=128, block_rows_bwd=128)
CSA_DEFAULT_BLOCKS = {"pallas_gpu": BlockSizes(num_warps_bwd=8), "pallas_tpu": _TPU_BLOCKS}
HCA_DEFAULT_BLOCKS = {"pallas_gpu": BlockSizes(), "pallas_tpu": _TPU_BLOCKS}
# CSA's ways to form dK=dV of the selected rows in the Pallas backward (csa_attention's `dkv`).
CSA_DKV = ("atomic", "inverted", "staged")


# ------------------------------------------------------------------------------------- pure-JAX references
def gather_rows(x_BSH: jax.Array, rows_BTK: jax.Array) -> jax.Array:
    """x[b, rows[b, t, k]] -> [B, T, K, H], gathered through float32 so that the gradient's scatter-add
    (thousands of terms per row at long context) accumulates in float32, not in bf16."""
    gathered = jax.vmap(lambda x_SH, rows_TK: x_SH[rows_TK])(x_BSH.astype(F32), rows_BTK)
    return gathered.astype(x_BSH.dtype)


def window_keys_reference(kv_BTH: jax.Array, window: int, window_start_BT: jax.Array
                          ) -> tuple[jax.Array, jax.Array]:
    """The W raw keys of every token's window, gathered: keys [B, T, W, H] and visible [B, T, W]
    (slot w holds position t - W + 1 + w)."""
    T = kv_BTH.shape[1]
    pos_TW = jnp.arange(T)[:, None] - (window - 1) + jnp.arange(window)[None, :]
    visible_BTW = (pos_TW[None] >= window_start_BT[:, :, None]) & (pos_TW[None] >= 0)
    keys_BTWH = gather_rows(kv_BTH, jnp.broadcast_to(jnp.clip(pos_TW, 0, T - 1), visible_BTW.shape))
    return keys_BTWH, visible_BTW


def sink_softmax(logits_parts: list[jax.Array], sinks_N: jax.Array) -> list[jax.Array]:
    """One softmax over the concatenated last axes of float32 logits [B, T, N, X_i] (-inf = masked)
    plus a per-head sink logit that only enters the denominator; returns the probabilities per part."""
    B, T, N, _ = logits_parts[0].shape
    sink_BTN1 = jnp.broadcast_to(sinks_N.astype(F32)[:, None], (B, T, N, 1))
    probs = jax.nn.softmax(jnp.concatenate([*logits_parts, sink_BTN1], axis=-1), axis=-1)
    splits, offset = [], 0
    for part in logits_parts:
        splits.append(probs[..., offset:offset + part.shape[-1]])
        offset += part.shape[-1]
    return splits


def _window_and_compressed(q_BTNH, kv_BTH, sinks_N, lo_BT, keys, keys_spec: str, visible, *, window: int,
                           scale: float) -> jax.Array:
    """Both references: float32 logits and one sink softmax over the gathered window and the compressed
    `keys` (einsum spec `keys_spec`, compressed axis second to last), those where `visible` [B, T, .]."""
    keys_BTWH, visible_BTW = window_keys_reference(kv_BTH, window, lo_BT)
    x = keys_spec[-2]
    einsum = functools.partial(jnp.einsum, precision=HIGHEST, preferred_element_type=F32)
    logits_w = einsum("BTNH,BTWH->BTNW", q_BTNH, keys_BTWH) * scale
    logits_c = einsum(f"BTNH,{keys_spec}->BTN{x}", q_BTNH, keys) * scale
    p_BTNW, p_c = sink_softmax([jnp.where(visible_BTW[:, :, None], logits_w, -jnp.inf),
                                jnp.where(visible[:, :, None], logits_c, -jnp.inf)], sinks_N)
    out_BTNH = (einsum("BTNW,BTWH->BTNH", p_BTNW.astype(kv_BTH.dtype), keys_BTWH)
                + einsum(f"BTN{x},{keys_spec}->BTNH", p_c.astype(kv_BTH.dtype), keys))
    return out_BTNH.astype(q_BTNH.dtype)


def csa_attention_reference(q_BTNH: jax.Array, kv_BTH: jax.Array, kv_comp_BCH: jax.Array, indices_BTK: jax.Array,
                            sinks_N: jax.Array, *, window: int, scale: float | None = None,
                            segment_ids_BT: jax.Array | None = None) -> jax.Array:
    """Pure-JAX CSA: gathers every token's window and top-k rows, float32 logits and softmax."""
    B, T, N, H = q_BTNH.shape
    scale = H ** -0.5 if scale is None else scale
    if kv_comp_BCH.shape[1] == 0:
        kv_comp_BCH = jnp.zeros((B, 1, H), kv_comp_BCH.dtype)
    keys_BTKH = gather_rows(kv_comp_BCH, jnp.clip(indices_BTK, 0, kv_comp_BCH.shape[1] - 1))
    return _window_and_compressed(q_BTNH, kv_BTH, sinks_N, window_start(segment_ids_BT, B, T), keys_BTKH, "BTKH",
                                  indices_BTK >= 0, window=window, scale=scale)


def hca_attention_reference(q_BTNH: jax.Array, kv_BTH: jax.Array, kv_comp_BCH: jax.Array, sinks_N: jax.Array, *,
                            window: int, ratio: int, scale: float | None = None,
                            segment_ids_BT: jax.Array | None = None) -> jax.Array:
    """Pure-JAX HCA: gathered window plus dense causally masked compressed logits, float32 softmax."""
    B, T, N, H = q_BTNH.shape
    C = kv_comp_BCH.shape[1]
    scale = H ** -0.5 if scale is None else scale
    lo_BT = window_start(segment_ids_BT, B, T)
    c_C = jnp.arange(C)
    visible_BTC = ((c_C < _visible_entries_T(T, C, ratio)[:, None])[None]
                   & (c_C >= first_entry(lo_BT, ratio)[:, :, None]))
    return _window_and_compressed(q_BTNH, kv_BTH, sinks_N, lo_BT, kv_comp_BCH, "BCH", visible_BTC, window=window,
                                  scale=scale)


def _visible_entries_T(num_tokens: int, num_entries: int, ratio: int) -> jax.Array:
    """int32 [T]: how many compressed entries each token sees."""
    return visible_entries(jnp.arange(num_tokens, dtype=jnp.int32), ratio, num_entries, jnp.floor_divide)


def csa_slot_counts(indices_BTK: jax.Array) -> jax.Array:
    """The kernels' count_BT for CSA, int32 [B, T]: the top-k slots up to each token's last used one (the
    indexer puts its -1 slots last; the kernels skip the key blocks after it and mask any -1 before it)."""
    slot_K = jnp.arange(1, indices_BTK.shape[2] + 1, dtype=jnp.int32)
    return jnp.max(jnp.where(indices_BTK >= 0, slot_K, 0), axis=2, initial=0).astype(jnp.int32)


def hca_entry_counts(B: int, T: int, num_entries: int, ratio: int) -> jax.Array:
    """The kernels' count_BT for HCA, int32 [B, T]: how many compressed entries each token sees."""
    return jnp.broadcast_to(_visible_entries_T(T, num_entries, ratio), (B, T))


# ----------------------------------------------------------------------- one custom VJP for CSA and HCA
@dataclasses.dataclass(frozen=True)
class _Config:
    lowering: Lowering
    window: int
    ratio: int | None     # HCA's; None for CSA
    scale: float
    blocks: BlockSizes
    dkv: str = "atomic"   # CSA's backward into the gathered rows (see csa_attention)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _compressed_kernel(cfg: _Config, q_BTNH, kv_BTH, kv_comp_BCH, indices_BTK, sinks_N, lo_BT, count_BT):
    """indices_BTK: CSA's top-k rows, None for HCA. lo_BT: window starts; count_BT: CSA's used slots or
    HCA's visible entries."""
    return _compressed_forward(cfg, q_BTNH, kv_BTH, kv_comp_BCH, indices_BTK, sinks_N, lo_BT, count_BT)[0]


def _compressed_forward(cfg: _Config, q_BTNH, kv_BTH, kv_comp_BCH, indices_BTK, sinks_N, lo_BT, count_BT):
    o_BTNH, lse_BTN = _ENGINES[cfg.lowering.impl].forward(
        q_BTNH, kv_BTH, kv_comp_BCH, indices_BTK, sinks_N, lo_BT, count_BT, window=cfg.window, ratio=cfg.ratio,
        scale=cfg.scale, blocks=cfg.blocks, interpret=cfg.lowering.interpret)
    return o_BTNH, (q_BTNH, kv_BTH, kv_comp_BCH, indices_BTK, sinks_N, lo_BT, count_BT, o_BTNH, lse_BTN)


def _compressed_backward(cfg: _Config, residuals, do_BTNH):
    q_BTNH, kv_BTH, kv_comp_BCH, indices_BTK, sinks_N, lo_BT, count_BT, o_BTNH, lse_BTN = residuals
    delta_BTN = jnp.einsum("BTNH,BTNH->BTN", o_BTNH.astype(F32), do_BTNH.astype(F32))
    dq, dkv, dkv_comp = _ENGINES[cfg.lowering.impl].backward(
        q_BTNH, kv_BTH, kv_comp_BCH, indices_BTK, sinks_N, lo_BT, count_BT, do_BTNH, lse_BTN, delta_BTN,
        window=cfg.window, ratio=cfg.ratio, scale=cfg.scale, blocks=cfg.blocks, interpret=cfg.lowering.interpret,
        dkv=cfg.dkv)
    # d loss / d sink_n = -sum_{b,t} p_sink * delta, p_sink = exp(sink_n - lse) (its value vector is zero)
    p_sink_BTN = jnp.exp(sinks_N.astype(F32) - lse_BTN)
    dsinks_N = -jnp.einsum("BTN,BTN->N", p_sink_BTN, delta_BTN).astype(sinks_N.dtype)
    return (dq, dkv.astype(kv_BTH.dtype), dkv_comp.astype(kv_comp_BCH.dtype), None, dsinks_N, None, None)


_compressed_kernel.defvjp(_compressed_forward, _compressed_backward)


# -------------------------------------------------------------------------------------------- public API
def _check_inputs(q_BTNH, kv_BTH, kv_comp_BCH, sinks_N, segment_ids_BT, window) -> tuple[int, int, int, int]:
    """The checks CSA and HCA share: q [B, T, N, H], kv [B, T, H] and kv_comp [B, C, H] in q's dtype,
    sinks [N], optional int32 segment_ids [B, T], a positive window. Returns (B, T, N, H)."""
    check_array("q", q_BTNH, 4, FLOAT_DTYPES, "[B, T, N, H]")
    B, T, N, H = q_BTNH.shape
    check_array("kv", kv_BTH, 3, (q_BTNH.dtype,), "[B, T, H] with q's dtype")
    check_dim("kv", kv_BTH, 0, B, "batch"), check_dim("kv", kv_BTH, 1, T, "tokens")
    check_dim("kv", kv_BTH, 2, H, "head dim")
    check_array("kv_comp", kv_comp_BCH, 3, (q_BTNH.dtype,), "[B, C, H] with q's dtype")
    check_dim("kv_comp", kv_comp_BCH, 0, B, "batch"), check_dim("kv_comp", kv_comp_BCH, 2, H, "head dim")
    check_array("sinks", sinks_N, 1, FLOAT_DTYPES, "[N]")
    check_dim("sinks", sinks_N, 0, N, "heads")
    check_segment_ids(segment_ids_BT, B, T)
    check_positive("window", window)
    return B, T, N, H


def _check_indices(indices_BTK, B: int, T: int) -> None:
    """CSA's top-k indices: int32 [B, T, K]."""
    check_array("indices", indices_BTK, 3, (jnp.int32,), "[B, T, K]")
    check_dim("indices", indices_BTK, 0, B, "batch"), check_dim("indices", indices_BTK, 1, T, "tokens")


def csa_attention(q_BTNH: jax.Array, kv_BTH: jax.Array, kv_comp_BCH: jax.Array, indices_BTK: jax.Array,
                  sinks_N: jax.Array, *, window: int, scale: float | None = None,
                  segment_ids_BT: jax.Array | None = None, impl: str = "auto", interpret=None,
                  block_sizes: BlockSizes | None = None, dkv: str = "atomic") -> jax.Array:
    """Compressed sparse attention; returns [B, T, N, H] in q's dtype.

    q [B, T, N, H]; kv [B, T, H] raw tokens (K = V); kv_comp [B, C, H]; indices int32 [B, T, K] into
    kv_comp (-1 = unused slot; other values must lie in [0, C)); sinks [N]. window: raw keys per query
    (itself included). scale defaults to H**-0.5. segment_ids_BT int [B, T]: tokens attend within their run
    of equal ids in the window, id 0 marks padding (never attended); the compressed part is what `indices`
    says. impl: "xla" (reference), "pallas_gpu", "pallas_tpu", or "auto" (by platform); a Pallas lowering
    off its platform runs in interpret mode unless `interpret` says otherwise. dkv: how the Pallas
    backward forms dK=dV of the selected rows: "atomic" (the query-major dQ kernel adds them into shared
    rows: fp32 atomics on GPU, a sequential read-modify-write on TPU), "inverted" (a key-major kernel per
    block of entries walks the tokens that selected them, from the inverted index of `indices`,
    recomputing P) or "staged" (the dQ kernel writes each slot's dK=dV row, a token chunk at a time, and a
    key-major kernel sums them per entry over the inverted index: no recomputation, one HBM round trip).
    """
    B, T, N, H = _check_inputs(q_BTNH, kv_BTH, kv_comp_BCH, sinks_N, segment_ids_BT, window)
    if dkv not in CSA_DKV:
        raise ValueError(f"dkv must be one of {CSA_DKV}, got {dkv!r}")
    _check_indices(indices_BTK, B, T)
    scale = H ** -0.5 if scale is None else float(scale)
    lowering = resolve_lowering(impl, interpret)
    if lowering.impl == "xla":
        return csa_attention_reference(q_BTNH, kv_BTH, kv_comp_BCH, indices_BTK, sinks_N, window=window,
                                       scale=scale, segment_ids_BT=segment_ids_BT)
    blocks = block_sizes or CSA_DEFAULT_BLOCKS[lowering.impl]
    lo_BT, count_BT = window_start(segment_ids_BT, B, T), csa_slot_counts(indices_BTK)
    return _compressed_kernel(_Config(lowering, window, None, scale, blocks, dkv), q_BTNH, kv_BTH, kv_comp_BCH,
                              indices_BTK, sinks_N, lo_BT, count_BT)


def hca_attention(q_BTNH: jax.Array, kv_BTH: jax.Array, kv_comp_BCH: jax.Array, sinks_N: jax.Array, *,
                  window: int, ratio: int, scale: float | None = None, segment_ids_BT: jax.Array | None = None,
                  impl: str = "auto", interpret=None, block_sizes: BlockSizes | None = None) -> jax.Array:
    """Heavily compressed attention; returns [B, T, N, H] in q's dtype.

    q [B, T, N, H]; kv [B, T, H] raw tokens (K = V); kv_comp [B, C, H], entry c pooling tokens
    [c * ratio, (c + 1) * ratio); sinks [N]. window: raw keys per query (itself included). scale defaults
    to H**-0.5. segment_ids_BT int [B, T] restrict the window to the token's run of equal ids (0 = padding,
    never attended) and the compressed entries to those whose last pooled token is in that run. impl: "xla"
    (reference), "pallas_gpu", "pallas_tpu", or "auto" (by platform); a Pallas lowering off its platform
    runs in interpret mode unless `interpret` says otherwise.
    """
    B, T, N, H = _check_inputs(q_BTNH, kv_BTH, kv_comp_BCH, sinks_N, segment_ids_BT, window)
    check_positive("ratio", ratio)
    scale = H ** -0.5 if scale is None else float(scale)
    lowering = resolve_lowering(impl, interpret)
    if lowering.impl == "xla":
        return hca_attention_reference(q_BTNH, kv_BTH, kv_comp_BCH, sinks_N, window=window, ratio=ratio,
                                       scale=scale, segment_ids_BT=segment_ids_BT)
    blocks = block_sizes or HCA_DEFAULT_BLOCKS[lowering.impl]
    lo_BT = window_start(segment_ids_BT, B, T)
    count_BT = hca_entry_counts(B, T, kv_comp_BCH.shape[1], ratio)
    return _compressed_kernel(_Config(lowering, window, ratio, scale, blocks), q_BTNH, kv_BTH, kv_comp_BCH, None,
                              sinks_N, lo_BT, count_BT)
