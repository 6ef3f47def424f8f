"""Heavily compressed attention (HCA, DeepSeek-V4): per query token and head ONE softmax over the raw-token
sliding window and EVERY visible compressed entry, plus a learned per-head sink logit that only enters
the denominator:

    o[t, h] = sum_{j in window(t) U {s : s < (t + 1) // ratio}} softmax_j(scale * q[t, h] . k_j ; sink_h) k_j,

with K = V (MQA). Entry s pools tokens [s * ratio, (s + 1) * ratio), so it is visible once all of them are
in the past. The kernels walk only the visible prefix (invisible blocks are skipped). Lowerings:
`hca_attention_reference` (pure JAX), Triton (`_attention_gpu`) and Mosaic TPU (`_attention_tpu`), both
behind one custom VJP whose backward is also a kernel.

Shapes: B batch, T tokens, H heads, D head dim, S compressed entries, W window.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax

from pallas_kernels import _attention_gpu, _attention_tpu
from pallas_kernels._common import (BlockSizes, Lowering, check_compressed_attention_inputs, check_positive,
                                    first_entry, resolve_lowering, sink_gradient, sink_softmax, window_keys_reference,
                                    window_start)

_HIGHEST = lax.Precision.HIGHEST
_ENGINES = {"pallas_gpu": _attention_gpu, "pallas_tpu": _attention_tpu}
# GPU: measured on H100 at V4-Flash shapes (64 heads x 512); TPU: (8, 128)-aligned tiles.
DEFAULT_BLOCKS = {"pallas_gpu": BlockSizes(),
                  "pallas_tpu": BlockSizes(block_k=128, block_kv_bwd=128, block_rows_bwd=128)}


def visible_entries(num_tokens: int, num_entries: int, ratio: int) -> jax.Array:
    """int32 [T]: how many compressed entries token t sees, min((t + 1) // ratio, S)."""
    return jnp.minimum((jnp.arange(num_tokens, dtype=jnp.int32) + 1) // ratio, num_entries)


def hca_attention_reference(q_BTHD: jax.Array, kv_BTD: jax.Array, kv_comp_BSD: jax.Array, sinks_H: jax.Array, *,
                            window: int, ratio: int, scale: float | None = None,
                            segment_ids_BT: jax.Array | None = None) -> jax.Array:
    """Pure-JAX HCA: gathered window plus dense causally masked compressed logits, float32 softmax."""
    B, T, H, D = q_BTHD.shape
    S = kv_comp_BSD.shape[1]
    scale = D ** -0.5 if scale is None else scale
    lo_BT = window_start(segment_ids_BT, B, T)
    keys_BTWD, visible_BTW = window_keys_reference(kv_BTD, window, lo_BT)
    s_S = jnp.arange(S)
    visible_BTS = ((s_S < visible_entries(T, S, ratio)[:, None])[None]
                   & (s_S >= first_entry(lo_BT, ratio)[:, :, None]))
    logits_w = jnp.einsum("BTHD,BTWD->BTHW", q_BTHD, keys_BTWD, precision=_HIGHEST,
                          preferred_element_type=jnp.float32) * scale
    logits_c = jnp.einsum("BTHD,BSD->BTHS", q_BTHD, kv_comp_BSD, precision=_HIGHEST,
                          preferred_element_type=jnp.float32) * scale
    p_BTHW, p_BTHS = sink_softmax([jnp.where(visible_BTW[:, :, None], logits_w, -jnp.inf),
                                   jnp.where(visible_BTS[:, :, None], logits_c, -jnp.inf)], sinks_H)
    out_BTHD = (jnp.einsum("BTHW,BTWD->BTHD", p_BTHW.astype(kv_BTD.dtype), keys_BTWD, precision=_HIGHEST,
                           preferred_element_type=jnp.float32)
                + jnp.einsum("BTHS,BSD->BTHD", p_BTHS.astype(kv_BTD.dtype), kv_comp_BSD, precision=_HIGHEST,
                             preferred_element_type=jnp.float32))
    return out_BTHD.astype(q_BTHD.dtype)


@dataclasses.dataclass(frozen=True)
class _Config:
    lowering: Lowering
    window: int
    ratio: int
    scale: float
    blocks: BlockSizes


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _hca_kernel(cfg: _Config, q_BTHD, kv_BTD, kv_comp_BSD, sinks_H, lo_BT, count_BT):
    return _hca_forward(cfg, q_BTHD, kv_BTD, kv_comp_BSD, sinks_H, lo_BT, count_BT)[0]


def _hca_forward(cfg: _Config, q_BTHD, kv_BTD, kv_comp_BSD, sinks_H, lo_BT, count_BT):
    o_BTHD, lse_BTH = _ENGINES[cfg.lowering.impl].forward(
        q_BTHD, kv_BTD, kv_comp_BSD, None, sinks_H, lo_BT, count_BT, window=cfg.window, ratio=cfg.ratio,
        scale=cfg.scale, blocks=cfg.blocks, interpret=cfg.lowering.interpret)
    return o_BTHD, (q_BTHD, kv_BTD, kv_comp_BSD, sinks_H, lo_BT, count_BT, o_BTHD, lse_BTH)


def _hca_backward(cfg: _Config, residuals, do_BTHD):
    q_BTHD, kv_BTD, kv_comp_BSD, sinks_H, lo_BT, count_BT, o_BTHD, lse_BTH = residuals
    delta_BTH = jnp.einsum("BTHD,BTHD->BTH", o_BTHD.astype(jnp.float32), do_BTHD.astype(jnp.float32))
    dq, dkv, dkv_comp = _ENGINES[cfg.lowering.impl].backward(
        q_BTHD, kv_BTD, kv_comp_BSD, None, sinks_H, lo_BT, count_BT, do_BTHD, lse_BTH, delta_BTH,
        window=cfg.window, ratio=cfg.ratio, scale=cfg.scale, blocks=cfg.blocks, interpret=cfg.lowering.interpret)
    return (dq, dkv.astype(kv_BTD.dtype), dkv_comp.astype(kv_comp_BSD.dtype),
            sink_gradient(sinks_H, lse_BTH, delta_BTH), None, None)


_hca_kernel.defvjp(_hca_forward, _hca_backward)


def hca_attention(q: jax.Array, kv: jax.Array, kv_comp: jax.Array, sinks: jax.Array, *, window: int, ratio: int,
                  scale: float | None = None, segment_ids: jax.Array | None = None, impl: str = "auto",
                  interpret=None, block_sizes: BlockSizes | None = None) -> jax.Array:
    """Heavily compressed attention; returns [B, T, H, D] in q's dtype.

    q [B, T, H, D]; kv [B, T, D] raw tokens (K = V); kv_comp [B, S, D], entry s pooling tokens
    [s * ratio, (s + 1) * ratio); sinks [H]. window: raw keys per query (itself included). scale defaults
    to D**-0.5. segment_ids int [B, T] restrict the window to the token's run of equal ids (0 = padding,
    never attended) and the compressed entries to those whose last pooled token is in that run. impl: "xla"
    (reference), "pallas_gpu", "pallas_tpu", or "auto" (by platform); a Pallas lowering off its platform
    runs in interpret mode unless `interpret` says otherwise.
    """
    B, T, H, D = check_compressed_attention_inputs(q, kv, kv_comp, sinks, segment_ids, window)
    check_positive("ratio", ratio)
    scale = D ** -0.5 if scale is None else float(scale)
    lowering = resolve_lowering(impl, interpret)
    if lowering.impl == "xla":
        return hca_attention_reference(q, kv, kv_comp, sinks, window=window, ratio=ratio, scale=scale,
                                       segment_ids_BT=segment_ids)
    blocks = block_sizes or DEFAULT_BLOCKS[lowering.impl]
    lo_BT = window_start(segment_ids, B, T)
    count_BT = jnp.broadcast_to(visible_entries(T, kv_comp.shape[1], ratio), (B, T))
    return _hca_kernel(_Config(lowering, window, ratio, scale, blocks), q, kv, kv_comp, sinks, lo_BT, count_BT)
