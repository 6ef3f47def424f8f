"""Compressed Convolutional Attention (CCA): grouped-query attention computed in a compressed latent space.

Shapes: B batch, T tokens, D model width, N query heads, K kv heads, G = N + K convolution groups (one
per q and k head), H head dim, V = K * H / 2 value channels of each half of the value shift.

    q, k   = x W_q [B,T,N,H], x W_k [B,T,K,H]             down-projections into the latent space
    qk     = grouped_conv(depthwise_conv([q; k]))         two causal convolutions over time, over a
                                                          single left pad of (t0 - 1) + (t1 - 1) zeros
    q_res  = (q + k_{n // (N/K)}) / 2                     the q-k mean residual, per query head
    k_res  = mean of q_res over the query heads of each kv head
    q, k   = qk_q + q_res, qk_k + k_res
    v      = [x_t W_cur ; x_{t-1} W_del] viewed as [B,T,K,H]   the value shift (x_{-1} = 0)
    q, k   = sqrt(H) q / |q|, sqrt(H) k / |k| * temp_k    L2 QK-norm, learned temperature per kv head
    q, k   = rope(q), rope(k)                              (partial) RoPE after the norm
    y      = softmax(q k^T / sqrt(H)) v W_o                attention in the latent space, up-projection

Every width in the attention itself is N*H or K*H, not D: with N*H = D/2 the score and value FLOPs halve,
and the cache holds K*H keys and K*H values per token. A token sees earlier tokens of its own segment
only: tokens of other segments (padding, segment id 0, included) enter the convolutions and the value
shift as zeros, exactly as at the start of a sequence, so padded or packed rows give each real token the
numbers of its own unpadded sequence.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from layers import kv_cache, params
from layers.attention import IMPLS, cached_attention, dot_product_attention
from layers.context import LayerContext
from layers.partitioning import UNPARTITIONED, Partitioning
from layers.rope import RopeSpec, apply_rope


def shift_right(x: jax.Array, lag: int, visible_BT: jax.Array) -> jax.Array:
    """x [B, T, ...] moved `lag` steps later in time: x_{t - lag} at t, zero where `visible` is False."""
    if lag:
        x = jnp.pad(x, [(0, 0), (lag, 0)] + [(0, 0)] * (x.ndim - 2))[:, :-lag]
    return x * visible_BT.reshape(visible_BT.shape + (1,) * (x.ndim - 2)).astype(x.dtype)


def lag_visibility(segment_ids_BT: jax.Array | None, shape: tuple[int, int], max_lag: int) -> list[jax.Array]:
    """Per lag 0..max_lag, boolean [B, T]: token t - lag exists and lies in t's segment."""
    B, T = shape
    t_T = jnp.arange(T)
    visible = []
    for lag in range(max_lag + 1):
        vis_BT = jnp.broadcast_to(t_T >= lag, (B, T))
        if segment_ids_BT is not None:
            earlier_BT = jnp.pad(segment_ids_BT, [(0, 0), (lag, 0)])[:, :T]
            vis_BT = vis_BT & (earlier_BT == segment_ids_BT)
        visible.append(vis_BT)
    return visible


def l2_normalize(x: jax.Array, scale: float) -> jax.Array:
    """`scale * x / max(|x|, eps)` over the last axis, in float32 (eps: the input dtype's epsilon)."""
    x32 = x.astype(jnp.float32)
    eps = float(jnp.finfo(x.dtype).eps)
    return x32 * (scale * jax.lax.rsqrt(jnp.maximum(jnp.sum(x32 * x32, axis=-1, keepdims=True), eps * eps)))


class CCA(nnx.Module):
    """Compressed convolutional grouped-query self-attention; `kernel_sizes` = (t0, t1) are the widths
    of the depthwise and the grouped convolution over time."""

    def __init__(self, d_model: int, num_heads: int, num_kv_heads: int, head_dim: int, *, rope: RopeSpec,
                 window: int = 0, kernel_sizes: tuple[int, int] = (2, 2), impl: str = "xla", layer: int = 0,
                 rngs: nnx.Rngs):
        if num_heads % num_kv_heads:
            raise ValueError(f"num_heads={num_heads} is not divisible by num_kv_heads={num_kv_heads}")
        if (num_kv_heads * head_dim) % 2:
            raise ValueError(f"the value shift splits num_kv_heads * head_dim = {num_kv_heads * head_dim} "
                             "channels in halves; it must be even")
        if min(kernel_sizes) < 1:
            raise ValueError(f"convolution kernel sizes must be >= 1, got {tuple(kernel_sizes)}")
        if impl not in IMPLS:
            raise ValueError(f"unknown attention_impl {impl!r}; expected one of {IMPLS}")
        D, N, K, H = d_model, num_heads, num_kv_heads, head_dim
        G, V = N + K, K * H // 2
        t0, t1 = kernel_sizes
        self.num_heads, self.num_kv_heads, self.head_dim = N, K, H
        self.kernel_sizes = (t0, t1)
        self.rope, self.window, self.impl, self.layer = rope, window, impl, layer
        self.q_proj = params.normal(rngs, (D, N, H), ("embed", "q_heads", "head_dim"))
        self.k_proj = params.normal(rngs, (D, K, H), ("embed", "kv_heads", "head_dim"))
        # The value halves are flat K*H/2 channels, head-major like the kv heads they are viewed as.
        self.v_current = params.normal(rngs, (D, V), ("embed", "kv_heads"))
        self.v_delayed = params.normal(rngs, (D, V), ("embed", "kv_heads"))
        # Depthwise: one t0-tap filter per channel; grouped: a full H x H map per head and tap.
        self.conv_depthwise = params.normal(rngs, (t0, G, H), (None, "qk_heads", "head_dim"), std=t0 ** -0.5)
        self.conv_depthwise_bias = params.zeros((G, H), ("qk_heads", "head_dim"))
        self.conv_grouped = params.normal(rngs, (t1, G, H, H), (None, "qk_heads", "head_dim", None),
                                          std=(t1 * H) ** -0.5)
        self.conv_grouped_bias = params.zeros((G, H), ("qk_heads", "head_dim"))
        # Starts at 1 (unit-scale logits); transformers initialises it at 0.
        self.temp = params.ones((K,), ("kv_heads",))
        self.o_proj = params.normal(rngs, (N, H, D), ("q_heads", "head_dim", "embed"), fan_in_dims=2)

    def _conv(self, qk_BTGH: jax.Array, visible: list[jax.Array]) -> jax.Array:
        """grouped(depthwise(qk)) over one left pad: the grouped tap at lag i reads the depthwise output
        at t - i, which is built from inputs at lags i .. i + t0 - 1 as seen from t (so segment
        boundaries are judged from t). The depthwise bias enters every tap, also those over the pad."""
        t0, t1 = self.kernel_sizes
        w_dw, b_dw = self.conv_depthwise[...], self.conv_depthwise_bias[...]
        w_gr = self.conv_grouped[...]
        shifted = [shift_right(qk_BTGH, lag, visible[lag]) for lag in range(t0 + t1 - 1)]
        out_BTGH = self.conv_grouped_bias[...]
        for i in range(t1):                          # grouped tap t1-1-i reads lag i
            dw_BTGH = b_dw + sum(w_dw[t0 - 1 - j] * shifted[i + j] for j in range(t0))
            out_BTGH = out_BTGH + jnp.einsum("BTGI,GIO->BTGO", dw_BTGH, w_gr[t1 - 1 - i])
        return out_BTGH

    def qkv(self, x_BTD: jax.Array, positions_BT: jax.Array, segment_ids_BT: jax.Array | None = None,
            history: dict | None = None) -> tuple[jax.Array, jax.Array, jax.Array, dict | None]:
        """The attention inputs: q [B, T, N, H] and k [B, T, K, H] after the convolutions, the norm and
        RoPE, and v [B, T, K, H]; and the history the next chunk needs. `history` (decoding) holds the
        last t0 + t1 - 2 convolution inputs `qk_BMGH` and the last delayed value `v_delayed_B1V` of the
        tokens before this chunk (zeros before the first token: the convolutions' own left pad), plus
        `new_B`, the count of real tokens in each row of the chunk."""
        B, T, _ = x_BTD.shape
        N, K, H = self.num_heads, self.num_kv_heads, self.head_dim

        q_BTNH = jnp.einsum("BTD,DNH->BTNH", x_BTD, self.q_proj[...])
        k_BTKH = jnp.einsum("BTD,DKH->BTKH", x_BTD, self.k_proj[...])
        qk_BTGH = jnp.concatenate([q_BTNH, k_BTKH], axis=2)
        v_del_BTV = jnp.einsum("BTD,DV->BTV", x_BTD, self.v_delayed[...])
        if history is None:
            visible = lag_visibility(segment_ids_BT, (B, T), max(1, sum(self.kernel_sizes) - 2))
            conv_BTGH = self._conv(qk_BTGH, visible)
            v_del_BTV = shift_right(v_del_BTV, 1, visible[1])
            new_history = None
        else:   # the chunk behind its history: the history's rows stand where the zero pad stood
            M = history["qk_BMGH"].shape[1]
            qk_BXGH = jnp.concatenate([history["qk_BMGH"].astype(qk_BTGH.dtype), qk_BTGH], axis=1)
            visible = lag_visibility(None, (B, M + T), max(1, M))
            conv_BTGH = self._conv(qk_BXGH, visible)[:, M:]
            v_del_BXV = jnp.concatenate([history["v_delayed_B1V"].astype(v_del_BTV.dtype), v_del_BTV], axis=1)
            new_B = history["new_B"]
            new_history = {"qk_BMGH": kv_cache.take_rows(qk_BXGH, new_B, M),
                           "v_delayed_B1V": kv_cache.take_rows(v_del_BXV, new_B, 1)}
            v_del_BTV = v_del_BXV[:, :T]
        q_res_BTKGH = (q_BTNH.reshape(B, T, K, N // K, H) + k_BTKH[:, :, :, None, :]) / 2
        q_BTNH = conv_BTGH[:, :, :N] + q_res_BTKGH.reshape(B, T, N, H)
        k_BTKH = conv_BTGH[:, :, N:] + q_res_BTKGH.mean(axis=3)

        v_cur_BTV = jnp.einsum("BTD,DV->BTV", x_BTD, self.v_current[...])
        v_BTKH = jnp.concatenate([v_cur_BTV, v_del_BTV], axis=-1).reshape(B, T, K, H)

        dtype = x_BTD.dtype
        q_BTNH = l2_normalize(q_BTNH, H ** 0.5).astype(dtype)
        k_BTKH = (l2_normalize(k_BTKH, H ** 0.5) * self.temp[...].astype(jnp.float32)[:, None]).astype(dtype)
        q_BTNH = apply_rope(q_BTNH, positions_BT, self.rope)
        k_BTKH = apply_rope(k_BTKH, positions_BT, self.rope)
        return q_BTNH, k_BTKH, v_BTKH, new_history

    def cache_spec(self, batch: int, max_len: int, dtype) -> dict:
        """Keys and values in the latent space (every position, or a ring of the window), the last
        t0 + t1 - 2 convolution inputs and the last delayed value half (the q-k mean needs no history)."""
        N, K, H = self.num_heads, self.num_kv_heads, self.head_dim
        kv = jax.ShapeDtypeStruct((batch, self.window or max_len, K, H), dtype)
        return {"k_BSKH": kv, "v_BSKH": kv,
                "qk_BMGH": jax.ShapeDtypeStruct((batch, max(1, sum(self.kernel_sizes) - 2), N + K, H), dtype),
                "v_delayed_B1V": jax.ShapeDtypeStruct((batch, 1, K * H // 2), dtype)}

    def mix(self, x_BTD: jax.Array, ctx: LayerContext) -> jax.Array:
        """The layer as a token mixer of a decoder stack; with `ctx.caches`, the next chunk against its cache."""
        if ctx.caches is None:
            return self(x_BTD, ctx.positions_BT, segment_ids_BT=ctx.segment_ids_BT,
                        default_positions=ctx.default_positions, partitioning=ctx.partitioning)[0]
        cache, lengths_B, new_B = ctx.caches[self.layer], ctx.cache_lengths_B, ctx.new_tokens_B
        q_BTNH, k_BTKH, v_BTKH, history = self.qkv(
            x_BTD, ctx.positions_BT, history={"qk_BMGH": cache["qk_BMGH"], "v_delayed_B1V": cache["v_delayed_B1V"],
                                              "new_B": new_B})
        seen, kv_positions_BS, kv = kv_cache.extend(
            {"k_BSKH": cache["k_BSKH"], "v_BSKH": cache["v_BSKH"]}, {"k_BSKH": k_BTKH, "v_BSKH": v_BTKH},
            lengths_B, new_B, window=self.window)
        ctx.caches[self.layer] = {**kv, **history}
        out_BTNH = cached_attention(q_BTNH, seen["k_BSKH"], seen["v_BSKH"], ctx.positions_BT, kv_positions_BS, None,
                                    chunk_kv=(k_BTKH, v_BTKH), lengths_B=lengths_B, window=self.window,
                                    scale=self.head_dim ** -0.5, impl=self.impl, partitioning=ctx.partitioning)
        if out_BTNH is None:
            out_BTNH = self._attend(q_BTNH, seen["k_BSKH"], seen["v_BSKH"], ctx.positions_BT, kv_positions_BS,
                                    None, False, ctx.partitioning)
        return jnp.einsum("BTNH,NHD->BTD", out_BTNH, self.o_proj[...])

    def __call__(self, x_BTD: jax.Array, positions_BT: jax.Array, *, segment_ids_BT: jax.Array | None = None,
                 default_positions: bool = False, partitioning: Partitioning = UNPARTITIONED
                 ) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
        """Returns the output [B, T, D] and this layer's (k [B, T, K, H], v [B, T, K, H])."""
        q_BTNH, k_BTKH, v_BTKH, _ = self.qkv(x_BTD, positions_BT, segment_ids_BT)
        out_BTNH = self._attend(q_BTNH, k_BTKH, v_BTKH, positions_BT, positions_BT, segment_ids_BT,
                                default_positions, partitioning)
        return jnp.einsum("BTNH,NHD->BTD", out_BTNH, self.o_proj[...]), (k_BTKH, v_BTKH)

    def _attend(self, q_BTNH, k_BSKH, v_BSKH, positions_BT, kv_positions_BS, segment_ids_BT,
                default_positions, partitioning) -> jax.Array:
        """Attention [B, T, N, H] in the latent space (pure JAX or the fused forward kernels, by `impl`)."""
        return dot_product_attention(
            q_BTNH, k_BSKH, v_BSKH, q_positions_BT=positions_BT, kv_positions_BS=kv_positions_BS,
            window=self.window, q_segment_ids_BT=segment_ids_BT, kv_segment_ids_BS=segment_ids_BT,
            scale=self.head_dim ** -0.5, impl=self.impl, default_positions=default_positions,
            partitioning=partitioning)
