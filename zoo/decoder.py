"""The decoder stack shared by every family: embed -> per-layer blocks -> norm -> head, and the loss.

A family supplies the block (`Block(cfg, layer_index, rngs=...)` called as `block(x, ctx)`, taking its
token and channel mixers from `layers.kinds`); everything here is family-agnostic and driven by the
model config. The decoder-level options and their defaults are `DecoderOptions` below; per-layer options
are `layers.kinds.LAYER_OPTIONS`.
"""
from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from layers import params
from layers.context import LayerContext
from layers.embeddings import Embed, PerLayerEmbedding
from layers.hyper_connections import HyperHead
from layers.norms import RMSNorm
from layers.partitioning import UNPARTITIONED, Partitioning
from layers.residual import ScaleBias

REMAT_POLICIES = {"full": jax.checkpoint_policies.nothing_saveable,
                  "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable}
REMAT = ("none", *REMAT_POLICIES)


@dataclasses.dataclass(frozen=True)
class DecoderOptions:
    """The decoder-level model options; a config may leave out any that has a default.

    scale_embeddings: multiply the embedded input by sqrt(d_model); tie_embeddings: the output head is the
    embedding table; final_softcap > 0: logits = c tanh(logits / c); ple_dim P > 0: per-layer embeddings
    of width P (table of ple_vocab_size rows, default vocab_size); input_scale_bias: a learned (x + b) * s on
    the embedded input; residual_fp32: the residual stream between blocks stays float32 whatever the compute
    dtype; hc_streams n > 0: the residual widens into n hyper-connection streams [B, T, n, D] (a learned
    HyperHead collapses them before the final norm); mtp_depth k > 0: k multi-token-prediction modules
    trained with weight mtp_loss_weight; remat ("none" | "full" | "dots"): recompute each block in the
    backward pass ("full": keep only its inputs; "dots": also keep matmul outputs).
    """
    vocab_size: int
    d_model: int
    num_layers: int
    norm_eps: float = 1e-6
    scale_embeddings: bool = False
    tie_embeddings: bool = False
    final_softcap: float = 0.0
    ple_dim: int = 0
    ple_vocab_size: int = 0
    input_scale_bias: bool = False
    residual_fp32: bool = False
    hc_streams: int = 0
    hc_eps: float = 1e-6
    mtp_depth: int = 0
    mtp_loss_weight: float = 0.0
    remat: str = "none"

    @classmethod
    def from_config(cls, cfg) -> "DecoderOptions":
        """The options of a model config; a missing required one is named."""
        fields = {f.name: f for f in dataclasses.fields(cls)}
        missing = [n for n, f in fields.items() if f.default is dataclasses.MISSING and n not in cfg]
        if missing:
            raise ValueError(f"the model config lacks {', '.join('model.' + m for m in missing)}")
        options = cls(**{n: cfg[n] for n in fields if n in cfg})
        if options.remat not in REMAT:
            raise ValueError(f"unknown model.remat {options.remat!r}; expected one of {REMAT}")
        return options


def _hyper_head(options: DecoderOptions, rngs: nnx.Rngs) -> HyperHead | None:
    n = options.hc_streams
    return HyperHead(n, options.d_model, eps=options.hc_eps, norm_eps=options.norm_eps, rngs=rngs) if n else None


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
        self.hyper_head = _hyper_head(DecoderOptions.from_config(cfg), rngs)
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
        o = DecoderOptions.from_config(cfg)
        self.vocab_size, self.final_softcap = o.vocab_size, o.final_softcap
        D = o.d_model
        self.embed = Embed(o.vocab_size, D, scale=math.sqrt(D) if o.scale_embeddings else 1.0, rngs=rngs)
        self.per_layer_embed = (PerLayerEmbedding(o.ple_vocab_size or o.vocab_size, o.num_layers, o.ple_dim, D,
                                                  eps=o.norm_eps, rngs=rngs) if o.ple_dim else None)
        self.input_scale_bias = ScaleBias(D) if o.input_scale_bias else None
        self.residual_fp32 = o.residual_fp32
        self.remat = o.remat
        self.mtp_loss_weight = o.mtp_loss_weight
        self.blocks = nnx.List([block_cls(cfg, i, rngs=rngs) for i in range(o.num_layers)])
        self.final_norm = RMSNorm(D, eps=o.norm_eps)
        self.lm_head = None if o.tie_embeddings else params.normal(rngs, (D, o.vocab_size), ("embed", "vocab"))
        self.hyper_head = _hyper_head(o, rngs)
        self.mtp = (nnx.List([MTPModule(cfg, block_cls, o.num_layers + k, rngs=rngs) for k in range(o.mtp_depth)])
                    if o.mtp_depth else None)

    def __call__(self, tokens_BT: jax.Array, *, positions_BT: jax.Array | None = None,
                 segment_ids_BT: jax.Array | None = None, partitioning: Partitioning = UNPARTITIONED) -> jax.Array:
        """Logits [B, T, V] (float32) for token ids [B, T]; `partitioning` (zoo.sharding.partitioning) runs
        fused kernels and routed experts shard by shard on a mesh."""
        x, _, compute_dtype = self._trunk(tokens_BT, positions_BT, segment_ids_BT, partitioning)
        return self._logits(x, compute_dtype, self.hyper_head, self.final_norm)

    def forward_with_mtp(self, tokens_BT: jax.Array, targets_BT: jax.Array, *,
                         positions_BT: jax.Array | None = None, segment_ids_BT: jax.Array | None = None,
                         partitioning: Partitioning = UNPARTITIONED) -> tuple[jax.Array, list[jax.Array]]:
        """The logits [B, T, V] and, for each multi-token-prediction depth k = 1.., logits [B, T, V] whose
        row t predicts targets[t + k] (rows t >= T - k have no target). Depth k embeds targets[t + k - 1]."""
        x, ctx, compute_dtype = self._trunk(tokens_BT, positions_BT, segment_ids_BT, partitioning)
        logits_BTV = self._logits(x, compute_dtype, self.hyper_head, self.final_norm)
        extra = []
        for k, module in enumerate(self.mtp or (), start=1):
            ahead_BT = jnp.pad(targets_BT[:, k - 1:], [(0, 0), (0, k - 1)])
            x = _call(module, (x, self.embed(ahead_BT)),
                      dataclasses.replace(ctx, tokens_BT=ahead_BT, kv_by_layer={}, router_state_BTR=None),
                      self.remat)
            extra.append(self._logits(x, compute_dtype, module.hyper_head, module.final_norm))
        return logits_BTV, extra

    def train_loss(self, tokens_BT: jax.Array, targets_BT: jax.Array, mask_BT: jax.Array | None = None, *,
                   positions_BT: jax.Array | None = None, segment_ids_BT: jax.Array | None = None,
                   partitioning: Partitioning = UNPARTITIONED) -> tuple[jax.Array, dict[str, jax.Array]]:
        """The training objective: next-token cross-entropy plus `mtp_loss_weight` times the mean cross-
        entropy of the multi-token-prediction depths; returns it and its parts (nats)."""
        logits_BTV, extra = self.forward_with_mtp(tokens_BT, targets_BT, positions_BT=positions_BT,
                                                  segment_ids_BT=segment_ids_BT, partitioning=partitioning)
        loss, _ = cross_entropy(logits_BTV, targets_BT, mask_BT)
        parts = {"loss_next_token": loss}
        if extra:
            T = tokens_BT.shape[1]
            mtp = sum(cross_entropy(logits[:, :T - k], targets_BT[:, k:],
                                    None if mask_BT is None else mask_BT[:, k:])[0]
                      for k, logits in enumerate(extra, start=1)) / len(extra)
            parts["loss_mtp"] = mtp
            loss = loss + self.mtp_loss_weight * mtp
        return loss, parts

    def extend(self, tokens_BT: jax.Array, cache: dict, new_tokens_B: jax.Array | None = None, *,
               partitioning: Partitioning = UNPARTITIONED, return_hidden: bool = False) -> tuple:
        """Decoding: runs token ids [B, T] as the next chunk of each row (the first `new_tokens_B` of them
        real; default all T) through the same blocks against `cache` (zoo.inference.init_cache).
        Returns float32 logits [B, T, V] and the cache with the chunk appended; with `return_hidden`,
        (logits, the last block's output [B, T, D] (the MTP modules' input), cache)."""
        if tokens_BT.ndim != 2:
            raise ValueError(f"tokens must be [batch, time], got shape {tokens_BT.shape}")
        B, T = tokens_BT.shape
        lengths_B = cache["lengths_B"]
        new_tokens_B = (jnp.full((B,), T, jnp.int32) if new_tokens_B is None
                        else jnp.asarray(new_tokens_B, jnp.int32))
        caches = dict(enumerate(cache["layers"]))
        ctx_fields = dict(caches=caches, cache_lengths_B=lengths_B, new_tokens_B=new_tokens_B)
        x, _, compute_dtype = self._trunk(tokens_BT, lengths_B[:, None] + jnp.arange(T, dtype=jnp.int32)[None],
                                          None, partitioning, ctx_fields)
        logits_BTV = self._logits(x, compute_dtype, self.hyper_head, self.final_norm)
        layers = tuple(caches[i] for i in range(len(cache["layers"])))
        new_cache = {"lengths_B": lengths_B + new_tokens_B, "layers": layers}
        return (logits_BTV, x, new_cache) if return_hidden else (logits_BTV, new_cache)

    def _trunk(self, tokens_BT, positions_BT, segment_ids_BT, partitioning: Partitioning, ctx_fields=None
               ) -> tuple[jax.Array, LayerContext, jnp.dtype]:
        """The residual after the last block ([B, T, D], or [B, T, n, D] with streams), the blocks'
        context, and the compute dtype."""
        if tokens_BT.ndim != 2:
            raise ValueError(f"tokens must be [batch, time], got shape {tokens_BT.shape}")
        B, T = tokens_BT.shape
        default_positions = positions_BT is None
        if positions_BT is None:
            positions_BT = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
        x_BTD = self.embed(tokens_BT)
        ctx = LayerContext(positions_BT, segment_ids_BT, default_positions, tokens_BT=tokens_BT,
                           partitioning=partitioning, **(ctx_fields or {}))
        if self.per_layer_embed is not None:
            ctx.layer_inputs_BTLP = self.per_layer_embed(tokens_BT, x_BTD)
        if self.input_scale_bias is not None:
            x_BTD = self.input_scale_bias(x_BTD)
        compute_dtype = x_BTD.dtype
        if self.residual_fp32:
            x_BTD = x_BTD.astype(jnp.float32)
        x = self.hyper_head.expand(x_BTD) if self.hyper_head is not None else x_BTD
        for block in self.blocks:   # decoding needs no backward pass: no remat
            x = _call(block, (x,), ctx, "none" if ctx.caches is not None else self.remat)
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
    context's arrays then go in as arguments and what the module hands on (`LayerContext.HANDED_ON`)
    comes out as results, so nothing traced inside leaks out. Cached decoding (`ctx.caches`) never
    recomputes: it has no backward pass."""
    if policy == "none" or ctx.caches is not None:
        return module(*inputs, ctx)
    static = ("default_positions", "partitioning")

    def run(module, inputs, arrays):
        inner = dataclasses.replace(ctx, **{**arrays, "kv_by_layer": dict(arrays["kv_by_layer"])})
        return module(*inputs, inner), {name: getattr(inner, name) for name in LayerContext.HANDED_ON}

    arrays = {f.name: getattr(ctx, f.name) for f in dataclasses.fields(ctx) if f.name not in static}
    out, handed_on = nnx.remat(run, policy=REMAT_POLICIES[policy])(module, inputs, arrays)
    for name, value in handed_on.items():
        setattr(ctx, name, value)
    return out


def cross_entropy(logits_BTV: jax.Array, targets_BT: jax.Array, mask_BT: jax.Array | None = None
                  ) -> tuple[jax.Array, jax.Array]:
    """Mean next-token cross-entropy in nats over the unmasked positions, and their count."""
    logprobs_BTV = jax.nn.log_softmax(logits_BTV.astype(jnp.float32), axis=-1)
    nll_BT = -jnp.take_along_axis(logprobs_BTV, targets_BT[..., None], axis=-1)[..., 0]
    mask_BT = jnp.ones_like(nll_BT) if mask_BT is None else mask_BT.astype(jnp.float32)
    count = jnp.maximum(mask_BT.sum(), 1.0)
    return (nll_BT * mask_BT).sum() / count, count
