"""Gated MLP: down(act(x W_gate) * (x W_up))."""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from layers import activations, params


class GatedMLP(nnx.Module):
    def __init__(self, d_model: int, hidden_dim: int, *, activation: str = "gelu_tanh", rngs: nnx.Rngs):
        self.act = activations.get(activation)
        self.gate_proj = params.normal(rngs, (d_model, hidden_dim), ("embed", "mlp"))
        self.up_proj = params.normal(rngs, (d_model, hidden_dim), ("embed", "mlp"))
        self.down_proj = params.normal(rngs, (hidden_dim, d_model), ("mlp", "embed"))

    def __call__(self, x_BTD: jax.Array) -> jax.Array:
        gate_BTF = jnp.einsum("BTD,DF->BTF", x_BTD, self.gate_proj[...])
        up_BTF = jnp.einsum("BTD,DF->BTF", x_BTD, self.up_proj[...])
        return jnp.einsum("BTF,FD->BTD", self.act(gate_BTF) * up_BTF, self.down_proj[...])
