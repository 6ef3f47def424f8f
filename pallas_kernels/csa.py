"""Compressed sparse attention (CSA, DeepSeek-V4): per query token and head ONE softmax over the raw-token
sliding window and the token's own top-k compressed entries, plus a learned per-head sink logit that only
enters the denominator:

    o[t, h] = sum_{j in window(t) U topk(t)} softmax_j(scale * q[t, h] . k_j ; sink_h) k_j,   K = V (MQA).

The window is the raw keys s with t - W < s <= t (restricted to t's segment when segment ids are given);
topk(t) are the rows indices[t, :] of kv_comp, -1 marking an unused slot. No de-duplication: a row listed
twice counts twice. Lowerings: `csa_attention_reference` (pure JAX), Triton (`_attention_gpu`) and
Mosaic TPU (`_attention_tpu`), both behind one custom VJP whose backward is also a kernel.

Shapes: B batch, T tokens, H heads, D head dim, S compressed entries, K top-k slots, W window.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax

from pallas_kernels import _attention_gpu, _attention_tpu
from pallas_kernels._common import (BlockSizes, Lowering, check_array, check_compressed_attention_inputs, check_dim,
                                    gather_rows, resolve_lowering, sink_gradient, sink_softmax,
                                    window_keys_reference, window_start)

_HIGHEST = lax.Precision.HIGHEST
_ENGINES = {"pallas_gpu": _attention_gpu, "pallas_tpu": _attention_tpu}
# GPU: measured on H100 at V4-Flash shapes (64 heads x 512); TPU: (8, 128)-aligned tiles.
DEFAULT_BLOCKS = {"pallas_gpu": BlockSizes(num_warps_bwd=8),
                  "pallas_tpu": BlockSizes(block_k=128, block_kv_bwd=128, block_rows_bwd=128)}


def csa_attention_reference(q_BTHD: jax.Array, kv_BTD: jax.Array, kv_comp_BSD: jax.Array, indices_BTK: jax.Array,
                            sinks_H: jax.Array, *, window: int, scale: float | None = None,
                            segment_ids_BT: jax.Array | None = None) -> jax.Array:
    """Pure-JAX CSA: gathers every token's window and top-k rows, float32 logits and softmax."""
    B, T, H, D = q_BTHD.shape
    scale = D ** -0.5 if scale is None else scale
    keys_BTWD, visible_BTW = window_keys_reference(kv_BTD, window, window_start(segment_ids_BT, B, T))
    if kv_comp_BSD.shape[1] == 0:
        kv_comp_BSD = jnp.zeros((B, 1, D), kv_comp_BSD.dtype)
    rows_BTK = jnp.clip(indices_BTK, 0, kv_comp_BSD.shape[1] - 1)
    keys_BTKD = gather_rows(kv_comp_BSD, rows_BTK)
    logits_w = jnp.einsum("BTHD,BTWD->BTHW", q_BTHD, keys_BTWD, precision=_HIGHEST,
                          preferred_element_type=jnp.float32) * scale
    logits_c = jnp.einsum("BTHD,BTKD->BTHK", q_BTHD, keys_BTKD, precision=_HIGHEST,
                          preferred_element_type=jnp.float32) * scale
    p_BTHW, p_BTHK = sink_softmax([jnp.where(visible_BTW[:, :, None], logits_w, -jnp.inf),
                                   jnp.where(indices_BTK[:, :, None] >= 0, logits_c, -jnp.inf)], sinks_H)
    out_BTHD = (jnp.einsum("BTHW,BTWD->BTHD", p_BTHW.astype(kv_BTD.dtype), keys_BTWD, precision=_HIGHEST,
                           preferred_element_type=jnp.float32)
                + jnp.einsum("BTHK,BTKD->BTHD", p_BTHK.astype(kv_BTD.dtype), keys_BTKD, precision=_HIGHEST,
                             preferred_element_type=jnp.float32))
    return out_BTHD.astype(q_BTHD.dtype)


@dataclasses.dataclass(frozen=True)
class _Config:
    lowering: Lowering
    window: int
    scale: float
    blocks: BlockSizes


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _csa_kernel(cfg: _Config, q_BTHD, kv_BTD, kv_comp_BSD, indices_BTK, sinks_H, lo_BT, count_BT):
    return _csa_forward(cfg, q_BTHD, kv_BTD, kv_comp_BSD, indices_BTK, sinks_H, lo_BT, count_BT)[0]


def _csa_forward(cfg: _Config, q_BTHD, kv_BTD, kv_comp_BSD, indices_BTK, sinks_H, lo_BT, count_BT):
    o_BTHD, lse_BTH = _ENGINES[cfg.lowering.impl].forward(
        q_BTHD, kv_BTD, kv_comp_BSD, indices_BTK, sinks_H, lo_BT, count_BT, window=cfg.window, ratio=None,
        scale=cfg.scale, blocks=cfg.blocks, interpret=cfg.lowering.interpret)
    return o_BTHD, (q_BTHD, kv_BTD, kv_comp_BSD, indices_BTK, sinks_H, lo_BT, count_BT, o_BTHD, lse_BTH)


def _csa_backward(cfg: _Config, residuals, do_BTHD):
    q_BTHD, kv_BTD, kv_comp_BSD, indices_BTK, sinks_H, lo_BT, count_BT, o_BTHD, lse_BTH = residuals
    delta_BTH = jnp.einsum("BTHD,BTHD->BTH", o_BTHD.astype(jnp.float32), do_BTHD.astype(jnp.float32))
    dq, dkv, dkv_comp = _ENGINES[cfg.lowering.impl].backward(
        q_BTHD, kv_BTD, kv_comp_BSD, indices_BTK, sinks_H, lo_BT, count_BT, do_BTHD, lse_BTH, delta_BTH,
        window=cfg.window, ratio=None, scale=cfg.scale, blocks=cfg.blocks, interpret=cfg.lowering.interpret)
    return (dq, dkv.astype(kv_BTD.dtype), dkv_comp.astype(kv_comp_BSD.dtype), None,
            sink_gradient(sinks_H, lse_BTH, delta_BTH), None, None)


_csa_kernel.defvjp(_csa_forward, _csa_backward)


def csa_attention(q: jax.Array, kv: jax.Array, kv_comp: jax.Array, indices: jax.Array, sinks: jax.Array, *,
                  window: int, scale: float | None = None, segment_ids: jax.Array | None = None,
                  impl: str = "auto", interpret=None, block_sizes: BlockSizes | None = None) -> jax.Array:
    """Compressed sparse attention; returns [B, T, H, D] in q's dtype.

    q [B, T, H, D]; kv [B, T, D] raw tokens (K = V); kv_comp [B, S, D]; indices int32 [B, T, K] into
    kv_comp (-1 = unused slot; other values must lie in [0, S)); sinks [H]. window: raw keys per query
    (itself included). scale defaults to D**-0.5. segment_ids int [B, T]: tokens attend within their run of
    equal ids in the window, id 0 marks padding (never attended); the compressed part is what `indices`
    says. impl: "xla" (reference), "pallas_gpu", "pallas_tpu", or "auto" (by platform); a Pallas lowering
    off its platform runs in interpret mode unless `interpret` says otherwise.
    """
    B, T, H, D = check_compressed_attention_inputs(q, kv, kv_comp, sinks, segment_ids, window)
    check_array("indices", indices, 3, (jnp.int32,), "[B, T, K]")
    check_dim("indices", indices, 0, B, "batch"), check_dim("indices", indices, 1, T, "tokens")
    scale = D ** -0.5 if scale is None else float(scale)
    lowering = resolve_lowering(impl, interpret)
    if lowering.impl == "xla":
        return csa_attention_reference(q, kv, kv_comp, indices, sinks, window=window, scale=scale,
                                       segment_ids_BT=segment_ids)
    blocks = block_sizes or DEFAULT_BLOCKS[lowering.impl]
    lo_BT = window_start(segment_ids, B, T)
    # Slots after the last used one are skipped block-wise (the indexer puts its -1 slots last).
    slot_K = jnp.arange(1, indices.shape[2] + 1, dtype=jnp.int32)
    count_BT = jnp.max(jnp.where(indices >= 0, slot_K, 0), axis=2, initial=0).astype(jnp.int32)
    return _csa_kernel(_Config(lowering, window, scale, blocks), q, kv, kv_comp, indices, sinks, lo_BT, count_BT)
