"""Memory Sparse Attention (MSA; EverMind, 2026): a learned router picks the top-k documents of a memory
per layer, and the layer attends over the chunk-pooled keys and values of those documents only.

Shapes: B batch, T query tokens, L document tokens, M memory documents, C pooled chunks per document,
P chunk size, N query heads, K kv heads, G = N // K, H head dim, D model width, S attended keys.

A memory document is encoded once with document-local positions 0..len-1 (document-wise RoPE); each
router layer keeps, per chunk of P tokens (restarting at every document, a final partial chunk averaged
over its real tokens), the mean of its keys (after k-norm and RoPE), values and router keys:

    K̄_c = mean_{s in c} K_s,   V̄_c = mean_{s in c} V_s,   K̄R_c = mean_{s in c} x_s W_rk
    score(c) = max_t  reduce_h  cos(x_t W_rq [h], K̄R_c [h // G])       reduce_h: mean (paper) or max
    score(doc) = max_{c in doc} score(c);   selected = top-k documents
    attention context of a query token: [prefix; pooled chunks of the selected docs; own tokens], causal

Prefix tokens (the first `msa_prefix_len_B` of a row) do not see the memory; the other query tokens sit
at positions offset by `query_offset`, after every document's local positions.

A decoder runs MSA in three modes, chosen by explicit `LayerContext` fields (state is never hidden):
  encoding  (`msa_doc_lengths_B` set): each row is one document; causal attention within it, and the layer
            hands its pooled chunks on in `ctx.msa_encoded[layer]` (`EncodedDocs`).
  query     (`msa_memory[layer]` set, a `PooledMemory`): routing + attention over the selected chunks;
            the document scores and selection go to `ctx.msa_routing[layer]` (`Routing`).
  plain     (neither): causal attention over the row's own tokens, so the model is also a plain decoder.
The two kernel-shaped computations are `route_scores` and `memory_attention` (one function each); with
`lowering` set (the layer's attention_impl through `layers.attention.pallas_only_lowering`: "pallas",
interpret mode on CPU; "auto" keeps the reference until the kernels have run on a GPU) they run the Pallas
kernels of pallas_kernels.msa, otherwise the pure-JAX math below, which is their reference.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from layers import kv_cache, params
from layers.attention import IMPLS, dot_product_attention, pallas_only_lowering, reference_attention
from layers.context import LayerContext
from layers.norms import RMSNorm
from layers.rope import RopeSpec, apply_rope
from pallas_kernels.msa import msa_attention, msa_chunk_scores

HEAD_REDUCTIONS = ("mean", "max")
NO_SCORE = -1e9   # the score of a document without a real chunk (finite: a loss over scores stays finite)


class EncodedDocs(NamedTuple):
    """One router layer's pooled chunks of a batch of documents (one per row)."""
    k_BCKH: jax.Array
    v_BCKH: jax.Array
    router_k_BCKH: jax.Array
    valid_BC: jax.Array          # the chunk holds at least one real token


class Routing(NamedTuple):
    """What one router layer chose: every document's score and the indices of the top-k documents."""
    doc_scores_BM: jax.Array
    selected_Bk: jax.Array


@dataclasses.dataclass(frozen=True)
class PooledMemory:
    """One router layer's memory of M documents x C chunks, per batch row (leading dim B) or one bank
    shared by every row (leading dim 1). The content K/V are arrays, or (`fetch`) live in host memory:
    `fetch(doc_ids [B, k] numpy) -> (k [B, k, C, K, H], v [B, k, C, K, H])` numpy, called for the
    selected documents only; the router keys always live on the device."""
    router_k_BMCKH: jax.Array
    valid_BMC: jax.Array
    k_BMCKH: jax.Array | None = None
    v_BMCKH: jax.Array | None = None
    fetch: Callable | None = None

    def content(self, selected_Bk: jax.Array, batch: int) -> tuple[jax.Array, jax.Array]:
        """Pooled keys and values of the selected documents, [B, k, C, K, H] each."""
        _, _, C, K, H = self.router_k_BMCKH.shape
        if self.fetch is not None:
            dtype = jax.ShapeDtypeStruct((batch, selected_Bk.shape[1], C, K, H), self.router_k_BMCKH.dtype)
            return jax.pure_callback(self.fetch, (dtype, dtype), selected_Bk)
        if self.k_BMCKH is None:
            raise ValueError("a PooledMemory needs its pooled k/v arrays or a host fetch function")
        pick = lambda x_BMCKH: jnp.take_along_axis(
            jnp.broadcast_to(x_BMCKH, (batch, *x_BMCKH.shape[1:])), selected_Bk[:, :, None, None, None], axis=1)
        return pick(self.k_BMCKH), pick(self.v_BMCKH)


jax.tree_util.register_dataclass(PooledMemory, data_fields=["router_k_BMCKH", "valid_BMC", "k_BMCKH", "v_BMCKH"],
                                 meta_fields=["fetch"])


def num_chunks(length: int, chunk_size: int) -> int:
    return -(-length // chunk_size)


def pool_chunks(x_BLKH: jax.Array, lengths_B: jax.Array, chunk_size: int) -> tuple[jax.Array, jax.Array]:
    """Mean over each chunk of `chunk_size` tokens of every row (one document per row, chunks from its
    first token), counting only the row's first lengths_B tokens: ([B, C, K, H] in x's dtype, valid [B, C])."""
    B, L = x_BLKH.shape[:2]
    dtype = x_BLKH.dtype
    C = num_chunks(L, chunk_size)
    real_BL = jnp.arange(L)[None, :] < lengths_B[:, None]
    x_BLKH = jnp.where(real_BL[:, :, None, None], x_BLKH.astype(jnp.float32), 0.0)
    pad = C * chunk_size - L
    x_BCPKH = jnp.pad(x_BLKH, [(0, 0), (0, pad), (0, 0), (0, 0)]).reshape(B, C, chunk_size, *x_BLKH.shape[2:])
    count_BC = jnp.pad(real_BL, [(0, 0), (0, pad)]).reshape(B, C, chunk_size).sum(-1)
    mean_BCKH = x_BCPKH.sum(2) / jnp.maximum(count_BC, 1)[:, :, None, None]
    return mean_BCKH.astype(dtype), count_BC > 0


def _unit(x: jax.Array) -> jax.Array:
    x = x.astype(jnp.float32)
    return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, axis=-1, keepdims=True), 1e-12))


def route_scores(router_q_BTNH: jax.Array, query_mask_BT: jax.Array, router_k_BMCKH: jax.Array,
                 valid_BMC: jax.Array, *, head_reduce: str = "mean", lowering: str | None = None) -> jax.Array:
    """Document scores [B, M] (float32): the max over the document's real chunks of the max over the
    routing query tokens of the cosine of query head h and chunk router key h // G, reduced over heads
    (`mean`, the paper, or `max`). A memory with leading dim 1 is shared by every row. `lowering`
    ("pallas_gpu"/"pallas_tpu"): the chunk scores come from the `msa_chunk_scores` kernel."""
    if head_reduce not in HEAD_REDUCTIONS:
        raise ValueError(f"unknown head reduction {head_reduce!r}; expected one of {HEAD_REDUCTIONS}")
    B, T, N, H = router_q_BTNH.shape
    K = router_k_BMCKH.shape[3]
    if lowering is not None:
        chunk_BMC = _kernel_chunk_scores(_unit(router_q_BTNH), query_mask_BT, _unit(router_k_BMCKH), head_reduce,
                                         lowering)
        return jnp.max(jnp.where(valid_BMC, chunk_BMC, NO_SCORE), axis=-1)
    q_BTKGH = _unit(router_q_BTNH).reshape(B, T, K, N // K, H)
    k_BMCKH = _unit(router_k_BMCKH)
    cos_BMCTKG = jnp.einsum("BTKGH,bMCKH->BMCTKG", q_BTKGH, k_BMCKH) if k_BMCKH.shape[0] == 1 else \
        jnp.einsum("BTKGH,BMCKH->BMCTKG", q_BTKGH, k_BMCKH)
    reduce = jnp.mean if head_reduce == "mean" else jnp.max
    head_BMCT = reduce(cos_BMCTKG, axis=(-2, -1))
    chunk_BMC = jnp.max(jnp.where(query_mask_BT[:, None, None, :], head_BMCT, NO_SCORE), axis=-1)
    return jnp.max(jnp.where(valid_BMC, chunk_BMC, NO_SCORE), axis=-1)


def _front(mask_BX: jax.Array) -> tuple[jax.Array, jax.Array]:
    """A stable order of each row that puts its True entries first, and their count (int32 [B]): the
    kernels take "the first n" where the layer has a mask."""
    order_BX = jnp.argsort(~mask_BX, axis=1, stable=True)
    return order_BX, mask_BX.sum(axis=1).astype(jnp.int32)


def _kernel_chunk_scores(q_BTNH, query_mask_BT, k_BMCKH, head_reduce, lowering) -> jax.Array:
    """Chunk scores [B, M, C] through the kernel: the routing tokens moved to the front of each row; a
    shared bank (leading dim 1) in one call, per-row memories one row per (vmapped) call."""
    B, T = query_mask_BT.shape
    M, C = k_BMCKH.shape[1:3]
    order_BT, count_B = _front(query_mask_BT)
    q_BTNH = jnp.take_along_axis(q_BTNH, order_BT[:, :, None, None], axis=1)
    score = lambda q_BTNH, k_CKH, n_B: jnp.maximum(msa_chunk_scores(
        q_BTNH, k_CKH, valid_B=n_B, head_reduce=head_reduce, impl=lowering), NO_SCORE)
    if k_BMCKH.shape[0] == 1:
        return score(q_BTNH, k_BMCKH.reshape(M * C, *k_BMCKH.shape[3:]), count_B).reshape(B, M, C)
    one_row = lambda q_TNH, k_MCKH, n: score(q_TNH[None], k_MCKH.reshape(M * C, *k_MCKH.shape[2:]), n[None])[0]
    return jax.vmap(one_row)(q_BTNH, k_BMCKH, count_B).reshape(B, M, C)


def select_documents(doc_scores_BM: jax.Array, top_k: int) -> jax.Array:
    """Indices [B, k] of the k best documents, best first (ties: the lower index)."""
    if not 0 < top_k <= doc_scores_BM.shape[1]:
        raise ValueError(f"top-k {top_k} must be in 1..{doc_scores_BM.shape[1]} (the documents in the memory)")
    return jax.lax.top_k(doc_scores_BM, top_k)[1]


def memory_attention(q_BTNH: jax.Array, k_BTKH: jax.Array, v_BTKH: jax.Array, mem_k_BSKH: jax.Array,
                     mem_v_BSKH: jax.Array, mem_valid_BS: jax.Array, sees_memory_BT: jax.Array | None, *,
                     scale: float, lowering: str | None = None) -> jax.Array:
    """Attention of each query token over [prefix; memory entries; own tokens], causal: own key s is
    visible to query t iff s <= t, a memory entry iff it is real and t is not a prefix token (the
    prefix comes before the memory; None: no prefix). Softmax in float32; returns [B, T, N, H].
    `lowering`: through the `msa_attention` kernel (real entries moved to the front; prefix tokens, if
    any, from a second call without memory)."""
    dtype = k_BTKH.dtype
    mem_k_BSKH, mem_v_BSKH = mem_k_BSKH.astype(dtype), mem_v_BSKH.astype(dtype)
    if lowering is not None:
        order_BS, count_B = _front(mem_valid_BS)
        front = lambda x_BSKH: jnp.take_along_axis(x_BSKH, order_BS[:, :, None, None], axis=1)
        attend = lambda count_B: msa_attention(q_BTNH.astype(dtype), k_BTKH, v_BTKH, front(mem_k_BSKH),
                                               front(mem_v_BSKH), count_B, scale=scale, impl=lowering)
        out_BTNH = attend(count_B)
        if sees_memory_BT is None:
            return out_BTNH
        return jnp.where(sees_memory_BT[:, :, None, None], out_BTNH, attend(jnp.zeros_like(count_B)))
    B, T = q_BTNH.shape[:2]
    if sees_memory_BT is None:
        sees_memory_BT = jnp.ones((B, T), bool)
    causal_TT = jnp.arange(T)[None, :] <= jnp.arange(T)[:, None]
    mem_BTS = sees_memory_BT[:, :, None] & mem_valid_BS[:, None, :]
    mask_BTS = jnp.concatenate([mem_BTS, jnp.broadcast_to(causal_TT, (B, T, T))], axis=-1)
    k_BSKH = jnp.concatenate([mem_k_BSKH, k_BTKH], axis=1)
    v_BSKH = jnp.concatenate([mem_v_BSKH, v_BTKH], axis=1)
    return reference_attention(q_BTNH, k_BSKH, v_BSKH, mask_BTS, scale=scale)


class MemorySparseAttention(nnx.Module):
    """GQA self-attention with qk-norm and RoPE plus MSA's router projections `router_q` [D, N, H] and
    `router_k` [D, K, H] (no bias); see the module docstring for its three modes."""

    def __init__(self, d_model: int, num_heads: int, num_kv_heads: int, head_dim: int, *, rope: RopeSpec,
                 chunk_size: int = 64, top_k: int = 16, head_reduce: str = "mean", query_offset: int = 0,
                 qk_norm: bool = True, norm_eps: float = 1e-6, scale: float | None = None, impl: str = "xla",
                 layer: int = 0, rngs: nnx.Rngs):
        if num_heads % num_kv_heads:
            raise ValueError(f"num_heads={num_heads} is not divisible by num_kv_heads={num_kv_heads}")
        if head_reduce not in HEAD_REDUCTIONS:
            raise ValueError(f"unknown msa head reduction {head_reduce!r}; expected one of {HEAD_REDUCTIONS}")
        if chunk_size < 1 or top_k < 1 or query_offset < 0:
            raise ValueError(f"msa needs chunk_size >= 1, top_k >= 1 and query_offset >= 0, got {chunk_size}, "
                             f"{top_k}, {query_offset}")
        if impl not in IMPLS:
            raise ValueError(f"unknown attention_impl {impl!r}; expected one of {IMPLS}")
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.rope, self.impl, self.layer = rope, impl, layer
        self.chunk_size, self.top_k, self.head_reduce, self.query_offset = chunk_size, top_k, head_reduce, query_offset
        self.scale = head_dim ** -0.5 if scale is None else scale
        D, N, K, H = d_model, num_heads, num_kv_heads, head_dim
        self.q_proj = params.normal(rngs, (D, N, H), ("embed", "q_heads", "head_dim"))
        self.k_proj = params.normal(rngs, (D, K, H), ("embed", "kv_heads", "head_dim"))
        self.v_proj = params.normal(rngs, (D, K, H), ("embed", "kv_heads", "head_dim"))
        self.o_proj = params.normal(rngs, (N, H, D), ("q_heads", "head_dim", "embed"), fan_in_dims=2)
        self.router_q = params.normal(rngs, (D, N, H), ("embed", "q_heads", "head_dim"))
        self.router_k = params.normal(rngs, (D, K, H), ("embed", "kv_heads", "head_dim"))
        self.q_norm = RMSNorm(H, eps=norm_eps, axis_name="head_dim") if qk_norm else None
        self.k_norm = RMSNorm(H, eps=norm_eps, axis_name="head_dim") if qk_norm else None

    def cache_spec(self, batch: int, max_len: int, dtype) -> dict:
        """Cached decoding without a memory keeps every token's keys and values, as a full layer does."""
        kv = jax.ShapeDtypeStruct((batch, max_len, self.num_kv_heads, self.head_dim), dtype)
        return {"k_BSKH": kv, "v_BSKH": kv}

    def _qkv(self, x_BTD, positions_BT):
        q_BTNH = jnp.einsum("BTD,DNH->BTNH", x_BTD, self.q_proj[...])
        k_BTKH = jnp.einsum("BTD,DKH->BTKH", x_BTD, self.k_proj[...])
        v_BTKH = jnp.einsum("BTD,DKH->BTKH", x_BTD, self.v_proj[...])
        if self.q_norm is not None:
            q_BTNH, k_BTKH = self.q_norm(q_BTNH), self.k_norm(k_BTKH)
        return apply_rope(q_BTNH, positions_BT, self.rope), apply_rope(k_BTKH, positions_BT, self.rope), v_BTKH

    def _out(self, out_BTNH):
        return jnp.einsum("BTNH,NHD->BTD", out_BTNH, self.o_proj[...])

    def mix(self, x_BTD: jax.Array, ctx: LayerContext) -> jax.Array:
        memory = (ctx.msa_memory or {}).get(self.layer)
        if ctx.caches is not None:
            if memory is not None:
                raise ValueError("MSA: cached decoding with a memory is not supported; run the query pass whole")
            return self._decode(x_BTD, ctx)
        if ctx.msa_doc_lengths_B is not None:
            return self.encode(x_BTD, ctx)
        if memory is not None:
            return self.attend_memory(x_BTD, ctx, memory)
        q_BTNH, k_BTKH, v_BTKH = self._qkv(x_BTD, ctx.positions_BT)
        return self._out(dot_product_attention(
            q_BTNH, k_BTKH, v_BTKH, q_positions_BT=ctx.positions_BT, kv_positions_BS=ctx.positions_BT,
            q_segment_ids_BT=ctx.segment_ids_BT, kv_segment_ids_BS=ctx.segment_ids_BT, scale=self.scale,
            impl=self.impl, default_positions=ctx.default_positions, partitioning=ctx.partitioning))

    def encode(self, x_BTD: jax.Array, ctx: LayerContext) -> jax.Array:
        """Encoding mode: each row one document at its local positions; hands on its pooled chunks."""
        q_BTNH, k_BTKH, v_BTKH = self._qkv(x_BTD, ctx.positions_BT)
        router_k_BTKH = jnp.einsum("BTD,DKH->BTKH", x_BTD, self.router_k[...])
        lengths_B, P = ctx.msa_doc_lengths_B, self.chunk_size
        k_BCKH, valid_BC = pool_chunks(k_BTKH, lengths_B, P)
        ctx.msa_encoded[self.layer] = EncodedDocs(k_BCKH, pool_chunks(v_BTKH, lengths_B, P)[0],
                                                  pool_chunks(router_k_BTKH, lengths_B, P)[0], valid_BC)
        return self._out(dot_product_attention(
            q_BTNH, k_BTKH, v_BTKH, q_positions_BT=ctx.positions_BT, kv_positions_BS=ctx.positions_BT,
            scale=self.scale, impl=self.impl, default_positions=ctx.default_positions,
            partitioning=ctx.partitioning))

    def attend_memory(self, x_BTD: jax.Array, ctx: LayerContext, memory: PooledMemory) -> jax.Array:
        """Query mode: route, gather the selected documents' chunks, attend over [prefix; them; own]."""
        B, T, _ = x_BTD.shape
        prefix_B = jnp.zeros((B,), jnp.int32) if ctx.msa_prefix_len_B is None else ctx.msa_prefix_len_B
        sees_memory_BT = jnp.arange(T)[None, :] >= prefix_B[:, None]
        positions_BT = ctx.positions_BT + self.query_offset * sees_memory_BT
        q_BTNH, k_BTKH, v_BTKH = self._qkv(x_BTD, positions_BT)
        route_mask_BT = sees_memory_BT if ctx.msa_route_mask_BT is None else ctx.msa_route_mask_BT
        router_q_BTNH = jnp.einsum("BTD,DNH->BTNH", x_BTD, self.router_q[...])
        lowering = pallas_only_lowering(self.impl)
        scores_BM = route_scores(router_q_BTNH, route_mask_BT, memory.router_k_BMCKH, memory.valid_BMC,
                                 head_reduce=self.head_reduce, lowering=lowering)
        selected_Bk = select_documents(scores_BM, self.top_k)
        ctx.msa_routing[self.layer] = Routing(scores_BM, selected_Bk)
        mem_k_BkCKH, mem_v_BkCKH = memory.content(selected_Bk, B)
        valid_BkC = jnp.take_along_axis(jnp.broadcast_to(memory.valid_BMC, (B, *memory.valid_BMC.shape[1:])),
                                        selected_Bk[:, :, None], axis=1)
        flat = lambda x: x.reshape(B, -1, *x.shape[3:])
        out_BTNH = memory_attention(q_BTNH, k_BTKH, v_BTKH, flat(mem_k_BkCKH), flat(mem_v_BkCKH),
                                    valid_BkC.reshape(B, -1), None if ctx.msa_prefix_len_B is None else sees_memory_BT,
                                    scale=self.scale, lowering=lowering)
        return self._out(out_BTNH)

    def _decode(self, x_BTD: jax.Array, ctx: LayerContext) -> jax.Array:
        q_BTNH, k_BTKH, v_BTKH = self._qkv(x_BTD, ctx.positions_BT)
        seen, kv_positions_BS, ctx.caches[self.layer] = kv_cache.extend(
            ctx.caches[self.layer], {"k_BSKH": k_BTKH, "v_BSKH": v_BTKH}, ctx.cache_lengths_B, ctx.new_tokens_B,
            window=0)
        return self._out(dot_product_attention(
            q_BTNH, seen["k_BSKH"], seen["v_BSKH"], q_positions_BT=ctx.positions_BT,
            kv_positions_BS=kv_positions_BS, scale=self.scale, impl=self.impl))


def memory_from_encoded(encoded: EncodedDocs, num_docs: int) -> PooledMemory:
    """Regroups an encoding pass over B * M documents (row b * M + m: row b's document m) into a
    per-row memory [B, M, C, ...]."""
    group = lambda x: x.reshape(-1, num_docs, *x.shape[1:])
    return PooledMemory(group(encoded.router_k_BCKH), group(encoded.valid_BC), group(encoded.k_BCKH),
                        group(encoded.v_BCKH))

