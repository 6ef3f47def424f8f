"""Manifold-constrained hyper-connections (mHC): the residual stream widened to n parallel streams.

Shapes: B batch, T tokens, N = n streams, D model width, C = (2 + n) n mixing coefficients.

Around one sublayer F (attention or MLP), from the streams x [B, T, N, D]:
    m        = rmsnorm(flat(x)) W                     [B, T, C], W [N*D, C], in float32
    pre      = sigmoid(m[:n] * a_0 + b[:n]) + eps                         [B, T, N]
    post     = 2 sigmoid(m[n:2n] * a_1 + b[n:2n])                         [B, T, N]
    comb     = sinkhorn(softmax_row(m[2n:] * a_2 + b[2n:]) + eps)         [B, T, N, N], doubly stochastic
    u        = sum_j pre_j x_j                        the sublayer's input
    x'_k     = post_k F(u) + sum_j comb[j, k] x_j     (comb is applied transposed)
The stream count stays n from the embedding (copied into every stream) to the head, where `HyperHead`
collapses the streams with weights sigmoid(m a + b) + eps (no Sinkhorn). Keeping comb doubly stochastic
makes the stream mixing a convex combination, so repeated layers cannot blow the residual up.
"""
from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from layers import params
from layers.norms import rms_normalize


def sinkhorn(comb_NN: jax.Array, iters: int, eps: float) -> jax.Array:
    """Alternately normalises columns and rows of positive [..., N, N] matrices, columns first and last:
    one column pass, then `iters - 1` (row, column) passes, each dividing by (sum + eps)."""
    def rows_then_columns(_, c):
        c = c / (c.sum(axis=-1, keepdims=True) + eps)
        return c / (c.sum(axis=-2, keepdims=True) + eps)

    comb_NN = comb_NN / (comb_NN.sum(axis=-2, keepdims=True) + eps)
    return jax.lax.fori_loop(0, iters - 1, rows_then_columns, comb_NN)


def expand(x_BTD: jax.Array, num_streams: int) -> jax.Array:
    """The embedding copied into every stream: [B, T, N, D]."""
    return jnp.broadcast_to(x_BTD[:, :, None, :], (*x_BTD.shape[:2], num_streams, x_BTD.shape[-1]))


def _mix(x_BTND: jax.Array, proj_NDC: jax.Array, norm_eps: float) -> jax.Array:
    """The mixing logits rmsnorm(flat(x)) W in float32 [B, T, C]."""
    B, T, N, D = x_BTND.shape
    flat = rms_normalize(x_BTND.reshape(B, T, N * D), norm_eps)
    return jnp.einsum("BTK,KC->BTC", flat, proj_NDC.astype(jnp.float32).reshape(N * D, -1))


class HyperConnection(nnx.Module):
    """The mHC around one sublayer: `hc(x_BTND, sublayer)` runs `sublayer` ([B, T, D] -> [B, T, D]) on the
    pre-weighted sum of the streams and writes its output back into every stream."""

    def __init__(self, num_streams: int, d_model: int, *, sinkhorn_iters: int = 20, eps: float = 1e-6,
                 norm_eps: float = 1e-6, rngs: nnx.Rngs):
        N, D = num_streams, d_model
        self.num_streams, self.sinkhorn_iters, self.eps, self.norm_eps = N, sinkhorn_iters, eps, norm_eps
        self.proj = params.normal(rngs, (N, D, (2 + N) * N), ("hc_streams", "embed", "hc_mix"), fan_in_dims=2)
        self.bias = params.zeros(((2 + N) * N,), ("hc_mix",))
        self.scale = params.ones((3,), (None,))

    def weights(self, x_BTND: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        """float32 (pre [B, T, N], post [B, T, N], comb [B, T, N, N])."""
        N = self.num_streams
        m_BTC = _mix(x_BTND, self.proj[...], self.norm_eps)
        bias_C, scale_3 = self.bias[...].astype(jnp.float32), self.scale[...].astype(jnp.float32)
        pre_BTN = jax.nn.sigmoid(m_BTC[..., :N] * scale_3[0] + bias_C[:N]) + self.eps
        post_BTN = 2.0 * jax.nn.sigmoid(m_BTC[..., N:2 * N] * scale_3[1] + bias_C[N:2 * N])
        comb_logits = m_BTC[..., 2 * N:] * scale_3[2] + bias_C[2 * N:]
        comb_BTNN = jax.nn.softmax(comb_logits.reshape(*m_BTC.shape[:2], N, N), axis=-1) + self.eps
        return pre_BTN, post_BTN, sinkhorn(comb_BTNN, self.sinkhorn_iters, self.eps)

    def __call__(self, x_BTND: jax.Array, sublayer: Callable[[jax.Array], jax.Array]) -> jax.Array:
        pre_BTN, post_BTN, comb_BTNN = self.weights(x_BTND)
        dtype = x_BTND.dtype
        u_BTD = jnp.einsum("BTN,BTND->BTD", pre_BTN, x_BTND.astype(jnp.float32)).astype(dtype)
        y_BTD = sublayer(u_BTD)
        mixed_BTND = jnp.einsum("BTJK,BTJD->BTKD", comb_BTNN.astype(dtype), x_BTND)
        return post_BTN.astype(dtype)[..., None] * y_BTD[:, :, None, :] + mixed_BTND


class HyperHead(nnx.Module):
    """Collapses the n streams into one before the final norm: y = sum_j pre_j x_j with
    pre = sigmoid(rmsnorm(flat(x)) W a + b) + eps."""

    def __init__(self, num_streams: int, d_model: int, *, eps: float = 1e-6, norm_eps: float = 1e-6,
                 rngs: nnx.Rngs):
        N, D = num_streams, d_model
        self.num_streams, self.eps, self.norm_eps = N, eps, norm_eps
        self.proj = params.normal(rngs, (N, D, N), ("hc_streams", "embed", "hc_mix"), fan_in_dims=2)
        self.bias = params.zeros((N,), ("hc_mix",))
        self.scale = params.ones((1,), (None,))

    def expand(self, x_BTD: jax.Array) -> jax.Array:
        return expand(x_BTD, self.num_streams)

    def __call__(self, x_BTND: jax.Array) -> jax.Array:
        m_BTN = _mix(x_BTND, self.proj[...], self.norm_eps)
        pre_BTN = jax.nn.sigmoid(m_BTN * self.scale[...].astype(jnp.float32)
                                 + self.bias[...].astype(jnp.float32)) + self.eps
        return jnp.einsum("BTN,BTND->BTD", pre_BTN, x_BTND.astype(jnp.float32)).astype(x_BTND.dtype)
