"""The decoder stack shared by every family: embed -> per-layer blocks -> norm -> head, and the loss.

A family module supplies the block (`Block(cfg, layer_index, rngs=...)` called as `block(x_BTD, ctx)`);
everything else here is family-agnostic and driven by the model config. Optional config keys (absent =
off): `input_scale_bias` puts a learned `(x + b) * s` on the embedded input; `residual_fp32` keeps the
residual stream between blocks in float32 whatever the compute dtype (blocks cast what they read);
`hc_streams` n > 0 widens the residual into n hyper-connection streams [B, T, n, D] (the embedding copied
into each; blocks read and write all n; a learned `HyperHead` collapses them before the final norm);
`mtp_depth` k > 0 adds k multi-token-prediction modules, trained through `train_loss` with weight
`mtp_loss_weight`; `remat` ("none" | "full" | "dots") recomputes each block (and MTP module) in the
backward pass instead of keeping its activations ("full": keep only its inputs; "dots": also keep matmul
outputs).
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
from layers.hyper_connections import HyperHead
from layers.norms import RMSNorm
from layers.residual import ScaleBias

REMAT_POLICIES = {"full": jax.checkpoint_policies.nothing_saveable,
                  "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable}
REMAT = ("none", *REMAT_POLICIES)


@dataclasses.dataclass
class LayerContext:
    """What a block sees besides the residual stream."""
    positions_BT: jax.Array
    segment_ids_BT: jax.Array | None
    default_positions: bool                     # positions are 0..T-1 in every row (enables fused kernels)
    layer_inputs_BTLP: jax.Array | None = None  # per-layer embeddings, when the config has them
    kv_store: dict[int, tuple[jax.Array, jax.Array]] = dataclasses.field(default_factory=dict)
    carry: dict[str, jax.Array] = dataclasses.field(default_factory=dict)  # state a block hands to later ones
    tokens_BT: jax.Array | None = None          # the token ids the stream started from (token-routed layers)


def _hyper_head(cfg, rngs: nnx.Rngs) -> HyperHead | None:
    n = cfg.get("hc_streams", 0)
    return HyperHead(n, cfg.d_model, eps=cfg.hc_eps, norm_eps=cfg.norm_eps, rngs=rngs) if n else None


class MTPModule(nnx.Module):
    """One multi-token-prediction depth: from the residual h of the depth before and the embedding e of
    the token one step further ahead, h' = block(rmsnorm(h) W_h + rmsnorm(e) W_e) (W_e e added to every
    stream), read out through its own stream collapse and norm and the decoder's output head."""

    def __init__(self, cfg, block_cls, index: int, *, rngs: nnx.Rngs):
        D = cfg.d_model
        self.embed_norm = RMSNorm(D, eps=cfg.norm_eps)
        self.hidden_norm = RMSNorm(D, eps=cfg.norm_eps)
        self.embed_proj = params.normal(rngs, (D, D), ("embed", None))
        self.hidden_proj = params.normal(rngs, (D, D), ("embed", None))
        self.block = block_cls(cfg, index, rngs=rngs)
        self.hyper_head = _hyper_head(cfg, rngs)
        self.final_norm = RMSNorm(D, eps=cfg.norm_eps)

    def __call__(self, h: jax.Array, e_BTD: jax.Array, ctx: LayerContext) -> jax.Array:
        """h: [B, T, D] or streams [B, T, n, D]; returns the same shape."""
        e_BTD = jnp.einsum("BTD,DE->BTE", self.embed_norm(e_BTD), self.embed_proj[...])
        h_proj = jnp.einsum("...D,DE->...E", self.hidden_norm(h), self.hidden_proj[...])
        e = e_BTD[:, :, None, :] if h.ndim == 4 else e_BTD
        return self.block((h_proj + e).astype(h.dtype), ctx)


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
        self.remat = cfg.get("remat", "none")
        self.blocks = nnx.List([block_cls(cfg, i, rngs=rngs) for i in range(cfg.num_layers)])
        self.final_norm = RMSNorm(D, eps=cfg.norm_eps)
        self.lm_head = None if cfg.tie_embeddings else params.normal(rngs, (D, cfg.vocab_size), ("embed", "vocab"))
        self.hyper_head = _hyper_head(cfg, rngs)
        depth = cfg.get("mtp_depth", 0)
        self.mtp = (nnx.List([MTPModule(cfg, block_cls, cfg.num_layers + k, rngs=rngs) for k in range(depth)])
                    if depth else None)

    def __call__(self, tokens_BT: jax.Array, *, positions_BT: jax.Array | None = None,
                 segment_ids_BT: jax.Array | None = None) -> jax.Array:
        """Logits [B, T, V] (float32) for token ids [B, T]."""
        x, _, compute_dtype = self._trunk(tokens_BT, positions_BT, segment_ids_BT)
        return self._logits(x, compute_dtype, self.hyper_head, self.final_norm)

    def forward_with_mtp(self, tokens_BT: jax.Array, targets_BT: jax.Array, *,
                         positions_BT: jax.Array | None = None, segment_ids_BT: jax.Array | None = None
                         ) -> tuple[jax.Array, list[jax.Array]]:
        """The logits [B, T, V] and, for each multi-token-prediction depth k = 1.., logits [B, T, V] whose
        row t predicts targets[t + k] (rows t >= T - k have no target). Depth k embeds targets[t + k - 1]."""
        x, ctx, compute_dtype = self._trunk(tokens_BT, positions_BT, segment_ids_BT)
        logits_BTV = self._logits(x, compute_dtype, self.hyper_head, self.final_norm)
        extra = []
        for k, module in enumerate(self.mtp or (), start=1):
            ahead_BT = jnp.pad(targets_BT[:, k - 1:], [(0, 0), (0, k - 1)])
            x = _call(module, (x, self.embed(ahead_BT)),
                      dataclasses.replace(ctx, tokens_BT=ahead_BT, kv_store={}, carry={}), self.remat)
            extra.append(self._logits(x, compute_dtype, module.hyper_head, module.final_norm))
        return logits_BTV, extra

    def train_loss(self, tokens_BT: jax.Array, targets_BT: jax.Array, mask_BT: jax.Array | None = None, *,
                   positions_BT: jax.Array | None = None, segment_ids_BT: jax.Array | None = None
                   ) -> tuple[jax.Array, dict[str, jax.Array]]:
        """The training objective: next-token cross-entropy plus `mtp_loss_weight` times the mean cross-
        entropy of the multi-token-prediction depths; returns it and its parts (nats)."""
        logits_BTV, extra = self.forward_with_mtp(tokens_BT, targets_BT, positions_BT=positions_BT,
                                                  segment_ids_BT=segment_ids_BT)
        loss, _ = cross_entropy(logits_BTV, targets_BT, mask_BT)
        parts = {"loss_next_token": loss}
        if extra:
            T = tokens_BT.shape[1]
            mtp = sum(cross_entropy(logits[:, :T - k], targets_BT[:, k:],
                                    None if mask_BT is None else mask_BT[:, k:])[0]
                      for k, logits in enumerate(extra, start=1)) / len(extra)
            parts["loss_mtp"] = mtp
            loss = loss + self.config.mtp_loss_weight * mtp
        return loss, parts

    def _trunk(self, tokens_BT, positions_BT, segment_ids_BT) -> tuple[jax.Array, LayerContext, jnp.dtype]:
        """The residual after the last block ([B, T, D], or [B, T, n, D] with streams), the blocks'
        context, and the compute dtype."""
        if tokens_BT.ndim != 2:
            raise ValueError(f"tokens must be [batch, time], got shape {tokens_BT.shape}")
        B, T = tokens_BT.shape
        default_positions = positions_BT is None
        if positions_BT is None:
            positions_BT = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
        x_BTD = self.embed(tokens_BT)
        ctx = LayerContext(positions_BT, segment_ids_BT, default_positions, tokens_BT=tokens_BT)
        if self.per_layer_embed is not None:
            ctx.layer_inputs_BTLP = self.per_layer_embed(tokens_BT, x_BTD)
        if self.input_scale_bias is not None:
            x_BTD = self.input_scale_bias(x_BTD)
        compute_dtype = x_BTD.dtype
        if self.residual_fp32:
            x_BTD = x_BTD.astype(jnp.float32)
        x = self.hyper_head.expand(x_BTD) if self.hyper_head is not None else x_BTD
        for block in self.blocks:
            x = _call(block, (x,), ctx, self.remat)
        return x, ctx, compute_dtype

    def _logits(self, x, compute_dtype, hyper_head: HyperHead | None, norm: RMSNorm) -> jax.Array:
        """Float32 logits from the residual: collapse the streams, norm, output head, softcap."""
        if hyper_head is not None:
            x = hyper_head(x)
        x_BTD = norm(x.astype(compute_dtype))
        if self.lm_head is None:
            logits_BTV = self.embed.attend(x_BTD)
        else:
            logits_BTV = jnp.einsum("BTD,DV->BTV", x_BTD, self.lm_head[...])
        logits_BTV = logits_BTV.astype(jnp.float32)
        if self.final_softcap:
            logits_BTV = self.final_softcap * jnp.tanh(logits_BTV / self.final_softcap)
        return logits_BTV


def _call(module, inputs: tuple, ctx: LayerContext, policy: str) -> jax.Array:
    """`module(*inputs, ctx)`; unless `policy` is "none", under `jax.checkpoint` with that policy. The
    context's arrays then go in as arguments and the entries the module adds to `kv_store`/`carry` come
    out as results, so nothing traced inside leaks out."""
    if policy == "none":
        return module(*inputs, ctx)

    def run(module, inputs, arrays):
        inner = dataclasses.replace(ctx, **{**arrays, "kv_store": dict(arrays["kv_store"]),
                                            "carry": dict(arrays["carry"])})
        return module(*inputs, inner), inner.kv_store, inner.carry

    arrays = {f.name: getattr(ctx, f.name) for f in dataclasses.fields(ctx) if f.name != "default_positions"}
    out, ctx.kv_store, ctx.carry = nnx.remat(run, policy=REMAT_POLICIES[policy])(module, inputs, arrays)
    return out


def cross_entropy(logits_BTV: jax.Array, targets_BT: jax.Array, mask_BT: jax.Array | None = None
                  ) -> tuple[jax.Array, jax.Array]:
    """Mean next-token cross-entropy in nats over the unmasked positions, and their count."""
    logprobs_BTV = jax.nn.log_softmax(logits_BTV.astype(jnp.float32), axis=-1)
    nll_BT = -jnp.take_along_axis(logprobs_BTV, targets_BT[..., None], axis=-1)[..., 0]
    mask_BT = jnp.ones_like(nll_BT) if mask_BT is None else mask_BT.astype(jnp.float32)
    count = jnp.maximum(mask_BT.sum(), 1.0)
    return (nll_BT * mask_BT).sum() / count, count
