"""Gated MLP: down(act(x W_gate) * (x W_up)), optionally with the SwiGLU clamp."""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from layers import activations, params
from layers.context import LayerContext


def clamp_gate_up(gate: jax.Array, up: jax.Array, limit: float) -> tuple[jax.Array, jax.Array]:
    """The SwiGLU clamp: min(gate, limit) and clip(up, -limit, limit); limit 0 leaves both alone."""
    if not limit:
        return gate, up
    return jnp.minimum(gate, limit), jnp.clip(up, -limit, limit)


class GatedMLP(nnx.Module):
    """down(act(gate) * up) over the last axis; `limit` > 0 clamps gate and up (`clamp_gate_up`), as
    DeepSeek-V4's experts and shared expert do."""

    def __init__(self, d_model: int, hidden_dim: int, *, activation: str = "gelu_tanh", limit: float = 0.0,
                 rngs: nnx.Rngs):
        self.act, self.limit = activations.get(activation), limit
        self.gate_proj = params.normal(rngs, (d_model, hidden_dim), ("embed", "mlp"))
        self.up_proj = params.normal(rngs, (d_model, hidden_dim), ("embed", "mlp"))
        self.down_proj = params.normal(rngs, (hidden_dim, d_model), ("mlp", "embed"))

    def mix(self, x_BTD: jax.Array, ctx: LayerContext) -> jax.Array:
        """The layer as a channel mixer of a decoder stack."""
        return self(x_BTD)

    def __call__(self, x_BTD: jax.Array) -> jax.Array:
        gate_BTF, up_BTF = clamp_gate_up(jnp.einsum("...D,DF->...F", x_BTD, self.gate_proj[...]),
                                         jnp.einsum("...D,DF->...F", x_BTD, self.up_proj[...]), self.limit)
        return jnp.einsum("...F,FD->...D", self.act(gate_BTF) * up_BTF, self.down_proj[...])
