"""Token embeddings (optionally scaled, usable as the tied output head) and per-layer embeddings."""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from layers import params
from layers.norms import RMSNorm


class Embed(nnx.Module):
    """`table[ids] * scale`; the scale is rounded to the table's dtype first (bf16: sqrt(1536) -> 39.25).
    The table starts at std 1/sqrt(dim), so as a tied head it gives logits of about unit scale."""

    def __init__(self, vocab_size: int, dim: int, *, scale: float = 1.0, rngs: nnx.Rngs):
        self.scale = scale
        self.table = params.normal(rngs, (vocab_size, dim), ("vocab", "embed"), std=dim ** -0.5)

    def __call__(self, ids_BT: jax.Array) -> jax.Array:
        table = self.table[...]
        return jnp.take(table, ids_BT, axis=0) * jnp.asarray(self.scale, table.dtype)

    def attend(self, x_BTD: jax.Array) -> jax.Array:
        """Logits against the table (a tied output head)."""
        return jnp.einsum("BTD,VD->BTV", x_BTD, self.table[...].astype(x_BTD.dtype))


class PerLayerEmbedding(nnx.Module):
    """A small extra input for every layer, from the token and from the embedded context.

    token part:   e = table[ids] * sqrt(P), table [V, L*P] read as [B, T, L, P]
    context part: p = RMSNorm_P((h0 @ W) * D^-0.5), W [D, L*P]
    result:       (p + e) / sqrt(2); layer l reads [:, :, l, :].
    """

    def __init__(self, vocab_size: int, num_layers: int, dim: int, d_model: int, *, eps: float = 1e-6,
                 rngs: nnx.Rngs):
        self.num_layers, self.dim, self.d_model = num_layers, dim, d_model
        self.token_table = params.normal(rngs, (vocab_size, num_layers * dim), ("vocab", "layer_embed"),
                                         std=1.0)
        self.context_proj = params.normal(rngs, (d_model, num_layers * dim), ("embed", "layer_embed"))
        self.context_norm = RMSNorm(dim, eps=eps)

    def __call__(self, ids_BT: jax.Array, h0_BTD: jax.Array) -> jax.Array:
        """Returns [B, T, L, P]."""
        B, T = ids_BT.shape
        L, P = self.num_layers, self.dim
        table = self.token_table[...]
        token_BTLP = (jnp.take(table, ids_BT, axis=0) * jnp.asarray(P ** 0.5, table.dtype)).reshape(B, T, L, P)
        context = jnp.einsum("BTD,DE->BTE", h0_BTD, self.context_proj[...]) * (self.d_model ** -0.5)
        context_BTLP = self.context_norm(context.reshape(B, T, L, P))
        return (context_BTLP + token_BTLP.astype(context_BTLP.dtype)) * (2.0 ** -0.5)
