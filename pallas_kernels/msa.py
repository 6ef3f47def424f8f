"""Memory Sparse Attention (MSA): routing each query to the top-k documents of a memory bank, and attention
over the selected documents' chunk-pooled K/V followed by the query's own K/V.

Routing (router queries q and pooled router keys k both L2-normalised, so the dots are cosines):

    s[b, c] = max_{t < valid[b]}  reduce_n  q[b, t, n] . k[c, n // G]       (reduce: mean, the paper, or max)
    d[b, m] = max_{c : doc[c] = m} s[b, c],     top-k documents of d[b] (lowest id first among equal scores)

Attention (own tokens t = 0..T-1 are the queries; memory entries are visible to all of them):

    o[t, n] = sum_{j in mem[:count] U own(t)} softmax_j(scale * q[t, n] . k_j[n // G] ; sink_n) v_j[n // G]

own(t) = {s : s <= t, t - s < window} (window 0 = unlimited); the sink is an optional per-head logit that
only enters the denominator.

Kernels: `msa_chunk_scores` walks the bank in blocks of chunks, each tile reducing heads and query tokens
in registers (a running max over token blocks), so [B, T, N, C] never exists (for "mean" the G query heads
of a kv head are averaged first: one dot per kv head, not per query head); it keeps the arg-max token
(and head, for "max") per (b, c), and its custom VJP routes the gradient through them with one XLA gather
and one scatter-add: the backward is a bandwidth-bound pass over B x C rows, only run when training on
banks that fit a batch, so a kernel would buy little. Document scores are a segment max and the top-k is
lax.top_k over [B, M] (documents are far fewer than chunks; ties keep the lower id). `msa_attention`'s
forward is one online softmax over the memory blocks and then the causal own blocks; its backward is a
dQ kernel and key-major dK/dV kernels (memory and own keys). Lowerings: Triton (`msa_gpu`) and Mosaic TPU
(`msa_tpu`); the pure-JAX references are the "xla" path.

Shapes: B batch, T query tokens, S own key tokens (= T), N query heads, K kv heads, G = N // K, H head dim,
C pooled chunks (of the bank for routing, of the selected documents for attention), M documents, R rows
(token, group head) of the kernels' row layout.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from pallas_kernels import msa_gpu, msa_tpu
from pallas_kernels.common import (F32, FLOAT_DTYPES, HIGHEST, Lowering, check_array, check_block_sizes, check_dim,
                                   check_positive, next_pow2, pad_axis, resolve_lowering, round_up)

HEAD_REDUCES = ("mean", "max")
_NO_SINK = -1e30       # "no sink": seeds the running max so low that it never counts
_ENGINES = {"pallas_gpu": msa_gpu, "pallas_tpu": msa_tpu}


@dataclasses.dataclass(frozen=True)
class MsaBlockSizes:
    """Routing: block_t query tokens x block_c bank chunks per tile. Attention: block_q (token, group head)
    rows x block_kv keys per tile (memory and own keys alike). num_warps / num_stages: Triton only."""
    block_t: int = 16
    block_c: int = 64
    block_q: int = 64
    block_kv: int = 64
    num_warps: int = 4
    num_stages: int = 2

    def __post_init__(self):
        check_block_sizes(self, ("block_t", "block_c", "block_q", "block_kv"), 8)


DEFAULT_BLOCKS = {"pallas_gpu": MsaBlockSizes(),
                  "pallas_tpu": MsaBlockSizes(block_t=16, block_c=128, block_q=128, block_kv=128)}


# ---------------------------------------------------------------------------------------------- routing
def msa_chunk_scores_reference(q_BTNH: jax.Array, k_CKH: jax.Array, *, valid_B: jax.Array | None = None,
                               head_reduce: str = "mean") -> jax.Array:
    """Pure JAX (materialises [B, T, N, C]): float32 chunk scores [B, C]; -inf for a row without queries."""
    B, T, N, H = q_BTNH.shape
    C, K, _ = k_CKH.shape
    q_BTKGH = q_BTNH.reshape(B, T, K, N // K, H)
    z_BTKGC = jnp.einsum("BTKGH,CKH->BTKGC", q_BTKGH, k_CKH, precision=HIGHEST, preferred_element_type=F32)
    z_BTC = z_BTKGC.mean(axis=(2, 3)) if head_reduce == "mean" else z_BTKGC.max(axis=(2, 3))
    valid_B = jnp.full((B,), T, jnp.int32) if valid_B is None else valid_B
    z_BTC = jnp.where((jnp.arange(T)[None, :] < valid_B[:, None])[:, :, None], z_BTC, -jnp.inf)
    return z_BTC.max(axis=1)


def unambiguous_chunks(q_BTNH: jax.Array, k_CKH: jax.Array, valid_B: jax.Array, *, head_reduce: str,
                       gap: float = 1e-4) -> jax.Array:
    """Bool [B, C]: chunks whose best (token, head) candidate beats the second by more than `gap`. Elsewhere
    another summation order may pick the other candidate and its gradient lands on other rows, so gradient
    checks of `msa_chunk_scores` compare only these chunks."""
    B, T, N, H = q_BTNH.shape
    C, K, _ = k_CKH.shape
    z_BTKGC = jnp.einsum("BTKGH,CKH->BTKGC", q_BTNH.reshape(B, T, K, N // K, H).astype(F32), k_CKH.astype(F32),
                         precision=HIGHEST)
    z_BXC = z_BTKGC.mean(axis=(2, 3)) if head_reduce == "mean" else z_BTKGC.reshape(B, T * N, C)
    per_token = z_BXC.shape[1] // T
    valid_BX = jnp.arange(z_BXC.shape[1])[None, :] // per_token < valid_B[:, None]
    top2_BC2 = lax.top_k(jnp.moveaxis(jnp.where(valid_BX[:, :, None], z_BXC, -jnp.inf), 1, 2), 2)[0]
    return top2_BC2[..., 0] - top2_BC2[..., 1] > gap


@dataclasses.dataclass(frozen=True)
class _RouteConfig:
    lowering: Lowering
    head_reduce: str
    blocks: MsaBlockSizes


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _chunk_scores(cfg: _RouteConfig, q_BTNH, k_CKH, valid_B):
    return _chunk_scores_forward(cfg, q_BTNH, k_CKH, valid_B)[0]


def _chunk_scores_forward(cfg: _RouteConfig, q_BTNH, k_CKH, valid_B):
    scores_BC, argt_BC, argn_BC = _ENGINES[cfg.lowering.impl].route_forward(
        q_BTNH, k_CKH, valid_B, mean=cfg.head_reduce == "mean", blocks=cfg.blocks,
        interpret=cfg.lowering.interpret)
    return scores_BC, (q_BTNH, k_CKH, valid_B, scores_BC, argt_BC, argn_BC)


def _chunk_scores_backward(cfg: _RouteConfig, residuals, dscores_BC):
    """s[b, c] is one dot (max) or the mean of the G-group dots (mean) at the arg-max token: its gradient is
    a gather of those tokens' queries for dk and a scatter-add of ds * k into those tokens for dq."""
    q_BTNH, k_CKH, valid_B, scores_BC, argt_BC, argn_BC = residuals
    B, T, N, H = q_BTNH.shape
    C, K, _ = k_CKH.shape
    G = N // K
    ds_BC = jnp.where(jnp.isfinite(scores_BC), dscores_BC, 0.0)
    b_B1 = jnp.arange(B)[:, None]
    k_f32, q_f32 = k_CKH.astype(F32), q_BTNH.astype(F32)
    if cfg.head_reduce == "mean":
        ds_BC = ds_BC / N
        dq_BTKH = jnp.zeros((B, T, K, H), F32).at[b_B1, argt_BC].add(ds_BC[:, :, None, None] * k_f32[None])
        dq_BTNH = jnp.repeat(dq_BTKH, G, axis=2)
        qsum_BTKH = q_f32.reshape(B, T, K, G, H).sum(axis=3)
        dk_CKH = jnp.einsum("BC,BCKH->CKH", ds_BC, qsum_BTKH[b_B1, argt_BC], precision=HIGHEST)
    else:
        kv_BC = argn_BC // G
        k_BCH = k_f32[jnp.arange(C)[None, :], kv_BC]
        dq_BTNH = jnp.zeros((B, T, N, H), F32).at[b_B1, argt_BC, argn_BC].add(ds_BC[:, :, None] * k_BCH)
        q_BCH = q_f32[b_B1, argt_BC, argn_BC]
        dk_CKH = jnp.zeros((C, K, H), F32).at[jnp.arange(C)[None, :], kv_BC].add(ds_BC[:, :, None] * q_BCH)
    return dq_BTNH.astype(q_BTNH.dtype), dk_CKH.astype(k_CKH.dtype), None


_chunk_scores.defvjp(_chunk_scores_forward, _chunk_scores_backward)


def _check_route_inputs(q_BTNH, k_CKH, valid_B, head_reduce):
    check_array("q", q_BTNH, 4, FLOAT_DTYPES, "[B, T, N, H]")
    B, T, N, H = q_BTNH.shape
    check_array("k", k_CKH, 3, (q_BTNH.dtype,), "[C, K, H] with q's dtype")
    check_dim("k", k_CKH, 2, H, "head dim")
    C, K, _ = k_CKH.shape
    if C == 0:
        raise ValueError("k has no chunks: the memory bank is empty")
    if K == 0 or N % K:
        raise ValueError(f"q has {N} heads, which is not a multiple of the {K} kv heads of k")
    if valid_B is not None:
        check_array("valid_B", valid_B, 1, (jnp.int32,), "[B]")
        check_dim("valid_B", valid_B, 0, B, "batch")
    if head_reduce not in HEAD_REDUCES:
        raise ValueError(f"head_reduce must be one of {HEAD_REDUCES}, got {head_reduce!r}")


def msa_chunk_scores(q_BTNH: jax.Array, k_CKH: jax.Array, *, valid_B: jax.Array | None = None,
                     head_reduce: str = "mean", impl: str = "auto", interpret: Any = None,
                     block_sizes: MsaBlockSizes | None = None) -> jax.Array:
    """float32 [B, C]: max over the valid query tokens of the head-reduced dots with each bank chunk.

    q [B, T, N, H] router queries; k [C, K, H] pooled router keys of the bank (q's dtype, N a multiple of
    K; both L2-normalised by the caller); valid_B int32 [B]: row b's queries are tokens t < valid[b]
    (None: all T; a row without queries scores -inf). head_reduce: "mean" (the paper) or "max".
    Differentiable in q and k. impl: "xla", "pallas_gpu", "pallas_tpu" or "auto"; a Pallas lowering off
    its platform runs in interpret mode by default.
    """
    _check_route_inputs(q_BTNH, k_CKH, valid_B, head_reduce)
    B, T = q_BTNH.shape[:2]
    valid_B = jnp.full((B,), T, jnp.int32) if valid_B is None else jnp.clip(valid_B, 0, T)
    lowering = resolve_lowering(impl, interpret)
    if lowering.impl == "xla":
        return msa_chunk_scores_reference(q_BTNH, k_CKH, valid_B=valid_B, head_reduce=head_reduce)
    blocks = block_sizes or DEFAULT_BLOCKS[lowering.impl]
    return _chunk_scores(_RouteConfig(lowering, head_reduce, blocks), q_BTNH, k_CKH, valid_B)


def msa_document_scores(chunk_scores_BC: jax.Array, doc_C: jax.Array, num_docs: int) -> jax.Array:
    """float32 [B, M]: each document's best chunk score (-inf for a document without chunks). doc_C int32
    [C] holds each chunk's document in [0, num_docs) (any order; MSA stores a document's chunks together)."""
    check_array("chunk_scores", chunk_scores_BC, 2, (F32,), "[B, C] float32")
    check_array("doc_C", doc_C, 1, (jnp.int32,), "[C]")
    check_dim("doc_C", doc_C, 0, chunk_scores_BC.shape[1], "chunks")
    check_positive("num_docs", num_docs)
    scores_CB = jax.ops.segment_max(chunk_scores_BC.T, doc_C, num_segments=num_docs)
    return scores_CB.T


def msa_route(q_BTNH: jax.Array, k_CKH: jax.Array, doc_C: jax.Array, num_docs: int, top_k: int, *,
              valid_B: jax.Array | None = None, head_reduce: str = "mean", impl: str = "auto",
              interpret: Any = None, block_sizes: MsaBlockSizes | None = None) -> tuple[jax.Array, jax.Array]:
    """(document scores f32 [B, M], the top_k documents int32 [B, top_k], best first, the lowest id first
    among equal scores). Chunk scores as in `msa_chunk_scores`; doc_C int32 [C] (chunks of a document
    contiguous). The scores are differentiable (the routing loss); the ids are not."""
    _check_route_inputs(q_BTNH, k_CKH, valid_B, head_reduce)
    check_array("doc_C", doc_C, 1, (jnp.int32,), "[C]")
    check_dim("doc_C", doc_C, 0, k_CKH.shape[0], "chunks")
    check_positive("num_docs", num_docs)
    check_positive("top_k", top_k)
    if top_k > num_docs:
        raise ValueError(f"top_k={top_k} is more than the {num_docs} documents of the bank")
    chunk_BC = msa_chunk_scores(q_BTNH, k_CKH, valid_B=valid_B, head_reduce=head_reduce, impl=impl,
                                interpret=interpret, block_sizes=block_sizes)
    doc_BM = msa_document_scores(chunk_BC, doc_C, num_docs)
    _, top_BK = lax.top_k(lax.stop_gradient(doc_BM), top_k)    # ties: the lower index first
    return doc_BM, top_BK.astype(jnp.int32)


# -------------------------------------------------------------------------------------------- attention
def msa_attention_reference(q_BTNH, k_BSKH, v_BSKH, mem_k_BCKH, mem_v_BCKH, mem_count_B, *, window: int = 0,
                            sinks_N=None, scale: float) -> jax.Array:
    """Pure JAX, float32 logits and softmax over [memory[:count]; causal own keys] (+ sink)."""
    B, T, N, H = q_BTNH.shape
    C, K = mem_k_BCKH.shape[1], k_BSKH.shape[2]
    q_BTKGH = q_BTNH.reshape(B, T, K, N // K, H)
    einsum = functools.partial(jnp.einsum, precision=HIGHEST, preferred_element_type=F32)
    mem_BKGTC = einsum("BTKGH,BCKH->BKGTC", q_BTKGH, mem_k_BCKH) * scale
    own_BKGTS = einsum("BTKGH,BSKH->BKGTS", q_BTKGH, k_BSKH) * scale
    mem_vis_BC = jnp.arange(C)[None, :] < mem_count_B[:, None]
    t, s = jnp.arange(T)[:, None], jnp.arange(T)[None, :]
    own_vis_TS = (s <= t) & ((t - s < window) if window else True)
    sink_KG = (jnp.full((N,), _NO_SINK, F32) if sinks_N is None else sinks_N.astype(F32)).reshape(K, N // K)
    logits = jnp.concatenate([jnp.where(mem_vis_BC[:, None, None, None], mem_BKGTC, -jnp.inf),
                              jnp.where(own_vis_TS, own_BKGTS, -jnp.inf),
                              jnp.broadcast_to(sink_KG[None, :, :, None, None], (B, K, N // K, T, 1))], axis=-1)
    probs = jax.nn.softmax(logits, axis=-1)
    p_mem, p_own = probs[..., :C], probs[..., C:C + T]
    out_BTKGH = (einsum("BKGTC,BCKH->BTKGH", p_mem.astype(mem_v_BCKH.dtype), mem_v_BCKH)
                 + einsum("BKGTS,BSKH->BTKGH", p_own.astype(v_BSKH.dtype), v_BSKH))
    return out_BTKGH.reshape(B, T, N, H).astype(q_BTNH.dtype)


class Prepared(NamedTuple):
    """The attention kernels' operands: (token, group head) rows, token major (row r = t * G + g)."""
    q: jax.Array       # [B, K, R, Hp]
    k: jax.Array       # [B, K, Sp, Hp] own keys
    v: jax.Array       # [B, K, Sp, Hp]
    mem_k: jax.Array   # [B, K, Cp, Hp] memory keys
    mem_v: jax.Array   # [B, K, Cp, Hp]
    count: jax.Array   # int32 [B] visible memory entries
    sinks: jax.Array   # f32 [K, R] the sink logit of each row's head
    groups: int
    tokens: int


@dataclasses.dataclass(frozen=True)
class _AttendConfig:
    lowering: Lowering
    window: int
    scale: float
    blocks: MsaBlockSizes
    head_pad: int


def _to_rows(x_BTNH, K: int, R: int, Hp: int):
    B, T, N, H = x_BTNH.shape
    x = x_BTNH.reshape(B, T, K, N // K, H).transpose(0, 2, 1, 3, 4).reshape(B, K, T * (N // K), H)
    return pad_axis(pad_axis(x, 2, R), 3, Hp)


def _from_rows(x_BKRH, T: int, N: int, H: int):
    B, K = x_BKRH.shape[:2]
    x = x_BKRH[:, :, :T * (N // K), :H].reshape(B, K, T, N // K, H)
    return x.transpose(0, 2, 1, 3, 4).reshape(B, T, N, H)


def _prepare(cfg: _AttendConfig, q_BTNH, k_BSKH, v_BSKH, mem_k_BCKH, mem_v_BCKH, count_B, sinks_N) -> Prepared:
    B, T, N, H = q_BTNH.shape
    C, K = mem_k_BCKH.shape[1], k_BSKH.shape[2]
    G = N // K
    bq, bk = cfg.blocks.block_q, cfg.blocks.block_kv
    R, Hp = round_up(T * G, bq), cfg.head_pad
    keys = lambda x, n: pad_axis(pad_axis(x.transpose(0, 2, 1, 3), 2, round_up(max(n, 1), bk)), 3, Hp)
    sinks_KR = jnp.tile(sinks_N.astype(F32).reshape(K, G), (1, R // G + 1))[:, :R]
    return Prepared(_to_rows(q_BTNH, K, R, Hp), keys(k_BSKH, T), keys(v_BSKH, T), keys(mem_k_BCKH, C),
                    keys(mem_v_BCKH, C), count_B, sinks_KR, G, T)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _attention(cfg: _AttendConfig, q_BTNH, k_BSKH, v_BSKH, mem_k_BCKH, mem_v_BCKH, count_B, sinks_N):
    return _attention_forward(cfg, q_BTNH, k_BSKH, v_BSKH, mem_k_BCKH, mem_v_BCKH, count_B, sinks_N)[0]


def _attention_forward(cfg: _AttendConfig, q_BTNH, k_BSKH, v_BSKH, mem_k_BCKH, mem_v_BCKH, count_B, sinks_N):
    p = _prepare(cfg, q_BTNH, k_BSKH, v_BSKH, mem_k_BCKH, mem_v_BCKH, count_B, sinks_N)
    o_BKRH, lse_BKR = _ENGINES[cfg.lowering.impl].attention_forward(
        p, scale=cfg.scale, window=cfg.window, blocks=cfg.blocks, interpret=cfg.lowering.interpret)
    o_BTNH = _from_rows(o_BKRH, *q_BTNH.shape[1:])
    return o_BTNH, (q_BTNH, k_BSKH, v_BSKH, mem_k_BCKH, mem_v_BCKH, count_B, sinks_N, o_BKRH, lse_BKR)


def _attention_backward(cfg: _AttendConfig, residuals, do_BTNH):
    q_BTNH, k_BSKH, v_BSKH, mem_k_BCKH, mem_v_BCKH, count_B, sinks_N, o_BKRH, lse_BKR = residuals
    B, T, N, H = q_BTNH.shape
    C, K = mem_k_BCKH.shape[1], k_BSKH.shape[2]
    p = _prepare(cfg, q_BTNH, k_BSKH, v_BSKH, mem_k_BCKH, mem_v_BCKH, count_B, sinks_N)
    do_BKRH = _to_rows(do_BTNH.astype(q_BTNH.dtype), K, p.q.shape[2], cfg.head_pad)
    delta_BKR = jnp.einsum("BKRH,BKRH->BKR", o_BKRH.astype(F32), do_BKRH.astype(F32))
    dq, dk, dv, dmem_k, dmem_v = _ENGINES[cfg.lowering.impl].attention_backward(
        p, do_BKRH, lse_BKR, delta_BKR, scale=cfg.scale, window=cfg.window, blocks=cfg.blocks,
        interpret=cfg.lowering.interpret)
    keys_back = lambda x, n: x[:, :, :n, :H].transpose(0, 2, 1, 3)
    # d loss / d sink_n = -sum_{b,t} p_sink * delta, p_sink = exp(sink - lse) (its value vector is zero).
    p_sink_BKR = jnp.exp(p.sinks[None] - lse_BKR)
    dsinks_KR = -jnp.sum(p_sink_BKR * delta_BKR, axis=0)[:, :T * (N // K)]
    dsinks_N = dsinks_KR.reshape(K, T, N // K).sum(axis=1).reshape(N).astype(sinks_N.dtype)
    return (_from_rows(dq, T, N, H), keys_back(dk, T), keys_back(dv, T), keys_back(dmem_k, C),
            keys_back(dmem_v, C), None, dsinks_N)


_attention.defvjp(_attention_forward, _attention_backward)


def msa_attention(q_BTNH: jax.Array, k_BSKH: jax.Array, v_BSKH: jax.Array, mem_k_BCKH: jax.Array,
                  mem_v_BCKH: jax.Array, mem_count_B: jax.Array | None = None, *, window: int = 0,
                  sinks_N: jax.Array | None = None, scale: float | None = None, impl: str = "auto",
                  interpret: Any = None, block_sizes: MsaBlockSizes | None = None) -> jax.Array:
    """Attention of the own tokens over [selected memory; own causal keys]; returns [B, T, N, H] in q's dtype.

    q [B, T, N, H] own queries (positions 0..T-1 of the own part); k, v [B, T, K, H] own keys and values;
    mem_k, mem_v [B, C, K, H] pooled chunks of the selected documents, of which the first mem_count[b]
    (int32 [B]; None: all C) are visible to every own query; all float arrays share q's dtype, N a multiple
    of K. window: own keys per query including itself (0 = unlimited; memory is never windowed). sinks_N:
    optional per-head sink logits [N]. scale defaults to H**-0.5. Logits, softmax and accumulation are
    float32. Differentiable in q, k, v, mem_k, mem_v and sinks.
    """
    check_array("q", q_BTNH, 4, FLOAT_DTYPES, "[B, T, N, H]")
    B, T, N, H = q_BTNH.shape
    for name, x, tokens in (("k", k_BSKH, T), ("v", v_BSKH, T), ("mem_k", mem_k_BCKH, None),
                            ("mem_v", mem_v_BCKH, None)):
        check_array(name, x, 4, (q_BTNH.dtype,), "[B, S or C, K, H] with q's dtype")
        check_dim(name, x, 0, B, "batch"), check_dim(name, x, 3, H, "head dim")
        check_dim(name, x, 2, k_BSKH.shape[2], "kv heads")
        if tokens is not None:
            check_dim(name, x, 1, tokens, "own key tokens, which must equal the query tokens")
    check_dim("mem_v", mem_v_BCKH, 1, mem_k_BCKH.shape[1], "memory chunks, as mem_k")
    C, K = mem_k_BCKH.shape[1], k_BSKH.shape[2]
    if K == 0 or N % K:
        raise ValueError(f"q has {N} heads, which is not a multiple of the {K} kv heads of k and v")
    if mem_count_B is not None:
        check_array("mem_count_B", mem_count_B, 1, (jnp.int32,), "[B]")
        check_dim("mem_count_B", mem_count_B, 0, B, "batch")
    if not isinstance(window, int) or isinstance(window, bool) or window < 0:
        raise ValueError(f"window must be an int >= 0 (0 = unlimited), got {window!r}")
    if sinks_N is not None:
        check_array("sinks_N", sinks_N, 1, FLOAT_DTYPES, "[N]")
        check_dim("sinks_N", sinks_N, 0, N, "query heads")
    scale = H ** -0.5 if scale is None else float(scale)
    count_B = jnp.full((B,), C, jnp.int32) if mem_count_B is None else jnp.clip(mem_count_B, 0, C)
    lowering = resolve_lowering(impl, interpret)
    if lowering.impl == "xla":
        return msa_attention_reference(q_BTNH, k_BSKH, v_BSKH, mem_k_BCKH, mem_v_BCKH, count_B, window=window,
                                       sinks_N=sinks_N, scale=scale)
    blocks = block_sizes or DEFAULT_BLOCKS[lowering.impl]
    head_pad = next_pow2(max(H, 16)) if lowering.impl == "pallas_gpu" else H
    cfg = _AttendConfig(lowering, 0 if window >= T else window, scale, blocks, head_pad)
    sinks = lax.stop_gradient(jnp.full((N,), _NO_SINK, F32)) if sinks_N is None else sinks_N
    return _attention(cfg, q_BTNH, k_BSKH, v_BSKH, mem_k_BCKH, mem_v_BCKH, count_B, sinks)
