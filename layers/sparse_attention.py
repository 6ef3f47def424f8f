"""Attention over one K = V vector per token (MQA) that joins a sliding window of raw tokens with
compressed entries of the whole past in ONE softmax, plus a learned per-head sink logit.

Shapes: B batch, T tokens, S window (cache) keys, N query heads, H head dim, C compressed entries, K selected
entries per query, Q query latent (low-rank) width, G output groups, M = N / G heads per group, O output
latent width.

    qr  = rmsnorm(x W_qa)                                   [B, T, Q]
    q   = rope(rmsnorm_unweighted(qr W_qb))                 [B, T, N, H], per head, no weight
    kv  = rope(rmsnorm(x W_kv))                             [B, T, H], both key and value
    o   = softmax(q . [window kv ; compressed entries] * H^-1/2 ; sink) [window kv ; entries]
    o   = rope^-1(o)                                        undoes the rotation the values carried
    y   = concat_g(o_g W_oa[g]) W_ob                        grouped low-rank output projection
RoPE acts on the last `rope_dim` dims of each head. The compressed part is empty (sliding-window
layers), every visible entry (`hca_attention`), or each query's top-k entries from the lightning indexer
(`csa_attention`). The window holds the `window` most recent raw tokens, the query itself included.

Masks follow token indices, not positions: key j is in query t's window iff t - window < j <= t and both
are of the same (non-padding) segment; compressed entries follow `compression.entry_visibility`. The
three functions below are the pure-JAX references (attention_impl "xla"); a kernel for `csa_attention`
or `hca_attention` takes the same arguments in the same order and computes the same masks.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from layers import kv_cache, params
from layers.attention import DECODE_MAX_TOKENS, IMPLS, pallas_only_lowering, kernel_lowering
from layers.compression import Compressor, LightningIndexer, entry_visibility
from layers.context import LayerContext
from layers.norms import RMSNorm, rms_normalize
from layers.partitioning import UNPARTITIONED, Partitioning
from layers.rope import RopeSpec, apply_rope_tail
from pallas_kernels import (compressed_decode_attention, csa_attention as csa_kernel, flash_attention,
                            hca_attention as hca_kernel)
from pallas_kernels.compressed import CSA_DKV


def window_visibility(num_tokens: int, window: int, segment_ids_BT: jax.Array | None = None) -> jax.Array:
    """Boolean [B or 1, T, T]: key j is one of query t's `window` most recent tokens (t itself included),
    of t's segment and not padding."""
    t_T1, j_1T = jnp.arange(num_tokens)[:, None], jnp.arange(num_tokens)[None, :]
    visible_1TT = ((j_1T <= t_T1) & (t_T1 - j_1T < window))[None]
    if segment_ids_BT is None:
        return visible_1TT
    q_seg, kv_seg = segment_ids_BT[:, :, None], segment_ids_BT[:, None, :]
    return visible_1TT & (q_seg == kv_seg) & (kv_seg != 0)


def _attend(q_BTNH: jax.Array, parts: list[tuple[jax.Array, jax.Array]], sinks_N: jax.Array, scale: float
            ) -> jax.Array:
    """One float32 softmax over the keys of all `parts` (each: K = V rows [B, S_i, H] and a visibility
    [B or 1, T, S_i]) plus the per-head sink logit, which enters only the denominator."""
    B, T, N, _ = q_BTNH.shape
    logits = [jnp.where(visible[:, None], jnp.einsum("BTNH,BSH->BNTS", q_BTNH, kv_BSH,
                                                     preferred_element_type=jnp.float32) * scale, -jnp.inf)
              for kv_BSH, visible in parts]
    sink_BNT1 = jnp.broadcast_to(sinks_N.astype(jnp.float32)[None, :, None, None], (B, N, T, 1))
    probs_BNTX = jax.nn.softmax(jnp.concatenate([*logits, sink_BNT1], axis=-1), axis=-1)
    out_BTNH, offset = 0.0, 0
    for kv_BSH, _ in parts:
        p_BNTS = probs_BNTX[..., offset:offset + kv_BSH.shape[1]].astype(kv_BSH.dtype)
        # [B, N, T, H] then transposed: XLA:CPU has no bf16 x bf16 -> f32 dot straight into [B, T, N, H]
        out_BTNH = out_BTNH + jnp.einsum("BNTS,BSH->BNTH", p_BNTS, kv_BSH,
                                         preferred_element_type=jnp.float32).transpose(0, 2, 1, 3)
        offset += kv_BSH.shape[1]
    return out_BTNH.astype(q_BTNH.dtype)


def sliding_attention(q_BTNH: jax.Array, kv_BTH: jax.Array, sinks_N: jax.Array, *, window: int, scale: float,
                      segment_ids_BT: jax.Array | None = None) -> jax.Array:
    """Window of raw tokens only: [B, T, N, H]."""
    visible = window_visibility(q_BTNH.shape[1], window, segment_ids_BT)
    return _attend(q_BTNH, [(kv_BTH, visible)], sinks_N, scale)


def hca_attention(q_BTNH: jax.Array, kv_BTH: jax.Array, compressed_BCH: jax.Array, sinks_N: jax.Array, *,
                  window: int, ratio: int, scale: float, segment_ids_BT: jax.Array | None = None) -> jax.Array:
    """Window of raw tokens plus every compressed entry visible to the query: [B, T, N, H]."""
    T, C = q_BTNH.shape[1], compressed_BCH.shape[1]
    return _attend(q_BTNH, [(kv_BTH, window_visibility(T, window, segment_ids_BT)),
                            (compressed_BCH, entry_visibility(T, C, ratio, segment_ids_BT))], sinks_N, scale)


def csa_attention(q_BTNH: jax.Array, kv_BTH: jax.Array, compressed_BCH: jax.Array, indices_BTK: jax.Array,
                  sinks_N: jax.Array, *, window: int, scale: float, segment_ids_BT: jax.Array | None = None
                  ) -> jax.Array:
    """Window of raw tokens plus the compressed entries `indices` [B, T, K] names for each query (-1 marks
    an unused slot; the indexer already applied causality; an entry named twice counts once, and the
    indexer never names one twice): [B, T, N, H]."""
    B, T, _ = indices_BTK.shape
    C = compressed_BCH.shape[1]
    rows_BTK = jnp.where(indices_BTK >= 0, indices_BTK, C)   # unused slots land in a dropped column
    selected_BTC = jnp.zeros((B, T, C + 1), bool).at[
        jnp.arange(B)[:, None, None], jnp.arange(T)[None, :, None], rows_BTK].set(True)[..., :C]
    return _attend(q_BTNH, [(kv_BTH, window_visibility(T, window, segment_ids_BT)),
                            (compressed_BCH, selected_BTC)], sinks_N, scale)


class CompressedAttention(nnx.Module):
    """The attention layer of the module docstring. `compress_ratio` 0: sliding window only; with a
    ratio and `index_top_k` 0: window + all visible entries (HCA); with `index_top_k` > 0: window + the
    indexer's top-k entries (CSA). `overlap` makes the compressors pool overlapping windows. Under the
    Pallas kernels, `csa_dkv` is CSA's backward path into the selected entries (the `dkv` of
    `pallas_kernels.csa_attention`) and `fused_topk` the indexer's selection (`LightningIndexer`)."""

    def __init__(self, d_model: int, num_heads: int, head_dim: int, *, q_rank: int, out_groups: int,
                 out_rank: int, window: int, rope: RopeSpec, rope_dim: int, compress_ratio: int = 0,
                 overlap: bool = False, index_heads: int = 0, index_dim: int = 0, index_top_k: int = 0,
                 eps: float = 1e-6, impl: str = "xla", csa_dkv: str = "atomic", fused_topk: bool = False,
                 layer: int = 0, rngs: nnx.Rngs):
        if num_heads % out_groups:
            raise ValueError(f"num_heads={num_heads} is not divisible by out_groups={out_groups}")
        if impl not in IMPLS:
            raise ValueError(f"unknown attention_impl {impl!r}; expected one of {IMPLS}")
        if csa_dkv not in CSA_DKV:
            raise ValueError(f"unknown csa_dkv {csa_dkv!r}; expected one of {CSA_DKV}")
        self.impl, self.layer, self.csa_dkv = impl, layer, csa_dkv
        D, N, H, G = d_model, num_heads, head_dim, out_groups
        self.num_heads, self.head_dim, self.out_groups, self.window = N, H, G, window
        self.rope, self.rope_dim, self.ratio, self.eps = rope, rope_dim, compress_ratio, eps
        self.q_a_proj = params.normal(rngs, (D, q_rank), ("embed", "q_lora"))
        self.q_norm = RMSNorm(q_rank, eps=eps, axis_name="q_lora")
        self.q_b_proj = params.normal(rngs, (q_rank, N, H), ("q_lora", "q_heads", "head_dim"))
        self.kv_proj = params.normal(rngs, (D, H), ("embed", "head_dim"))
        self.kv_norm = RMSNorm(H, eps=eps, axis_name="head_dim")
        self.sinks = params.zeros((N,), ("q_heads",))
        self.o_a_proj = params.normal(rngs, (G, N // G, H, out_rank), ("o_groups", "q_heads", "head_dim", "o_lora"),
                                      fan_in_dims=3)
        self.o_b_proj = params.normal(rngs, (G, out_rank, D), ("o_groups", "o_lora", "embed"), fan_in_dims=2)
        self.compressor = (Compressor(D, H, compress_ratio, overlap=overlap, rope=rope, rope_dim=rope_dim, eps=eps,
                                      rngs=rngs) if compress_ratio else None)
        self.indexer = (LightningIndexer(D, q_rank, index_heads, index_dim, compress_ratio, index_top_k,
                                         overlap=overlap, rope=rope, rope_dim=rope_dim, eps=eps,
                                         fused_topk=fused_topk, rngs=rngs)
                        if compress_ratio and index_top_k else None)

    def mix(self, x_BTD: jax.Array, ctx: LayerContext) -> jax.Array:
        """The layer as a token mixer of a decoder stack; with `ctx.caches`, the next chunk against its cache."""
        if ctx.caches is None:
            return self(x_BTD, ctx.positions_BT, segment_ids_BT=ctx.segment_ids_BT, partitioning=ctx.partitioning)
        cache = (ctx.caches[self.layer], ctx.cache_lengths_B, ctx.new_tokens_B)
        y_BTD, ctx.caches[self.layer] = self._run(x_BTD, ctx.positions_BT, None, ctx.partitioning, cache)
        return y_BTD

    def __call__(self, x_BTD: jax.Array, positions_BT: jax.Array, *, segment_ids_BT: jax.Array | None = None,
                 partitioning: Partitioning = UNPARTITIONED) -> jax.Array:
        return self._run(x_BTD, positions_BT, segment_ids_BT, partitioning, None)[0]

    def cache_spec(self, batch: int, max_len: int, dtype) -> dict:
        """A ring of the last `window` K=V vectors; the compressor's entries and pending window; the
        indexer's keys and pending window. A float8 `dtype` keeps the ring and entries in the native
        precision (fp8 + block scales + bf16 RoPE part; the index keys fp4)."""
        spec = {"kv_BWH": (kv_cache.packed_spec((batch, self.window), self.head_dim, rope_dim=self.rope_dim)
                           if jnp.dtype(dtype) == kv_cache.FP8
                           else jax.ShapeDtypeStruct((batch, self.window, self.head_dim), dtype))}
        if self.compressor is not None:
            spec["compressor"] = self.compressor.cache_spec(batch, max_len, dtype)
        if self.indexer is not None:
            spec["indexer"] = self.indexer.cache_spec(batch, max_len, dtype)
        return spec

    def _run(self, x_BTD, positions_BT, segment_ids_BT, partitioning, cache) -> tuple[jax.Array, dict | None]:
        """The output [B, T, D] and, with `cache` = (this layer's cache, lengths [B], real new tokens [B]),
        the updated cache."""
        B, T, _ = x_BTD.shape
        qr_BTQ = self.q_norm(jnp.einsum("BTD,DQ->BTQ", x_BTD, self.q_a_proj[...]))
        q_BTNH = jnp.einsum("BTQ,QNH->BTNH", qr_BTQ, self.q_b_proj[...])
        q_BTNH = apply_rope_tail(rms_normalize(q_BTNH, self.eps).astype(x_BTD.dtype), positions_BT, self.rope,
                                 self.rope_dim)
        kv_BTH = self.kv_norm(jnp.einsum("BTD,DH->BTH", x_BTD, self.kv_proj[...]))
        kv_BTH = apply_rope_tail(kv_BTH[:, :, None], positions_BT, self.rope, self.rope_dim)[:, :, 0]
        if cache is None:
            out_BTNH = self._attention(x_BTD, qr_BTQ, q_BTNH, kv_BTH, positions_BT, segment_ids_BT, partitioning)
            new_cache = None
        else:
            out_BTNH, new_cache = self._cached_attention(x_BTD, qr_BTQ, q_BTNH, kv_BTH, positions_BT, *cache)
        out_BTNH = apply_rope_tail(out_BTNH, positions_BT, self.rope, self.rope_dim, inverse=True)
        out_BTGMH = out_BTNH.reshape(B, T, self.out_groups, -1, self.head_dim)
        latent_BTGO = jnp.einsum("BTGMH,GMHO->BTGO", out_BTGMH, self.o_a_proj[...])
        return jnp.einsum("BTGO,GOD->BTD", latent_BTGO, self.o_b_proj[...]), new_cache

    def _cached_attention(self, x_BTD, qr_BTQ, q_BTNH, kv_BTH, positions_BT, cache, lengths_B, new_B
                          ) -> tuple[jax.Array, dict]:
        """Decoding: the window over the ring and the chunk, and the cached compressed entries (all visible
        ones, or the indexer's top-k), in one softmax with the sink. A float8 cache's packed ring and entries
        are unpacked first; then, where `pallas_only_lowering` names a kernel, a short chunk attends through
        the decode kernels (pallas_kernels.compressed_decode_attention) and a longer one through the forward
        kernels (`_prefill_attention`); else pure JAX."""
        kernel = pallas_only_lowering(self.impl)
        lowering = kernel if q_BTNH.shape[1] <= DECODE_MAX_TOKENS else None   # the decode kernels'
        ring = cache["kv_BWH"]   # packed parts under a float8 cache (layers.kv_cache.packed_spec)
        packed = kv_cache.is_packed(ring)
        store, new = ((ring, kv_cache.pack(kv_BTH, ring)) if packed
                      else ({"kv_BWH": ring}, {"kv_BWH": kv_BTH}))
        seen, kv_positions_BS, ring = kv_cache.extend(store, new, lengths_B, new_B, window=self.window)
        window_kv_BSH = kv_cache.read(seen if packed else seen["kv_BWH"], q_BTNH.dtype)
        new_cache = {"kv_BWH": ring if packed else ring["kv_BWH"]}
        entries_BCH = indices_BTK = None
        if self.compressor is not None:
            new_cache["compressor"] = self.compressor.extend(x_BTD, cache["compressor"], lengths_B, new_B)
            entries_BCH = kv_cache.read(new_cache["compressor"]["entries_BCH"], q_BTNH.dtype)
            if self.indexer is not None:
                indices_BTK, new_cache["indexer"] = self.indexer.extend(x_BTD, qr_BTQ, positions_BT, cache["indexer"],
                                                                        lengths_B, new_B, kernel=kernel)
        sinks_N, scale = self.sinks[...], self.head_dim ** -0.5
        if kernel and not lowering and window_kv_BSH.shape[1] == self.window + q_BTNH.shape[1]:
            return self._prefill_attention(q_BTNH, window_kv_BSH, kv_positions_BS, positions_BT, entries_BCH,
                                           indices_BTK, kernel), new_cache
        if lowering:
            return compressed_decode_attention(
                q_BTNH, window_kv_BSH, kv_positions_BS, positions_BT.astype(jnp.int32), entries_BCH, sinks_N,
                window=self.window, ratio=self.ratio if indices_BTK is None and entries_BCH is not None else None,
                indices_BTK=indices_BTK, scale=scale, impl=lowering), new_cache
        q_pos_BT1, kv_pos_B1S = positions_BT[:, :, None], kv_positions_BS[:, None]
        in_window_BTS = (kv_pos_B1S <= q_pos_BT1) & (q_pos_BT1 - kv_pos_B1S < self.window)
        parts = [(window_kv_BSH, in_window_BTS)]
        if entries_BCH is not None:
            C = entries_BCH.shape[1]
            if indices_BTK is None:
                visible_BTC = jnp.arange(C)[None, None] < (q_pos_BT1 + 1) // self.ratio
            else:
                rows_BTK = jnp.where(indices_BTK >= 0, indices_BTK, C)   # unused slots: a dropped column
                B, T, _ = indices_BTK.shape
                visible_BTC = jnp.zeros((B, T, C + 1), bool).at[
                    jnp.arange(B)[:, None, None], jnp.arange(T)[None, :, None], rows_BTK].set(True)[..., :C]
            parts.append((entries_BCH, visible_BTC))
        return _attend(q_BTNH, parts, sinks_N, scale), new_cache

    def _prefill_attention(self, q_BTNH, window_kv_BSH, kv_positions_BS, positions_BT, entries_BCH, indices_BTK,
                           lowering: str) -> jax.Array:
        """A prefill chunk through the forward kernels: [the window ring; the chunk] as one causal sequence
        (`kv_cache.ring_as_sequence`, zero queries for the ring's rows, dropped after) whose tokens take
        the cached compressed entries by index: CSA's top-k, or for HCA every entry visible at the token's
        position (C <= max_len / ratio slots); a layer without entries attends its window only."""
        B, T, N, H = q_BTNH.shape
        (kv_BSH,), segment_ids_BS = kv_cache.ring_as_sequence([window_kv_BSH], kv_positions_BS, T)
        W = kv_BSH.shape[1] - T
        q_BSNH = jnp.concatenate([jnp.zeros((B, W, N, H), q_BTNH.dtype), q_BTNH], axis=1)
        sinks_N, scale = self.sinks[...], self.head_dim ** -0.5
        if entries_BCH is None:
            out_BSNH = flash_attention(q_BSNH, kv_BSH[:, :, None], kv_BSH[:, :, None], window=self.window,
                                       sinks_N=sinks_N, segment_ids_BT=segment_ids_BS, scale=scale, impl=lowering)
            return out_BSNH[:, W:]
        if indices_BTK is None:
            c_C = jnp.arange(entries_BCH.shape[1], dtype=jnp.int32)
            visible_BTC = c_C < ((positions_BT + 1) // self.ratio)[:, :, None]
            indices_BTK = jnp.where(visible_BTC, c_C, -1)
        indices_BSK = jnp.concatenate([jnp.full((B, W, indices_BTK.shape[2]), -1, jnp.int32),
                                       indices_BTK.astype(jnp.int32)], axis=1)
        out_BSNH = csa_kernel(q_BSNH, kv_BSH, entries_BCH, indices_BSK, sinks_N, window=self.window, scale=scale,
                              segment_ids_BT=segment_ids_BS, impl=lowering)
        return out_BSNH[:, W:]

    def _attention(self, x_BTD, qr_BTQ, q_BTNH, kv_BTH, positions_BT, segment_ids_BT, partitioning: Partitioning
                   ) -> jax.Array:
        """The window (+ compressed entries) attention, through our Pallas kernels where `kernel_lowering`
        says so. With segment ids the kernels take a segment to be a run of equal ids (packed sequences),
        where the references compare ids; the two agree whenever no id repeats after a different one."""
        sinks_N, scale = self.sinks[...], self.head_dim ** -0.5
        common = dict(window=self.window, scale=scale, segment_ids_BT=segment_ids_BT)
        lowering = kernel_lowering(self.impl)
        # the kernels' operands, for `per_shard`: queries and sinks split by head, the shared keys by row
        heads, rows, segments = ("batch", None, "q_heads", None), ("batch", None, None), ("batch", None)
        segment_axes = None if segment_ids_BT is None else segments
        if self.compressor is None or x_BTD.shape[1] < self.ratio:   # no complete window yet
            if lowering:
                sliding = lambda q, kv, sinks, seg: flash_attention(
                    q, kv[:, :, None], kv[:, :, None], window=self.window, sinks_N=sinks, scale=scale,
                    segment_ids_BT=seg, impl=lowering)
                return partitioning.per_shard(sliding, (heads, rows, ("q_heads",), segment_axes), heads)(
                    q_BTNH, kv_BTH, sinks_N, segment_ids_BT)
            return sliding_attention(q_BTNH, kv_BTH, sinks_N, **common)
        entries_BCH = self.compressor(x_BTD, positions_BT, segment_ids_BT)
        if self.indexer is None:
            if lowering:
                hca = lambda q, kv, entries, sinks, seg: hca_kernel(
                    q, kv, entries, sinks, window=self.window, ratio=self.ratio, scale=scale, segment_ids_BT=seg,
                    impl=lowering)
                return partitioning.per_shard(hca, (heads, rows, rows, ("q_heads",), segment_axes), heads)(
                    q_BTNH, kv_BTH, entries_BCH, sinks_N, segment_ids_BT)
            return hca_attention(q_BTNH, kv_BTH, entries_BCH, sinks_N, ratio=self.ratio, **common)
        indices_BTK = self.indexer(x_BTD, qr_BTQ, positions_BT, segment_ids_BT, kernel=lowering,
                                   partitioning=partitioning)
        if lowering:
            csa = lambda q, kv, entries, indices, sinks, seg: csa_kernel(
                q, kv, entries, indices, sinks, window=self.window, scale=scale, segment_ids_BT=seg, impl=lowering,
                dkv=self.csa_dkv)
            return partitioning.per_shard(csa, (heads, rows, rows, rows, ("q_heads",), segment_axes), heads)(
                q_BTNH, kv_BTH, entries_BCH, indices_BTK, sinks_N, segment_ids_BT)
        return csa_attention(q_BTNH, kv_BTH, entries_BCH, indices_BTK, sinks_N, **common)
