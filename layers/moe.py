"""Mixture of experts: routers, experts computed as one grouped (ragged) matmul, and the MoE layer.

The experts run through `routed_experts`, or what the layer context's `partitioning.routed_experts` puts
in its place (zoo.sharding's expert-parallel version), keeping mesh logic out of the layers.

Shapes: B batch, T tokens, M tokens (batch and time flattened), E experts, K experts chosen per token,
D model width, F expert hidden width.
"""
from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from layers import activations, params
from layers.context import LayerContext
from layers.mlp import GatedMLP, clamp_gate_up
from layers.norms import rms_normalize
from layers.partitioning import UNPARTITIONED, Partitioning
from pallas_kernels import grouped_matmul as pallas_grouped_matmul


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


GROUPED_MATMUL_IMPLS = ("auto", "ragged", "blocked", "pallas")


def grouped_matmul(x_PD: jax.Array, w_EDF: jax.Array, group_sizes_E: jax.Array, *, impl: str = "auto"
                   ) -> jax.Array:
    """`jax.lax.ragged_dot(x_PD, w_EDF, group_sizes_E)`: the rows of x come sorted by group, row p of group
    e multiplies w[e], and rows past sum(group_sizes) give zeros. Returns [P, F] in ragged_dot's dtype.

        impl       runs as
        "ragged"   jax.lax.ragged_dot (native on TPU; fine on CPU)
        "blocked"  `_blocked_grouped_matmul`: groups padded to row blocks, one batched einsum
        "pallas"   pallas_kernels.grouped_matmul's Triton kernels (no group padded; interpret mode off GPU)
        "auto"     "blocked" when jax.default_backend() == "gpu" (where ragged_dot lowers densely,
                   every row against every expert), else "ragged". ("pallas" joins "auto" on GPU once
                   timed against "blocked" on an H100: benchmarks/moe_experts.py.)
    """
    if impl not in GROUPED_MATMUL_IMPLS:
        raise ValueError(f"grouped_matmul: unknown impl {impl!r}; expected one of {GROUPED_MATMUL_IMPLS}")
    if x_PD.ndim != 2 or w_EDF.ndim != 3 or group_sizes_E.ndim != 1:
        raise ValueError(f"grouped_matmul: expected x [P, D], w [E, D, F] and group_sizes [E]; got ranks "
                         f"{x_PD.ndim}, {w_EDF.ndim} and {group_sizes_E.ndim}")
    if x_PD.shape[1] != w_EDF.shape[1]:
        raise ValueError(f"grouped_matmul: x's D={x_PD.shape[1]} does not match w's D={w_EDF.shape[1]}")
    if group_sizes_E.shape[0] != w_EDF.shape[0]:
        raise ValueError(f"grouped_matmul: group_sizes has length {group_sizes_E.shape[0]} but w has "
                         f"E={w_EDF.shape[0]} experts")
    if impl == "auto":
        impl = "blocked" if jax.default_backend() == "gpu" else "ragged"
    if impl == "ragged":
        return jax.lax.ragged_dot(x_PD, w_EDF, group_sizes_E)
    if impl == "pallas":
        dtype = jnp.result_type(x_PD, w_EDF)
        return pallas_grouped_matmul(x_PD.astype(dtype), w_EDF.astype(dtype), group_sizes_E, impl="pallas_gpu")
    return _blocked_grouped_matmul(x_PD, w_EDF, group_sizes_E)


def _blocked_grouped_matmul(x_PD: jax.Array, w_EDF: jax.Array, group_sizes_E: jax.Array) -> jax.Array:
    """Each group padded to a multiple of an R-row block (R = m, a power of two in [8, 128]), so each of
    the N blocks belongs to one expert and the product is one batched einsum against the blocks' own
    weights. S = N * R slots hold every padded group. Gathers both ways (slot <- row in, row <- slot out),
    so plain autodiff gives the backward; all shapes static."""
    P, _ = x_PD.shape
    E = w_EDF.shape[0]
    m = min(128, max(8, 1 << max(0, -(-P // E) - 1).bit_length()))   # next_pow2(ceil(P / E)), clipped
    S = -(-(P + E * (m - 1)) // m) * m                                # room for every group padded to m
    N = S // m
    sizes_E = group_sizes_E.astype(jnp.int32)
    ends_E = jnp.cumsum(sizes_E)
    starts_E = ends_E - sizes_E
    padded_E = -(-sizes_E // m) * m
    padded_ends_E = jnp.cumsum(padded_E)
    padded_starts_E = padded_ends_E - padded_E
    # in: each block's expert (E past the last group: clamped, its rows zero) and each slot's row (P: zero)
    group_N = jnp.searchsorted(padded_ends_E, jnp.arange(N, dtype=jnp.int32) * m, side="right")
    expert_N = jnp.minimum(group_N, E - 1)
    rank_NR = jnp.arange(S, dtype=jnp.int32).reshape(N, m) - padded_starts_E[expert_N][:, None]
    row_NR = starts_E[expert_N][:, None] + rank_NR
    filled_NR = (group_N[:, None] < E) & (rank_NR < sizes_E[expert_N][:, None]) & (row_NR < P)
    x_NRD = jnp.take(x_PD, jnp.where(filled_NR, row_NR, P), axis=0, mode="fill", fill_value=0)
    # each block's weights picked by a one-hot matmul, not a gather: the gather's backward is a scatter-add
    # of N blocks into E matrices, slower on an H100 (docs/benchmarks.md); this one's is a matmul
    w_NDF = jnp.einsum("NE,EDF->NDF", jax.nn.one_hot(expert_N, E, dtype=w_EDF.dtype), w_EDF)
    y_NRF = jnp.einsum("NRD,NDF->NRF", x_NRD, w_NDF)
    # out: each row's slot (S, a zero row, for rows past sum(group_sizes))
    row_P = jnp.arange(P, dtype=jnp.int32)
    group_P = jnp.searchsorted(ends_E, row_P, side="right")
    expert_P = jnp.minimum(group_P, E - 1)
    slot_P = jnp.where(group_P < E, padded_starts_E[expert_P] + row_P - starts_E[expert_P], S)
    return jnp.take(y_NRF.reshape(S, -1), slot_P, axis=0, mode="fill", fill_value=0)


def routed_experts(x_MD: jax.Array, experts_MK: jax.Array, weights_MK: jax.Array, gate_EDF: jax.Array,
                   up_EDF: jax.Array, down_EFD: jax.Array, *, act: Callable[[jax.Array], jax.Array],
                   limit: float = 0.0, impl: str = "auto") -> jax.Array:
    """y[m] = sum_k weights[m, k] * expert_{experts[m, k]}(x[m]), expert e computing
    down_e(act(gate_e x) * up_e x) with the `clamp_gate_up` clamp. The M*K (token, expert) pairs are sorted
    by expert and run as grouped matmuls (`grouped_matmul` with `impl`). A pair whose expert id lies outside
    [0, E) adds nothing: an expert-parallel shard passes every token's ids minus its first expert and so
    computes only the pairs of its own E experts. Returns [M, D] in the grouped matmul's dtype."""
    M, K = experts_MK.shape
    E = gate_EDF.shape[0]
    expert_P = experts_MK.reshape(-1)                              # P = M * K (token, expert) pairs, m-major
    group_P = jnp.where((expert_P >= 0) & (expert_P < E), expert_P, E)   # E: not ours, sorted last
    order_P = jnp.argsort(group_P, stable=True)                    # sorted slot -> pair
    group_sizes_E = jnp.bincount(group_P, length=E + 1)[:E].astype(jnp.int32)
    # Both ways through the sort are permutations (gathers marked unique_indices), so neither direction
    # nor its gradient scatter-adds into a token's row: each token's K copies add up in a plain sum.
    x_PD = jnp.repeat(x_MD, K, axis=0).at[order_P].get(unique_indices=True)
    gate_PF = grouped_matmul(x_PD, gate_EDF, group_sizes_E, impl=impl)
    up_PF = grouped_matmul(x_PD, up_EDF, group_sizes_E, impl=impl)
    gate_PF, up_PF = clamp_gate_up(gate_PF, up_PF, limit)
    y_PD = grouped_matmul(act(gate_PF) * up_PF, down_EFD, group_sizes_E, impl=impl)
    slot_P = jnp.zeros_like(order_P).at[order_P].set(jnp.arange(M * K, dtype=order_P.dtype),
                                                     unique_indices=True)   # pair -> sorted slot
    y_MKD = y_PD.at[slot_P].get(unique_indices=True).reshape(M, K, -1)
    return jnp.einsum("MKD,MK->MD", y_MKD, weights_MK.astype(y_MKD.dtype))


class Experts(nnx.Module):
    """E gated MLPs, computed by `routed_experts` (or the partitioning's drop-in for it). `limit` > 0
    clamps each expert's gate and up pre-activations (`clamp_gate_up`); `matmul` picks the grouped matmul
    (`GROUPED_MATMUL_IMPLS`)."""

    def __init__(self, num_experts: int, d_model: int, hidden_dim: int, *, activation: str = "gelu_tanh",
                 limit: float = 0.0, matmul: str = "auto", rngs: nnx.Rngs):
        if matmul not in GROUPED_MATMUL_IMPLS:
            raise ValueError(f"unknown experts_matmul {matmul!r}; expected one of {GROUPED_MATMUL_IMPLS}")
        self.limit = limit
        self.matmul = matmul
        self.act = activations.get(activation)
        E, D, F = num_experts, d_model, hidden_dim
        self.gate_proj = params.normal(rngs, (E, D, F), ("experts", "embed", "expert_mlp"), std=D ** -0.5)
        self.up_proj = params.normal(rngs, (E, D, F), ("experts", "embed", "expert_mlp"), std=D ** -0.5)
        self.down_proj = params.normal(rngs, (E, F, D), ("experts", "expert_mlp", "embed"), std=F ** -0.5)

    def __call__(self, x_MD: jax.Array, experts_MK: jax.Array, weights_MK: jax.Array, *,
                 partitioning: Partitioning = UNPARTITIONED) -> jax.Array:
        """x [M, D], expert ids [M, K] in [0, E), routing weights [M, K] -> [M, D]."""
        routed = partitioning.routed_experts or routed_experts
        return routed(x_MD, experts_MK, weights_MK, self.gate_proj[...], self.up_proj[...], self.down_proj[...],
                      act=self.act, limit=self.limit, impl=self.matmul)


ROUTERS = ("softmax", "sigmoid", "sqrt_softplus", "hash")


class MoE(nnx.Module):
    """Routed experts behind one router kind, plus an optional always-on shared expert:
        y = sum_k w_k expert_k(x) [+ shared(x)]
    Routers: `softmax` (SoftmaxRouter), `sigmoid` (SigmoidRouter, selection-only correction bias),
    `sqrt_softplus` (SqrtSoftplusRouter) and `hash` (the same scores, experts fixed per token id).
    `limit` clamps the experts, `shared_limit` the shared expert (`clamp_gate_up`); `matmul` is the experts'
    grouped matmul (`GROUPED_MATMUL_IMPLS`)."""

    def __init__(self, d_model: int, num_experts: int, top_k: int, expert_dim: int, *, router: str,
                 activation: str = "silu", limit: float = 0.0, shared_expert_dim: int = 0,
                 shared_limit: float = 0.0, routed_scale: float = 1.0, softcap: float = 0.0,
                 input_norm: bool = True, hash_vocab: int = 0, matmul: str = "auto", eps: float = 1e-6,
                 rngs: nnx.Rngs):
        if router not in ROUTERS:
            raise ValueError(f"unknown router {router!r}; expected one of {ROUTERS}")
        if (router == "hash") != (hash_vocab > 0):
            raise ValueError("a hash router needs hash_vocab > 0 (the token-id table's size), other routers none")
        self.router_kind = router
        if router == "softmax":
            self.router = SoftmaxRouter(d_model, num_experts, top_k, input_norm=input_norm, per_expert_scale=True,
                                        eps=eps, rngs=rngs)
        elif router == "sigmoid":
            self.router = SigmoidRouter(d_model, num_experts, top_k, softcap=softcap, routed_scale=routed_scale,
                                        rngs=rngs)
        else:
            self.router = SqrtSoftplusRouter(d_model, num_experts, top_k, routed_scale=routed_scale,
                                             hash_vocab=hash_vocab, rngs=rngs)
        self.experts = Experts(num_experts, d_model, expert_dim, activation=activation, limit=limit,
                               matmul=matmul, rngs=rngs)
        self.shared_expert = (GatedMLP(d_model, shared_expert_dim, activation=activation, limit=shared_limit,
                                       rngs=rngs) if shared_expert_dim else None)

    def mix(self, x_BTD: jax.Array, ctx: LayerContext) -> jax.Array:
        """The layer as a channel mixer of a decoder stack (a hash router reads the context's token ids)."""
        return self(x_BTD, tokens_BT=ctx.tokens_BT, partitioning=ctx.partitioning)

    def __call__(self, x_BTD: jax.Array, *, router_input_BTD: jax.Array | None = None,
                 tokens_BT: jax.Array | None = None, partitioning: Partitioning = UNPARTITIONED) -> jax.Array:
        """[B, T, D]; the router reads `router_input_BTD` where given (else x), the hash router `tokens_BT`."""
        B, T, D = x_BTD.shape
        x_MD = x_BTD.reshape(B * T, D)
        r_MD = x_MD if router_input_BTD is None else router_input_BTD.reshape(B * T, D)
        if self.router_kind == "hash":
            if tokens_BT is None:
                raise ValueError("a hash-routed MoE layer needs the token ids")
            weights_MK, experts_MK, _ = self.router(r_MD, tokens_BT.reshape(-1))
        else:
            weights_MK, experts_MK, _ = self.router(r_MD)
        y_MD = self.experts(x_MD, experts_MK, weights_MK, partitioning=partitioning).astype(x_BTD.dtype)
        if self.shared_expert is not None:
            y_MD = y_MD + self.shared_expert(x_MD)
        return y_MD.reshape(B, T, D)
