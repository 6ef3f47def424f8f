"""Grouped-query attention: the masks, the reference softmax attention, and the attention layer.

Shapes: B batch, T query tokens, S key tokens, N query heads, K kv heads, G = N // K query heads per kv
head, H head dim, D model width.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as masks

from layers import kv_cache, params
from layers.context import LayerContext
from layers.norms import RMSNorm
from layers.partitioning import UNPARTITIONED, Partitioning
from layers.rope import RopeSpec, apply_rope
from pallas_kernels import (decode_attention, flash_attention, gpu_compute_capability, hopper_kernel_runs_both_ways,
                            msa_attention)

IMPLS = ("xla", "pallas", "auto")
OUTPUT_GATES = ("none", "per_head", "per_element")
_MASKED = -1e30
# Cached chunks of at most this many tokens per row (decode steps, speculative verification) attend through
# the decode kernel (pallas_kernels.decode_attention) where `pallas_only_lowering` names one; longer ones
# (prefill) through the prefill kernels (`cached_attention`).
DECODE_MAX_TOKENS = 16


def attention_mask(q_positions_BT: jax.Array, kv_positions_BS: jax.Array, *, window: int = 0,
                   q_segment_ids_BT: jax.Array | None = None, kv_segment_ids_BS: jax.Array | None = None
                   ) -> jax.Array:
    """Boolean [B, T, S]: key s is visible to query t iff it is not in the future, lies within the last
    `window` positions (0 = unlimited) and belongs to the same segment (segment id 0 marks padding)."""
    q_pos, kv_pos = q_positions_BT[:, :, None], kv_positions_BS[:, None, :]
    visible = kv_pos <= q_pos
    if window:
        visible &= q_pos - kv_pos < window
    if q_segment_ids_BT is not None:
        q_seg, kv_seg = q_segment_ids_BT[:, :, None], kv_segment_ids_BS[:, None, :]
        visible &= (q_seg == kv_seg) & (kv_seg != 0)
    return visible


def reference_attention(q_BTNH: jax.Array, k_BSKH: jax.Array, v_BSKH: jax.Array, mask_BTS: jax.Array, *,
                        scale: float, sinks_N: jax.Array | None = None, softcap: float | None = None
                        ) -> jax.Array:
    """softmax(scale * q.k [+ sink column]) v with the logits and the softmax in float32."""
    B, T, N, H = q_BTNH.shape
    K = k_BSKH.shape[2]
    if N % K:
        raise ValueError(f"{N} query heads are not a multiple of {K} kv heads")
    q_BTKGH = q_BTNH.reshape(B, T, K, N // K, H)
    logits_BKGTS = jnp.einsum("BTKGH,BSKH->BKGTS", q_BTKGH, k_BSKH,
                              preferred_element_type=jnp.float32) * scale
    if softcap:
        logits_BKGTS = softcap * jnp.tanh(logits_BKGTS / softcap)
    logits_BKGTS = jnp.where(mask_BTS[:, None, None], logits_BKGTS, _MASKED)
    if sinks_N is not None:
        sink_BKGT1 = jnp.broadcast_to(sinks_N.astype(jnp.float32).reshape(1, K, N // K, 1, 1),
                                      (*logits_BKGTS.shape[:-1], 1))
        probs = jax.nn.softmax(jnp.concatenate([logits_BKGTS, sink_BKGT1], axis=-1), axis=-1)[..., :-1]
    else:
        probs = jax.nn.softmax(logits_BKGTS, axis=-1)
    out_BTKGH = jnp.einsum("BKGTS,BSKH->BTKGH", probs.astype(v_BSKH.dtype), v_BSKH)
    return out_BTKGH.reshape(B, T, N, v_BSKH.shape[-1])


def cudnn_max_head_dim() -> int:
    """The widest head cuDNN's fused attention takes on this machine's first GPU: 256 from Hopper
    (compute capability 9.0) on, 128 before it, 0 without a GPU."""
    if jax.default_backend() != "gpu":
        return 0
    return 256 if gpu_compute_capability() >= 9 else 128


# cuDNN's head-dim-256 kernels (Hopper) pay off on large calls only: below this many tokens per call our
# kernel is faster forward+backward on the H100 (docs/benchmarks.md, "head_dim 256").
CUDNN_WIDE_HEAD_MIN_TOKENS = 16384


def _cudnn_fits(q_BTNH, k_BSKH, sinks_N, softcap, default_positions: bool) -> bool:
    B, T, _, H = q_BTNH.shape
    return (jax.default_backend() == "gpu" and default_positions and sinks_N is None and not softcap
            and q_BTNH.dtype in (jnp.bfloat16, jnp.float16) and H <= cudnn_max_head_dim() and H % 8 == 0
            and (H <= 128 or B * T >= CUDNN_WIDE_HEAD_MIN_TOKENS)
            and T == k_BSKH.shape[1])


# Sliding-window layers on a Hopper GPU where our Mosaic GPU kernel runs forward and backward (head dim
# 64/128/256): faster than cuDNN forward+backward there, 4K to 64K tokens; on full-causal layers the two are
# even and cuDNN keeps them (docs/benchmarks.md, "Own flash kernel on Hopper").
def _own_hopper_kernel_beats_cudnn(q_BTNH, k_BSKH, sinks_N, softcap, segment_ids_BT, default_positions: bool,
                                   window: int) -> bool:
    return (0 < window < q_BTNH.shape[1] and _own_kernel_fits(q_BTNH, k_BSKH, softcap, default_positions)
            and hopper_kernel_runs_both_ways(q_BTNH, sinks=sinks_N is not None, segmented=segment_ids_BT is not None))


def _splash_fits(q_BTNH, k_BSKH, sinks_N, softcap, segment_ids_BT, default_positions: bool) -> bool:
    T, H = q_BTNH.shape[1], q_BTNH.shape[3]
    return (jax.default_backend() == "tpu" and default_positions and sinks_N is None and not softcap
            and segment_ids_BT is None and T == k_BSKH.shape[1] and T % 128 == 0 and H % 128 == 0)


# Full causal attention at head_dim 512 on an H100 (docs/benchmarks.md): our kernel's forward is faster
# than XLA's, XLA's forward+backward faster than ours wherever its float32 logits fit this budget; past it,
# only the kernel runs.
XLA_WIDE_HEAD_LOGITS_BYTES = 8 << 30


def _xla_beats_own_kernel(q_BTNH, k_BSKH, window: int) -> bool:
    B, T, N, H = q_BTNH.shape
    return H > 256 and not window and B * N * T * k_BSKH.shape[1] * 4 <= XLA_WIDE_HEAD_LOGITS_BYTES


def _own_kernel_fits(q_BTNH, k_BSKH, softcap, default_positions: bool) -> bool:
    return (default_positions and not softcap and q_BTNH.shape[1] == k_BSKH.shape[1]
            and q_BTNH.shape[-1] <= 512 and q_BTNH.dtype in (jnp.float32, jnp.bfloat16))


def attention_backend(impl: str, q_BTNH, k_BSKH, *, sinks_N=None, softcap: float | None = None,
                      segment_ids_BT=None, default_positions: bool = False, window: int = 0) -> str:
    """The one choice table: which code runs `dot_product_attention`.

    Returns "reference" (pure JAX), "cudnn" (jax.nn.dot_product_attention), "splash" (JAX's TPU splash
    attention), "flash" (our Pallas kernel, pallas_kernels.flash_attention) or "flash_xla_vjp" (our kernel
    for the value, the reference's forward and backward where it is differentiated).

      impl     | GPU                      | TPU                       | CPU
      ---------+--------------------------+---------------------------+-------------------------
      xla      | reference                | reference                 | reference
      pallas   | flash                    | flash                     | flash (interpret mode)
      auto     | flash for sliding-window | splash if it fits,        | reference
               | layers our Hopper kernel | else flash, else ref.     |
               | runs both ways, else     |                           |
               | cudnn if it fits,        |                           |
               | else flash_xla_vjp (or   |                           |
               | ref. with sinks or seg.) |                           |
               | if head_dim > 256, full  |                           |
               | causal and the logits    |                           |
               | fit 8 GiB, else flash,   |                           |
               | else ref.                |                           |

    "pallas" raises on an attention softcap (the kernel has none) and falls back to the reference where
    the kernel does not apply: positions other than 0..T-1 in every row (e.g. decoding against a cache:
    there `Attention` sends chunks of at most DECODE_MAX_TOKENS tokens to the decode kernel instead), or
    keys that are not the queries' own tokens. cuDNN fits causal self-attention over default positions
    in bf16/fp16, head_dim <= `cudnn_max_head_dim()` (a multiple of 8; above 128 only for calls of at least
    CUDNN_WIDE_HEAD_MIN_TOKENS tokens), no sinks, softcap or segments; splash fits default
    positions, T and head_dim multiples of 128, no sinks, softcap or segments.
    """
    if impl not in IMPLS:
        raise ValueError(f"unknown attention_impl {impl!r}; expected one of {IMPLS}")
    if impl == "xla":
        return "reference"
    if impl == "pallas":
        if softcap:
            raise ValueError("attention_impl='pallas': the flash attention kernel has no attention-logit "
                             "softcap; use attention_impl='xla' for a layer with attn softcap")
        return "flash" if _own_kernel_fits(q_BTNH, k_BSKH, softcap, default_positions) else "reference"
    backend = jax.default_backend()
    if backend == "gpu":
        if _own_hopper_kernel_beats_cudnn(q_BTNH, k_BSKH, sinks_N, softcap, segment_ids_BT, default_positions, window):
            return "flash"
        if segment_ids_BT is None and _cudnn_fits(q_BTNH, k_BSKH, sinks_N, softcap, default_positions):
            return "cudnn"
        if _xla_beats_own_kernel(q_BTNH, k_BSKH, window):
            plain = sinks_N is None and segment_ids_BT is None
            return "flash_xla_vjp" if plain and _own_kernel_fits(q_BTNH, k_BSKH, softcap, default_positions) \
                else "reference"
    elif backend == "tpu":
        if _splash_fits(q_BTNH, k_BSKH, sinks_N, softcap, segment_ids_BT, default_positions):
            return "splash"
    else:
        return "reference"
    return "flash" if _own_kernel_fits(q_BTNH, k_BSKH, softcap, default_positions) else "reference"


def splash_attention(q_BTNH, k_BTKH, v_BTKH, *, window: int, scale: float, interpret: Any = False
                     ) -> jax.Array:
    """Causal (optionally windowed) GQA through JAX's TPU splash attention (T a multiple of 128).

    Batch is folded into the heads (query head b * N + n reads kv head b * K + n // G, splash's own GQA
    mapping), so one kernel call serves everything with no vmap around it (the TPU interpreter cannot
    run a vmapped splash kernel). Splash has no logit scale: q is scaled first, in float32.
    `interpret`: False on TPU; True or `pltpu.InterpretParams()` to run it on CPU.
    """
    B, T, N, H = q_BTNH.shape
    one = (masks.LocalMask((T, T), window_size=(window - 1, 0), offset=0) if window
           else masks.CausalMask((T, T)))
    b = next(b for b in (512, 256, 128) if T % b == 0)   # must divide T
    blocks = splash.BlockSizes(block_q=b, block_kv=b, block_kv_compute=b, block_q_dkv=b, block_kv_dkv=b,
                               block_kv_dkv_compute=b, block_q_dq=b, block_kv_dq=b)
    kernel = splash.make_splash_mha_single_device(masks.MultiHeadMask([one] * (B * N)), block_sizes=blocks,
                                                  interpret=interpret)
    heads = lambda x_BTMH: x_BTMH.transpose(0, 2, 1, 3).reshape(-1, T, H)   # [B * M, T, H], batch major
    q_scaled_BTNH = (q_BTNH.astype(jnp.float32) * scale).astype(q_BTNH.dtype)
    out_bTH = kernel(heads(q_scaled_BTNH), heads(k_BTKH), heads(v_BTKH))
    return out_bTH.reshape(B, N, T, H).transpose(0, 2, 1, 3)


def kernel_lowering(impl: str) -> str | None:
    """The Pallas lowering our own kernels run with for `impl` on this platform, or None where the pure-JAX
    references run: `pallas` always (interpret mode on CPU), `auto` on GPU and TPU."""
    if impl not in IMPLS:
        raise ValueError(f"unknown attention_impl {impl!r}; expected one of {IMPLS}")
    backend = jax.default_backend()
    if impl == "xla" or (impl == "auto" and backend == "cpu"):
        return None
    return "pallas_tpu" if backend == "tpu" else "pallas_gpu"


def pallas_only_lowering(impl: str) -> str | None:
    """The lowering of kernels that run only when asked for by name (`pallas`; interpret mode on CPU): the
    kernels of cached chunks (decode steps, speculative verification, prefill) and of MSA
    layers. `auto` takes the pure-JAX path there until they have been checked and timed on a GPU
    (docs/benchmarks.md)."""
    return kernel_lowering(impl) if impl == "pallas" else None


def dot_product_attention(q_BTNH, k_BSKH, v_BSKH, *, q_positions_BT, kv_positions_BS, window: int = 0,
                          q_segment_ids_BT=None, kv_segment_ids_BS=None, scale: float,
                          sinks_N=None, softcap: float | None = None, impl: str = "xla",
                          default_positions: bool = False, partitioning: Partitioning = UNPARTITIONED
                          ) -> jax.Array:
    """Causal (optionally windowed) attention through the code `attention_backend` picks for `impl`.

    `default_positions=True` promises q and kv positions are 0..T-1 in every row (the fused kernels need
    it). Segment ids: the fused kernels take the query's; keys must be the same tokens.
    """
    backend = attention_backend(impl, q_BTNH, k_BSKH, sinks_N=sinks_N, softcap=softcap,
                                segment_ids_BT=q_segment_ids_BT, default_positions=default_positions,
                                window=window)
    if backend != "reference":
        return _fused_attention(backend, q_BTNH, k_BSKH, v_BSKH, sinks_N, q_segment_ids_BT, window=window,
                                scale=scale, partitioning=partitioning)
    mask_BTS = attention_mask(q_positions_BT, kv_positions_BS, window=window,
                              q_segment_ids_BT=q_segment_ids_BT, kv_segment_ids_BS=kv_segment_ids_BS)
    return reference_attention(q_BTNH, k_BSKH, v_BSKH, mask_BTS, scale=scale, sinks_N=sinks_N,
                               softcap=softcap)


def _flash_value_xla_gradient(q_BTNH, k_BTKH, v_BTKH, *, scale: float) -> jax.Array:
    """Full causal attention: our kernel computes the value; differentiated, the reference computes it and
    its gradient instead (faster than the kernel's backward where its logits fit, see above)."""
    T = q_BTNH.shape[1]

    def reference(q_BTNH, k_BTKH, v_BTKH):
        positions_1T = jnp.arange(T)[None]
        mask_1TT = attention_mask(positions_1T, positions_1T)
        return reference_attention(q_BTNH, k_BTKH, v_BTKH, mask_1TT, scale=scale)

    @jax.custom_vjp
    def attend(q_BTNH, k_BTKH, v_BTKH):
        return flash_attention(q_BTNH, k_BTKH, v_BTKH, scale=scale, impl="pallas_gpu")

    def forward(q_BTNH, k_BTKH, v_BTKH):
        return jax.vjp(reference, q_BTNH, k_BTKH, v_BTKH)   # the value, and the reference's backward

    attend.defvjp(forward, lambda reference_vjp, d_out_BTNH: reference_vjp(d_out_BTNH))
    return attend(q_BTNH, k_BTKH, v_BTKH)


def _fused_attention(backend: str, q_BTNH, k_BTKH, v_BTKH, sinks_N, segment_ids_BT, *, window: int,
                     scale: float, partitioning: Partitioning = UNPARTITIONED) -> jax.Array:
    """Self-attention through a fused kernel ("cudnn", "splash", "flash", "flash_xla_vjp"), called shard
    by shard (`partitioning.per_shard`): batch rows and kv-head groups are independent, so a query head
    travels with its kv head (q seen as [B, T, K, G, H]) wherever the mesh splits the kv heads."""
    B, T, N, H = q_BTNH.shape
    K = k_BTKH.shape[2]

    def kernel(q_BTKGH, k_BTKH, v_BTKH, sinks_KG, segment_ids_BT):
        b, t, k, g, h = q_BTKGH.shape
        q_BTNH = q_BTKGH.reshape(b, t, k * g, h)
        sinks_N = None if sinks_KG is None else sinks_KG.reshape(k * g)
        if backend == "cudnn":
            out_BTNH = jax.nn.dot_product_attention(
                q_BTNH, k_BTKH, v_BTKH, scale=scale, is_causal=True, implementation="cudnn",
                local_window_size=(window - 1, 0) if window else None)
        elif backend == "splash":
            out_BTNH = splash_attention(q_BTNH, k_BTKH, v_BTKH, window=window, scale=scale)
        elif backend == "flash_xla_vjp":
            out_BTNH = _flash_value_xla_gradient(q_BTNH, k_BTKH, v_BTKH, scale=scale)
        else:
            out_BTNH = flash_attention(q_BTNH, k_BTKH, v_BTKH, window=window, sinks_N=sinks_N,
                                       segment_ids_BT=segment_ids_BT, scale=scale,
                                       impl=kernel_lowering("pallas"))
        return out_BTNH.reshape(b, t, k, g, -1)

    q_axes, kv_axes = ("batch", None, "kv_heads", None, None), ("batch", None, "kv_heads", None)
    in_axes = (q_axes, kv_axes, kv_axes, None if sinks_N is None else ("kv_heads", None),
               None if segment_ids_BT is None else ("batch", None))
    out_BTKGH = partitioning.per_shard(kernel, in_axes, q_axes)(
        q_BTNH.reshape(B, T, K, N // K, H), k_BTKH, v_BTKH,
        None if sinks_N is None else sinks_N.reshape(K, N // K), segment_ids_BT)
    return out_BTKGH.reshape(B, T, N, -1)


def _decode_attention(q_BTNH, k_BSKH, v_BSKH, sinks_N, q_positions_BT, kv_positions_BS, *, window: int,
                      scale: float, impl: str, partitioning: Partitioning = UNPARTITIONED) -> jax.Array:
    """A few new tokens against the keys/values a cache holds, through the decode kernel, shard by shard
    (batch rows and kv-head groups are independent, as in `_fused_attention`)."""
    B, T, N, H = q_BTNH.shape
    K = k_BSKH.shape[2]

    def kernel(q_BTKGH, k_BSKH, v_BSKH, sinks_KG, q_positions_BT, kv_positions_BS):
        b, t, k, g, h = q_BTKGH.shape
        out_BTNH = decode_attention(
            q_BTKGH.reshape(b, t, k * g, h).astype(k_BSKH.dtype), k_BSKH, v_BSKH.astype(k_BSKH.dtype),
            q_positions_BT, kv_positions_BS, window=window, scale=scale,
            sinks_N=None if sinks_KG is None else sinks_KG.reshape(k * g), impl=impl)
        return out_BTNH.reshape(b, t, k, g, -1)

    q_axes, kv_axes, rows = ("batch", None, "kv_heads", None, None), ("batch", None, "kv_heads", None), ("batch", None)
    in_axes = (q_axes, kv_axes, kv_axes, None if sinks_N is None else ("kv_heads", None), rows, rows)
    out_BTKGH = partitioning.per_shard(kernel, in_axes, q_axes)(
        q_BTNH.reshape(B, T, K, N // K, H), k_BSKH, v_BSKH, None if sinks_N is None else sinks_N.reshape(K, N // K),
        q_positions_BT.astype(jnp.int32), kv_positions_BS.astype(jnp.int32))
    return out_BTKGH.reshape(B, T, N, -1).astype(q_BTNH.dtype)


def _prefill_attention(q_BTNH, k_BTKH, v_BTKH, cached_k_BSKH, cached_v_BSKH, lengths_B, sinks_N, *, scale: float,
                       impl: str, partitioning: Partitioning = UNPARTITIONED) -> jax.Array:
    """A chunk of new tokens of a full-attention layer over [the cache's first lengths_B slots, all visible;
    the chunk itself, causal], through the fused kernel of `pallas_kernels.msa_attention` (whose memory is
    the cache here): prefill reads the cache once per key block, never a [T, S] mask or logits."""
    B, T, N, H = q_BTNH.shape
    K = k_BTKH.shape[2]
    dtype = cached_k_BSKH.dtype

    def kernel(q_BTKGH, k_BTKH, v_BTKH, cached_k_BSKH, cached_v_BSKH, lengths_B, sinks_KG):
        b, t, k, g, h = q_BTKGH.shape
        out_BTNH = msa_attention(
            q_BTKGH.reshape(b, t, k * g, h).astype(dtype), k_BTKH.astype(dtype), v_BTKH.astype(dtype),
            cached_k_BSKH, cached_v_BSKH.astype(dtype), lengths_B,
            sinks_N=None if sinks_KG is None else sinks_KG.reshape(k * g), scale=scale, impl=impl)
        return out_BTNH.reshape(b, t, k, g, -1)

    q_axes, kv_axes = ("batch", None, "kv_heads", None, None), ("batch", None, "kv_heads", None)
    in_axes = (q_axes, kv_axes, kv_axes, kv_axes, kv_axes, ("batch",), None if sinks_N is None else ("kv_heads", None))
    out_BTKGH = partitioning.per_shard(kernel, in_axes, q_axes)(
        q_BTNH.reshape(B, T, K, N // K, H), k_BTKH, v_BTKH, cached_k_BSKH, cached_v_BSKH,
        lengths_B.astype(jnp.int32), None if sinks_N is None else sinks_N.reshape(K, N // K))
    return out_BTKGH.reshape(B, T, N, -1).astype(q_BTNH.dtype)


def _window_prefill_attention(q_BTNH, k_BSKH, v_BSKH, kv_positions_BS, sinks_N, *, window: int, scale: float,
                              partitioning: Partitioning = UNPARTITIONED) -> jax.Array:
    """A chunk of T new tokens of a sliding-window layer over [its ring; the chunk] through the fused flash
    kernel: the ring as the start of one causal sequence (`kv_cache.ring_as_sequence`), whose own query
    rows (zeros) are computed and dropped."""
    B, T, N, H = q_BTNH.shape
    (k_BSKH, v_BSKH), segment_ids_BS = kv_cache.ring_as_sequence([k_BSKH, v_BSKH], kv_positions_BS, T)
    W = k_BSKH.shape[1] - T
    q_BSNH = jnp.concatenate([jnp.zeros((B, W, N, H), q_BTNH.dtype), q_BTNH], axis=1)
    out_BSNH = _fused_attention("flash", q_BSNH, k_BSKH.astype(q_BTNH.dtype), v_BSKH.astype(q_BTNH.dtype), sinks_N,
                                segment_ids_BS, window=window, scale=scale, partitioning=partitioning)
    return out_BSNH[:, W:]


def cached_attention(q_BTNH, seen_k_BSKH, seen_v_BSKH, q_positions_BT, kv_positions_BS, sinks_N, *,
                     chunk_kv=None, lengths_B=None, window: int, scale: float, impl: str,
                     partitioning: Partitioning = UNPARTITIONED) -> jax.Array | None:
    """A cached chunk's attention over what it sees (`kv_cache.extend`: a full cache written with the
    chunk, or [a ring; the chunk]) through a kernel, where `pallas_only_lowering(impl)` names one:
    chunks of at most DECODE_MAX_TOKENS tokens through the decode kernel; longer ones of a full cache
    through `_prefill_attention` (needs the chunk's own `chunk_kv` = (k, v) and the cache `lengths_B`
    before it), of a ring of `window` slots through `_window_prefill_attention`. None where no kernel
    takes the chunk: the caller attends in pure JAX."""
    lowering = pallas_only_lowering(impl)
    T = q_BTNH.shape[1]
    if lowering is None:
        return None
    if T <= DECODE_MAX_TOKENS:
        return _decode_attention(q_BTNH, seen_k_BSKH, seen_v_BSKH, sinks_N, q_positions_BT, kv_positions_BS,
                                 window=window, scale=scale, impl=lowering, partitioning=partitioning)
    if not window and chunk_kv is not None:   # the written cache's first lengths_B slots are the old tokens
        return _prefill_attention(q_BTNH, *chunk_kv, seen_k_BSKH, seen_v_BSKH, lengths_B, sinks_N, scale=scale,
                                  impl=lowering, partitioning=partitioning)
    if window and seen_k_BSKH.shape[1] == window + T:
        return _window_prefill_attention(q_BTNH, seen_k_BSKH, seen_v_BSKH, kv_positions_BS, sinks_N,
                                         window=window, scale=scale, partitioning=partitioning)
    return None


class Attention(nnx.Module):
    """GQA/MQA self-attention with optional q/k/v norms, RoPE, sliding window, cross-layer KV sharing,
    per-head sinks and output gating.

    `kv_source` >= 0 makes a layer without k/v projections: it attends over the keys and values layer
    `kv_source` computed (passed in as `shared_kv`, or read from the context by `mix`); `publish_kv` makes
    `mix` hand this layer's keys and values on to such readers under its index `layer`. `k_eq_v=True`
    drops the value projection: the values are the raw key projection (before the key norm and RoPE),
    then the value norm; its cache holds that raw projection once (`kv_BSKH`), normed and rotated on read.
    `sinks` adds a learned per-head logit that enters only the softmax denominator.
    `output_gate` multiplies the attention output, before the output projection, by softplus(x W_g)
    computed in float32 from the layer input x: one gate per head broadcast over the head dim
    (`per_head`, W_g [D, N]) or one per channel (`per_element`, W_g [D, N, H]).
    Each layer has its own query-head count; only N % K == 0 is required.
    """

    def __init__(self, d_model: int, num_heads: int, num_kv_heads: int, head_dim: int, *, rope: RopeSpec,
                 window: int = 0, qk_norm: bool = True, v_norm: bool = False, norm_eps: float = 1e-6,
                 scale: float | None = None, k_eq_v: bool = False, kv_source: int = -1, layer: int = 0,
                 publish_kv: bool = False, sinks: bool = False, output_gate: str = "none", impl: str = "xla",
                 rngs: nnx.Rngs):
        if num_heads % num_kv_heads:
            raise ValueError(f"num_heads={num_heads} is not divisible by num_kv_heads={num_kv_heads}")
        if impl not in IMPLS:
            raise ValueError(f"unknown attention_impl {impl!r}; expected one of {IMPLS}")
        if output_gate not in OUTPUT_GATES:
            raise ValueError(f"unknown output_gate {output_gate!r}; expected one of {OUTPUT_GATES}")
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.rope, self.window, self.impl = rope, window, impl
        self.scale = head_dim ** -0.5 if scale is None else scale
        self.kv_source, self.layer, self.publish_kv, self.k_eq_v = kv_source, layer, publish_kv, k_eq_v
        D, N, K, H = d_model, num_heads, num_kv_heads, head_dim
        self.q_proj = params.normal(rngs, (D, N, H), ("embed", "q_heads", "head_dim"))
        self.q_norm = RMSNorm(H, eps=norm_eps, axis_name="head_dim") if qk_norm else None
        self.o_proj = params.normal(rngs, (N, H, D), ("q_heads", "head_dim", "embed"), fan_in_dims=2)
        if output_gate == "per_head":
            self.g_proj = params.normal(rngs, (D, N), ("embed", "q_heads"))
        elif output_gate == "per_element":
            self.g_proj = params.normal(rngs, (D, N, H), ("embed", "q_heads", "head_dim"))
        else:
            self.g_proj = None
        self.sinks = params.zeros((N,), ("q_heads",)) if sinks else None
        if kv_source >= 0:
            self.k_proj = self.v_proj = self.k_norm = self.v_norm = None
            return
        self.k_proj = params.normal(rngs, (D, K, H), ("embed", "kv_heads", "head_dim"))
        self.v_proj = None if k_eq_v else params.normal(rngs, (D, K, H), ("embed", "kv_heads", "head_dim"))
        self.k_norm = RMSNorm(H, eps=norm_eps, axis_name="head_dim") if qk_norm else None
        self.v_norm = RMSNorm(H, eps=norm_eps, use_scale=False) if v_norm else None

    def mix(self, x_BTD: jax.Array, ctx: LayerContext) -> jax.Array:
        """The layer as a token mixer of a decoder stack: reads shared keys/values from the context and
        hands its own on when later layers reuse them; with `ctx.caches` it runs the tokens as the next
        chunk against its cache (a KV-shared layer against what its source attended over)."""
        shared_kv = ctx.kv_by_layer[self.kv_source] if self.kv_source >= 0 else None
        if ctx.caches is None:
            y_BTD, kv, _, _ = self._run(x_BTD, ctx.positions_BT, ctx.segment_ids_BT, shared_kv, None, None,
                                        ctx.default_positions, ctx.partitioning)
        else:
            kv_source_positions = ctx.kv_positions_by_layer.get(self.kv_source)
            cache = None if self.kv_source >= 0 else (ctx.caches[self.layer], ctx.cache_lengths_B, ctx.new_tokens_B)
            y_BTD, kv, kv_positions_BS, new_cache = self._run(
                x_BTD, ctx.positions_BT, None, shared_kv, kv_source_positions, cache, False, ctx.partitioning)
            if self.kv_source < 0:
                ctx.caches[self.layer] = new_cache
            if self.publish_kv:
                ctx.kv_positions_by_layer[self.layer] = kv_positions_BS
        if self.publish_kv:
            ctx.kv_by_layer[self.layer] = kv
        return y_BTD

    def __call__(self, x_BTD: jax.Array, positions_BT: jax.Array, *, segment_ids_BT: jax.Array | None = None,
                 shared_kv: tuple[jax.Array, jax.Array] | None = None, default_positions: bool = False,
                 partitioning: Partitioning = UNPARTITIONED) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
        """Returns the output [B, T, D] and this layer's (k [B, T, K, H], v [B, T, K, H])."""
        y_BTD, kv, _, _ = self._run(x_BTD, positions_BT, segment_ids_BT, shared_kv, None, None, default_positions,
                                    partitioning)
        return y_BTD, kv

    def _run(self, x_BTD, positions_BT, segment_ids_BT, shared_kv, shared_positions_BS, cache, default_positions,
             partitioning):
        """(output [B, T, D], the keys and values attended over, their positions [B, S], the updated
        cache). Without a cache the keys are the tokens' own and the positions None; with `cache` =
        (this layer's cache, lengths [B], real new tokens [B]) the chunk is appended to it first."""
        q_BTNH = jnp.einsum("BTD,DNH->BTNH", x_BTD, self.q_proj[...])
        if self.q_norm is not None:
            q_BTNH = self.q_norm(q_BTNH)
        q_BTNH = apply_rope(q_BTNH, positions_BT, self.rope)
        kv_positions_BS, new_cache, chunk_kv, lengths_B = shared_positions_BS, None, None, None
        if self.kv_source >= 0:
            if shared_kv is None:
                raise ValueError("a kv-shared attention layer needs the source layer's keys and values")
            k_BTKH, v_BTKH = shared_kv
        else:
            k_raw_BTKH = jnp.einsum("BTD,DKH->BTKH", x_BTD, self.k_proj[...])
            v_raw_BTKH = None if self.k_eq_v else jnp.einsum("BTD,DKH->BTKH", x_BTD, self.v_proj[...])
            if cache is None:
                k_BTKH, v_BTKH = self.keys_values(k_raw_BTKH, v_raw_BTKH, positions_BT)
            elif self.k_eq_v:   # one cached tensor: the raw projection, normed and rotated on read
                layer_cache, lengths_B, new_B = cache
                seen, kv_positions_BS, new_cache = kv_cache.extend(
                    layer_cache, {"kv_BSKH": k_raw_BTKH}, lengths_B, new_B, window=self.window)
                k_BTKH, v_BTKH = self.keys_values(seen["kv_BSKH"], None, kv_positions_BS)
                chunk_kv = self.keys_values(k_raw_BTKH, None, positions_BT)
            else:
                layer_cache, lengths_B, new_B = cache
                chunk_kv = self.keys_values(k_raw_BTKH, v_raw_BTKH, positions_BT)
                seen, kv_positions_BS, new_cache = kv_cache.extend(
                    layer_cache, dict(zip(("k_BSKH", "v_BSKH"), chunk_kv)), lengths_B, new_B, window=self.window)
                k_BTKH, v_BTKH = seen["k_BSKH"], seen["v_BSKH"]
        sinks_N = None if self.sinks is None else self.sinks[...]
        out_BTNH = None
        if kv_positions_BS is not None:
            out_BTNH = cached_attention(q_BTNH, k_BTKH, v_BTKH, positions_BT, kv_positions_BS, sinks_N,
                                        chunk_kv=chunk_kv, lengths_B=lengths_B, window=self.window,
                                        scale=self.scale, impl=self.impl, partitioning=partitioning)
        if out_BTNH is None:
            out_BTNH = dot_product_attention(
                q_BTNH, k_BTKH, v_BTKH, q_positions_BT=positions_BT,
                kv_positions_BS=positions_BT if kv_positions_BS is None else kv_positions_BS,
                window=self.window, q_segment_ids_BT=segment_ids_BT, kv_segment_ids_BS=segment_ids_BT,
                scale=self.scale, sinks_N=sinks_N, impl=self.impl, default_positions=default_positions,
                partitioning=partitioning)
        if self.g_proj is not None:
            out_BTNH = out_BTNH * self.output_gate(x_BTD).astype(out_BTNH.dtype)
        y_BTD = jnp.einsum("BTNH,NHD->BTD", out_BTNH, self.o_proj[...])
        return y_BTD, (k_BTKH, v_BTKH), kv_positions_BS, new_cache

    def keys_values(self, k_raw_BTKH: jax.Array, v_raw_BTKH: jax.Array | None, positions_BT: jax.Array
                    ) -> tuple[jax.Array, jax.Array]:
        """Keys (k_norm, RoPE at `positions`) and values (v_norm) from the projections; v_raw None (k_eq_v):
        the values are the raw key projection."""
        v_BTKH = k_raw_BTKH if v_raw_BTKH is None else v_raw_BTKH
        k_BTKH = self.k_norm(k_raw_BTKH) if self.k_norm is not None else k_raw_BTKH
        k_BTKH = apply_rope(k_BTKH, positions_BT, self.rope)
        if self.v_norm is not None:
            v_BTKH = self.v_norm(v_BTKH)
        return k_BTKH, v_BTKH

    def output_gate(self, x_BTD: jax.Array) -> jax.Array:
        """softplus(x W_g) in float32: [B, T, N, 1] per head, [B, T, N, H] per element."""
        g_proj = self.g_proj[...]
        if g_proj.ndim == 2:
            gate_BTN1 = jnp.einsum("BTD,DN->BTN", x_BTD, g_proj, preferred_element_type=jnp.float32)[..., None]
            return jax.nn.softplus(gate_BTN1)
        return jax.nn.softplus(jnp.einsum("BTD,DNH->BTNH", x_BTD, g_proj, preferred_element_type=jnp.float32))
