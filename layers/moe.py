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


class SqrtSoftplusRouter(nnx.Module):
    """sqrt(softplus(logits)) scores (float32) -> experts: top-k of (scores + correction bias), or the
    token's row of a fixed token -> experts table (hash routing, `hash_vocab` > 0) -> the chosen scores
    renormalised -> times `routed_scale`.

    The correction bias steers only which experts are chosen (auxiliary-loss-free balancing) and takes no
    gradient. The hash table `token_experts` [V, K] holds expert ids as exact small integers in a float
    parameter (every weight here is a float Param), read without gradient and never decayed (its first
    axis is "vocab"); at init each token gets K distinct experts drawn from the seed.
    """

    def __init__(self, d_model: int, num_experts: int, top_k: int, *, routed_scale: float = 1.0,
                 hash_vocab: int = 0, rngs: nnx.Rngs):
        if not 0 < top_k <= num_experts:
            raise ValueError(f"top_k={top_k} must be in [1, num_experts={num_experts}]")
        self.top_k, self.routed_scale = top_k, routed_scale
        self.proj = params.normal(rngs, (d_model, num_experts), ("embed", "experts"))
        if hash_vocab:
            draws = jax.random.uniform(rngs.params(), (hash_vocab, num_experts))
            table = jnp.argsort(draws, axis=-1)[:, :top_k].astype(jnp.float32)
            self.token_experts = nnx.Param(table, axes=("vocab", None))
            self.correction_bias = None
        else:
            self.token_experts = None
            self.correction_bias = params.zeros((num_experts,), ("experts",))

    def __call__(self, x_MD: jax.Array, tokens_M: jax.Array | None = None
                 ) -> tuple[jax.Array, jax.Array, jax.Array]:
        """Returns (weights [M, K] float32, expert ids [M, K], scores [M, E] float32); hash routing needs
        the token ids [M]."""
        logits_ME = jnp.einsum("MD,DE->ME", x_MD, self.proj[...], preferred_element_type=jnp.float32)
        scores_ME = jnp.sqrt(jax.nn.softplus(logits_ME))
        if self.token_experts is not None:
            if tokens_M is None:
                raise ValueError("a hash-routed MoE layer needs the token ids")
            table = jax.lax.stop_gradient(self.token_experts[...].astype(jnp.float32))
            experts_MK = jnp.round(jnp.take(table, tokens_M, axis=0)).astype(jnp.int32)
        else:
            bias_E = jax.lax.stop_gradient(self.correction_bias[...].astype(jnp.float32))
            _, experts_MK = jax.lax.top_k(scores_ME + bias_E, self.top_k)
        weights_MK = jnp.take_along_axis(scores_ME, experts_MK, axis=-1)
        weights_MK = weights_MK / (jnp.sum(weights_MK, axis=-1, keepdims=True) + 1e-20)
        return weights_MK * self.routed_scale, experts_MK, scores_ME


def clamp_gate_up(gate: jax.Array, up: jax.Array, limit: float) -> tuple[jax.Array, jax.Array]:
    """The SwiGLU clamp: min(gate, limit) and clip(up, -limit, limit); limit 0 leaves both alone."""
    if not limit:
        return gate, up
    return jnp.minimum(gate, limit), jnp.clip(up, -limit, limit)


class SharedExpert(nnx.Module):
    """The always-on expert beside the routed ones: down(act(gate) * up), with the routed experts'
    clamp on gate and up when `limit` > 0."""

    def __init__(self, d_model: int, hidden_dim: int, *, activation: str = "silu", limit: float = 0.0,
                 rngs: nnx.Rngs):
        self.act, self.limit = activations.get(activation), limit
        self.gate_proj = params.normal(rngs, (d_model, hidden_dim), ("embed", "mlp"))
        self.up_proj = params.normal(rngs, (d_model, hidden_dim), ("embed", "mlp"))
        self.down_proj = params.normal(rngs, (hidden_dim, d_model), ("mlp", "embed"))

    def __call__(self, x_MD: jax.Array) -> jax.Array:
        gate_MF, up_MF = clamp_gate_up(jnp.einsum("MD,DF->MF", x_MD, self.gate_proj[...]),
                                       jnp.einsum("MD,DF->MF", x_MD, self.up_proj[...]), self.limit)
        return jnp.einsum("MF,FD->MD", self.act(gate_MF) * up_MF, self.down_proj[...])


class Experts(nnx.Module):
    """E gated MLPs. The M*K (token, expert) pairs are sorted by expert and run as ragged matmuls.
    `limit` > 0 clamps each expert's gate and up pre-activations (`clamp_gate_up`)."""

    def __init__(self, num_experts: int, d_model: int, hidden_dim: int, *, activation: str = "gelu_tanh",
                 limit: float = 0.0, rngs: nnx.Rngs):
        self.num_experts, self.limit = num_experts, limit
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
        gate_PF, up_PF = clamp_gate_up(gate_PF, up_PF, self.limit)
        y_PD = jax.lax.ragged_dot(self.act(gate_PF) * up_PF, self.down_proj[...], group_sizes_E)
        y_PD = y_PD * weights_MK.reshape(-1)[order_P][:, None].astype(y_PD.dtype)
        return jnp.zeros((M, x_MD.shape[-1]), y_PD.dtype).at[token_P].add(y_PD)
