"""Mixture of experts: routers and experts computed as one grouped (ragged) matmul.

Shapes: M tokens (batch and time flattened), E experts, K experts chosen per token, D model width,
F expert hidden width.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from layers import activations, params
from layers.norms import rms_normalize


class SoftmaxRouter(nnx.Module):
    """softmax over expert logits -> top-k -> renormalise -> times a learned per-expert scale.

    With `input_norm`, the router reads `rmsnorm(x) * scale * D^-0.5` (a learned [D] scale, no
    mean-square weight) rather than x.
    """

    def __init__(self, d_model: int, num_experts: int, top_k: int, *, input_norm: bool = True,
                 per_expert_scale: bool = True, eps: float = 1e-6, rngs: nnx.Rngs):
        if not 0 < top_k <= num_experts:
            raise ValueError(f"top_k={top_k} must be in [1, num_experts={num_experts}]")
        self.top_k, self.eps, self.d_model = top_k, eps, d_model
        self.proj = params.normal(rngs, (d_model, num_experts), ("embed", "experts"))
        self.input_scale = params.ones((d_model,), ("embed",)) if input_norm else None
        self.per_expert_scale = params.ones((num_experts,), ("experts",)) if per_expert_scale else None

    def __call__(self, x_MD: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        """Returns (weights [M, K] float32, expert ids [M, K], probabilities [M, E] float32)."""
        if self.input_scale is not None:
            x_MD = (rms_normalize(x_MD, self.eps) * self.input_scale[...].astype(jnp.float32)
                    * self.d_model ** -0.5).astype(x_MD.dtype)
        logits_ME = jnp.einsum("MD,DE->ME", x_MD, self.proj[...], preferred_element_type=jnp.float32)
        probs_ME = jax.nn.softmax(logits_ME, axis=-1)
        weights_MK, experts_MK = jax.lax.top_k(probs_ME, self.top_k)
        weights_MK = weights_MK / jnp.sum(weights_MK, axis=-1, keepdims=True)
        if self.per_expert_scale is not None:
            weights_MK = weights_MK * self.per_expert_scale[...].astype(jnp.float32)[experts_MK]
        return weights_MK, experts_MK, probs_ME


class SigmoidRouter(nnx.Module):
    """sigmoid scores -> top-k of (scores + correction bias) -> the chosen scores renormalised -> times
    `routed_scale`.

    Each expert's score is an independent sigmoid of its logit (in float32; `softcap` > 0 first squashes
    the logits to softcap * tanh(logits / softcap)). The per-expert correction bias steers only which
    experts are chosen (auxiliary-loss-free load balancing); the weights come from the unbiased scores,
    and the bias takes no gradient.
    """

    def __init__(self, d_model: int, num_experts: int, top_k: int, *, softcap: float = 0.0,
                 routed_scale: float = 1.0, rngs: nnx.Rngs):
        if not 0 < top_k <= num_experts:
            raise ValueError(f"top_k={top_k} must be in [1, num_experts={num_experts}]")
        self.top_k, self.softcap, self.routed_scale = top_k, softcap, routed_scale
        self.proj = params.normal(rngs, (d_model, num_experts), ("embed", "experts"))
        self.correction_bias = params.zeros((num_experts,), ("experts",))

    def __call__(self, x_MD: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        """Returns (weights [M, K] float32, expert ids [M, K], scores [M, E] float32)."""
        logits_ME = jnp.einsum("MD,DE->ME", x_MD, self.proj[...], preferred_element_type=jnp.float32)
        if self.softcap:
            logits_ME = self.softcap * jnp.tanh(logits_ME / self.softcap)
        scores_ME = jax.nn.sigmoid(logits_ME)
        bias_E = jax.lax.stop_gradient(self.correction_bias[...].astype(jnp.float32))
        _, experts_MK = jax.lax.top_k(scores_ME + bias_E, self.top_k)
        weights_MK = jnp.take_along_axis(scores_ME, experts_MK, axis=-1)
        weights_MK = weights_MK / jnp.sum(weights_MK, axis=-1, keepdims=True)
        return weights_MK * self.routed_scale, experts_MK, scores_ME


class Experts(nnx.Module):
    """E gated MLPs. The M*K (token, expert) pairs are sorted by expert and run as ragged matmuls."""

    def __init__(self, num_experts: int, d_model: int, hidden_dim: int, *, activation: str = "gelu_tanh",
                 rngs: nnx.Rngs):
        self.num_experts = num_experts
        self.act = activations.get(activation)
        E, D, F = num_experts, d_model, hidden_dim
        self.gate_proj = params.normal(rngs, (E, D, F), ("experts", "embed", "expert_mlp"), std=D ** -0.5)
        self.up_proj = params.normal(rngs, (E, D, F), ("experts", "embed", "expert_mlp"), std=D ** -0.5)
        self.down_proj = params.normal(rngs, (E, F, D), ("experts", "expert_mlp", "embed"), std=F ** -0.5)

    def __call__(self, x_MD: jax.Array, experts_MK: jax.Array, weights_MK: jax.Array) -> jax.Array:
        M, K = experts_MK.shape
        flat_expert_P = experts_MK.reshape(-1)                      # P = M * K (token, expert) pairs
        order_P = jnp.argsort(flat_expert_P, stable=True)
        token_P = order_P // K
        group_sizes_E = jnp.bincount(flat_expert_P, length=self.num_experts).astype(jnp.int32)
        x_PD = jnp.take(x_MD, token_P, axis=0)
        gate_PF = jax.lax.ragged_dot(x_PD, self.gate_proj[...], group_sizes_E)
        up_PF = jax.lax.ragged_dot(x_PD, self.up_proj[...], group_sizes_E)
        y_PD = jax.lax.ragged_dot(self.act(gate_PF) * up_PF, self.down_proj[...], group_sizes_E)
        y_PD = y_PD * weights_MK.reshape(-1)[order_P][:, None].astype(y_PD.dtype)
        return jnp.zeros((M, x_MD.shape[-1]), y_PD.dtype).at[token_P].add(y_PD)
