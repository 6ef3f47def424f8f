"""An MLP router with expert-dependent accumulation and a skip class, and the top-1 MoE it drives.

Shapes: M tokens (batch and time flattened), D model width, R router width, E experts, C = E + 1 router
classes (the last one is "skip": the token gets no expert), F expert hidden width.

    r     = down_proj(x) [+ r_prev * state_scale]          r is handed to the next layer's router
    p     = softmax(out_proj(act(fc2(act(fc1(rmsnorm(r)))))))               [M, C]
    c     = argmax(p + balancing_biases)       the biases steer selection only (set outside training)
    y     = p_c * expert_c(x)          top-1, not renormalised; a skipped token gets 0 or p_skip * x
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from layers import activations, params
from layers.context import LayerContext
from layers.moe import Experts
from layers.norms import RMSNorm
from layers.partitioning import UNPARTITIONED, Partitioning

SKIP_OUTPUTS = ("zero", "identity")


class MLPRouter(nnx.Module):
    """Scores E experts and a skip class with a small MLP on a down-projected, accumulated router state.

    `accumulate=True` adds the previous layer's router state, scaled per channel (expert-dependent
    accumulation); the first layer of a stack has none.
    """

    def __init__(self, d_model: int, num_experts: int, router_dim: int, *, accumulate: bool,
                 activation: str = "gelu", eps: float = 1e-6, rngs: nnx.Rngs):
        D, R, C = d_model, router_dim, num_experts + 1
        self.num_experts = num_experts
        self.act = activations.get(activation)
        self.down_proj = params.normal(rngs, (D, R), ("embed", "router"))
        self.down_bias = params.zeros((R,), ("router",))
        self.state_scale = params.ones((R,), ("router",)) if accumulate else None
        self.norm = RMSNorm(R, eps=eps, axis_name="router")
        self.fc1 = params.normal(rngs, (R, R), ("router", "router_mlp"))
        self.fc1_bias = params.zeros((R,), ("router_mlp",))
        self.fc2 = params.normal(rngs, (R, R), ("router_mlp", "router"))
        self.fc2_bias = params.zeros((R,), ("router",))
        self.out_proj = params.normal(rngs, (R, C), ("router", "router_classes"))
        # Skip starts disfavoured. Selection only: no gradient reaches these biases.
        self.balancing_biases = nnx.Param(jnp.zeros((C,), jnp.float32).at[-1].set(-1.0),
                                          axes=("router_classes",))

    def __call__(self, x_MD: jax.Array, state_MR: jax.Array | None
                 ) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
        """Returns (chosen class [M] in [0, E], its probability [M] float32, probabilities [M, C]
        float32, router state [M, R] for the next layer)."""
        r_MR = jnp.einsum("MD,DR->MR", x_MD, self.down_proj[...]) + self.down_bias[...]
        if self.state_scale is not None:
            if state_MR is None:
                raise ValueError("an accumulating router needs the previous layer's router state")
            r_MR = r_MR + state_MR * self.state_scale[...]
        h_MR = self.act(jnp.einsum("MR,RS->MS", self.norm(r_MR), self.fc1[...]) + self.fc1_bias[...])
        h_MR = self.act(jnp.einsum("MS,SR->MR", h_MR, self.fc2[...]) + self.fc2_bias[...])
        logits_MC = jnp.einsum("MR,RC->MC", h_MR, self.out_proj[...], preferred_element_type=jnp.float32)
        probs_MC = jax.nn.softmax(logits_MC, axis=-1)
        biases_C = jax.lax.stop_gradient(self.balancing_biases[...].astype(jnp.float32))
        chosen_M = jnp.argmax(jax.lax.stop_gradient(probs_MC) + biases_C, axis=-1)
        weight_M = jnp.take_along_axis(probs_MC, chosen_M[:, None], axis=-1)[:, 0]
        return chosen_M, weight_M, probs_MC, r_MR


class SkipMoE(nnx.Module):
    """Top-1 routed experts behind an `MLPRouter`. A token routed to the skip class gets zero
    (`skip_output="zero"`) or its own input scaled by the skip probability (`"identity"`). `matmul` is the
    experts' grouped matmul (`layers.moe.GROUPED_MATMUL_IMPLS`)."""

    def __init__(self, d_model: int, num_experts: int, expert_dim: int, router_dim: int, *, accumulate: bool,
                 skip_output: str = "zero", activation: str = "silu", router_activation: str = "gelu",
                 matmul: str = "auto", eps: float = 1e-6, rngs: nnx.Rngs):
        if skip_output not in SKIP_OUTPUTS:
            raise ValueError(f"unknown skip_output {skip_output!r}; expected one of {SKIP_OUTPUTS}")
        self.skip_output = skip_output
        self.router = MLPRouter(d_model, num_experts, router_dim, accumulate=accumulate,
                                activation=router_activation, eps=eps, rngs=rngs)
        self.experts = Experts(num_experts, d_model, expert_dim, activation=activation, matmul=matmul, rngs=rngs)

    def mix(self, x_BTD: jax.Array, ctx: LayerContext) -> jax.Array:
        """The layer as a channel mixer of a decoder stack: reads the previous layer's router state from
        the context and hands its own on."""
        y_BTD, ctx.router_state_BTR = self(x_BTD, ctx.router_state_BTR, partitioning=ctx.partitioning)
        return y_BTD

    def __call__(self, x_BTD: jax.Array, state_BTR: jax.Array | None, *,
                 partitioning: Partitioning = UNPARTITIONED) -> tuple[jax.Array, jax.Array]:
        """Returns the output [B, T, D] and the router state [B, T, R] for the next layer."""
        B, T, D = x_BTD.shape
        x_MD = x_BTD.reshape(B * T, D)
        state_MR = None if state_BTR is None else state_BTR.reshape(B * T, -1)
        chosen_M, weight_M, _, state_MR = self.router(x_MD, state_MR)
        skip_M = chosen_M == self.router.num_experts
        # Skipped tokens ride along with expert 0 at weight 0, keeping the grouped matmul's shapes static.
        expert_M1 = jnp.where(skip_M, 0, chosen_M)[:, None]
        y_MD = self.experts(x_MD, expert_M1, jnp.where(skip_M, 0.0, weight_M)[:, None], partitioning=partitioning)
        if self.skip_output == "identity":
            y_MD = y_MD + x_MD * jnp.where(skip_M, weight_M, 0.0)[:, None].astype(x_MD.dtype)
        return y_MD.astype(x_BTD.dtype).reshape(B, T, D), state_MR.reshape(B, T, -1)
