"""The decoder stack shared by every family: embed -> per-layer blocks -> norm -> head, and the loss.

A family module supplies the block (`Block(cfg, layer_index, rngs=...)` called as `block(x_BTD, ctx)`);
everything else here is family-agnostic and driven by the model config. Optional config keys (absent =
off): `input_scale_bias` puts a learned `(x + b) * s` on the embedded input; `residual_fp32` keeps the
residual stream between blocks in float32 whatever the compute dtype (blocks cast what they read).
"""
from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from layers import params
from layers.embeddings import Embed, PerLayerEmbedding
from layers.norms import RMSNorm
from layers.residual import ScaleBias


@dataclasses.dataclass
class LayerContext:
    """What a block sees besides the residual stream."""
    positions_BT: jax.Array
    segment_ids_BT: jax.Array | None
    default_positions: bool                     # positions are 0..T-1 in every row (enables fused kernels)
    layer_inputs_BTLP: jax.Array | None = None  # per-layer embeddings, when the config has them
    kv_store: dict[int, tuple[jax.Array, jax.Array]] = dataclasses.field(default_factory=dict)
    carry: dict[str, jax.Array] = dataclasses.field(default_factory=dict)  # state a block hands to later ones


class Decoder(nnx.Module):
    def __init__(self, cfg, block_cls, *, rngs: nnx.Rngs):
        self.config = ml_collections.FrozenConfigDict(cfg)
        self.vocab_size = cfg.vocab_size
        self.final_softcap = cfg.final_softcap
        D = cfg.d_model
        self.embed = Embed(cfg.vocab_size, D, scale=math.sqrt(D) if cfg.scale_embeddings else 1.0, rngs=rngs)
        self.per_layer_embed = (PerLayerEmbedding(cfg.ple_vocab_size, cfg.num_layers, cfg.ple_dim, D,
                                                  eps=cfg.norm_eps, rngs=rngs) if cfg.ple_dim else None)
        self.input_scale_bias = ScaleBias(D) if cfg.get("input_scale_bias", False) else None
        self.residual_fp32 = bool(cfg.get("residual_fp32", False))
        self.blocks = nnx.List([block_cls(cfg, i, rngs=rngs) for i in range(cfg.num_layers)])
        self.final_norm = RMSNorm(D, eps=cfg.norm_eps)
        self.lm_head = None if cfg.tie_embeddings else params.normal(rngs, (D, cfg.vocab_size), ("embed", "vocab"))

    def __call__(self, tokens_BT: jax.Array, *, positions_BT: jax.Array | None = None,
                 segment_ids_BT: jax.Array | None = None) -> jax.Array:
        """Logits [B, T, V] (float32) for token ids [B, T]."""
        if tokens_BT.ndim != 2:
            raise ValueError(f"tokens must be [batch, time], got shape {tokens_BT.shape}")
        B, T = tokens_BT.shape
        default_positions = positions_BT is None
        if positions_BT is None:
            positions_BT = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
        x_BTD = self.embed(tokens_BT)
        ctx = LayerContext(positions_BT, segment_ids_BT, default_positions)
        if self.per_layer_embed is not None:
            ctx.layer_inputs_BTLP = self.per_layer_embed(tokens_BT, x_BTD)
        if self.input_scale_bias is not None:
            x_BTD = self.input_scale_bias(x_BTD)
        compute_dtype = x_BTD.dtype
        if self.residual_fp32:
            x_BTD = x_BTD.astype(jnp.float32)
        for block in self.blocks:
            x_BTD = block(x_BTD, ctx)
        x_BTD = self.final_norm(x_BTD.astype(compute_dtype))
        if self.lm_head is None:
            logits_BTV = self.embed.attend(x_BTD)
        else:
            logits_BTV = jnp.einsum("BTD,DV->BTV", x_BTD, self.lm_head[...])
        logits_BTV = logits_BTV.astype(jnp.float32)
        if self.final_softcap:
            logits_BTV = self.final_softcap * jnp.tanh(logits_BTV / self.final_softcap)
        return logits_BTV


def cross_entropy(logits_BTV: jax.Array, targets_BT: jax.Array, mask_BT: jax.Array | None = None
                  ) -> tuple[jax.Array, jax.Array]:
    """Mean next-token cross-entropy in nats over the unmasked positions, and their count."""
    logprobs_BTV = jax.nn.log_softmax(logits_BTV.astype(jnp.float32), axis=-1)
    nll_BT = -jnp.take_along_axis(logprobs_BTV, targets_BT[..., None], axis=-1)[..., 0]
    mask_BT = jnp.ones_like(nll_BT) if mask_BT is None else mask_BT.astype(jnp.float32)
    count = jnp.maximum(mask_BT.sum(), 1.0)
    return (nll_BT * mask_BT).sum() / count, count
