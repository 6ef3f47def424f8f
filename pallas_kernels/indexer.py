"""Lightning indexer (DeepSeek-V4 CSA): scores of every query token against the compressed index keys,

    I[t, c] = sum_n w[t, n] * relu(q[t, n] . k[c])   for visible c < (t + 1) // ratio, -inf otherwise,

and the top-k visible entries per token (int32, -1 for slots beyond the number of visible entries).
The Triton (`indexer_gpu`) and Mosaic TPU (`indexer_tpu`) kernels fuse the head reduction, so
[B, T, N, C] never exists; `indexer_topk` scores chunks of tokens (the kernels take the chunk's first
token as a runtime offset) and keeps each chunk's jax.lax.top_k, so its memory is linear in T * top-k;
with fused=True on the Triton lowering (`indexer_topk_gpu`) the kernel selects while it scores and no
scores are written at all. [B, T, C] scores exist only in the differentiable `indexer_scores`. Callers
fold the softmax and head scales into w (relu is positively homogeneous).

Shapes: B batch, T tokens, N index heads, H index head dim, C compressed entries, K top-k slots, P tokens
of a top-k chunk.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax

from pallas_kernels import indexer_gpu, indexer_topk_gpu, indexer_tpu
from pallas_kernels.common import (F32, FLOAT_DTYPES, HIGHEST, Lowering, check_array, check_block_sizes, check_dim,
                                   check_positive, check_segment_ids, first_entry, pad_axis, resolve_lowering,
                                   round_up, visible_entries, window_start)


@dataclasses.dataclass(frozen=True)
class IndexerBlockSizes:
    """block_t tokens x block_s entries per tile (on GPU block_t is raised until bt * heads >= 16);
    topk_part: candidate slots per token the fused top-k's compaction holds at once (GPU)."""
    block_t: int = 2
    block_s: int = 64
    num_warps: int = 4
    num_stages: int = 2
    topk_part: int = 512

    def __post_init__(self):
        check_block_sizes(self, ("block_t", "block_s", "topk_part"), 1)


_TOPK_CHUNK_BYTES = 1 << 28   # float32 scores (or reference dots) of one chunk of tokens in indexer_topk
DEFAULT_BLOCKS = {"pallas_gpu": IndexerBlockSizes(block_t=2, block_s=64),
                  "pallas_tpu": IndexerBlockSizes(block_t=8, block_s=128)}
_ENGINES = {"pallas_gpu": indexer_gpu, "pallas_tpu": indexer_tpu}


def indexer_scores_reference(q_BTNH: jax.Array, k_BCH: jax.Array, weights_BTN: jax.Array, *, ratio: int,
                             token_offset=0) -> jax.Array:
    """Pure JAX (materialises [B, T, N, C]): float32 scores [B, T, C], -inf where invisible. The tokens
    are token_offset, token_offset + 1, ... (a chunk of a longer sequence)."""
    T, C = q_BTNH.shape[1], k_BCH.shape[1]
    z_BTNC = jnp.einsum("BTNH,BCH->BTNC", q_BTNH, k_BCH, precision=HIGHEST, preferred_element_type=F32)
    scores_BTC = jnp.einsum("BTNC,BTN->BTC", jax.nn.relu(z_BTNC), weights_BTN.astype(F32), precision=HIGHEST)
    t_T = token_offset + jnp.arange(T)
    visible_TC = jnp.arange(C)[None, :] < visible_entries(t_T, ratio, C, jnp.floor_divide)[:, None]
    return jnp.where(visible_TC[None], scores_BTC, -jnp.inf)


@dataclasses.dataclass(frozen=True)
class _Config:
    lowering: Lowering
    ratio: int
    blocks: IndexerBlockSizes


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _scores_kernel(cfg: _Config, q_BTNH, k_BCH, weights_BTN):
    return _ENGINES[cfg.lowering.impl].forward(q_BTNH, k_BCH, weights_BTN, jnp.zeros((), jnp.int32), ratio=cfg.ratio,
                                               blocks=cfg.blocks, interpret=cfg.lowering.interpret)


def _scores_forward(cfg: _Config, q_BTNH, k_BCH, weights_BTN):
    return _scores_kernel(cfg, q_BTNH, k_BCH, weights_BTN), (q_BTNH, k_BCH, weights_BTN)


def _scores_backward(cfg: _Config, residuals, dscores_BTC):
    q_BTNH, k_BCH, weights_BTN = residuals
    dq, dk, dw = _ENGINES[cfg.lowering.impl].backward(q_BTNH, k_BCH, weights_BTN, dscores_BTC, ratio=cfg.ratio,
                                                      blocks=cfg.blocks, interpret=cfg.lowering.interpret)
    return dq, dk.astype(k_BCH.dtype), dw.astype(weights_BTN.dtype)


_scores_kernel.defvjp(_scores_forward, _scores_backward)


def _validate(q_BTNH, k_BCH, weights_BTN, ratio):
    check_array("q", q_BTNH, 4, FLOAT_DTYPES, "[B, T, N, H]")
    B, T, N, H = q_BTNH.shape
    check_array("k", k_BCH, 3, (q_BTNH.dtype,), "[B, C, H] with q's dtype")
    check_dim("k", k_BCH, 0, B, "batch"), check_dim("k", k_BCH, 2, H, "head dim")
    check_array("weights", weights_BTN, 3, FLOAT_DTYPES, "[B, T, N]")
    check_dim("weights", weights_BTN, 0, B, "batch"), check_dim("weights", weights_BTN, 1, T, "tokens")
    check_dim("weights", weights_BTN, 2, N, "heads")
    check_positive("ratio", ratio)


def indexer_scores(q_BTNH: jax.Array, k_BCH: jax.Array, weights_BTN: jax.Array, *, ratio: int, impl: str = "auto",
                   interpret=None, block_sizes: IndexerBlockSizes | None = None) -> jax.Array:
    """float32 [B, T, C]: sum_n weights[t, n] relu(q[t, n] . k[c]) for c < (t + 1) // ratio, else -inf.

    q [B, T, N, H] index queries; k [B, C, H] compressed index keys; weights [B, T, N] (scales folded in).
    Differentiable in q, k and weights (the -inf entries get no gradient). impl: "xla", "pallas_gpu",
    "pallas_tpu" or "auto"; a Pallas lowering off its platform runs in interpret mode by default.
    """
    _validate(q_BTNH, k_BCH, weights_BTN, ratio)
    lowering = resolve_lowering(impl, interpret)
    if lowering.impl == "xla":
        return indexer_scores_reference(q_BTNH, k_BCH, weights_BTN, ratio=ratio)
    blocks = block_sizes or DEFAULT_BLOCKS[lowering.impl]
    return _scores_kernel(_Config(lowering, ratio, blocks), q_BTNH, k_BCH, weights_BTN)


def indexer_topk(q_BTNH: jax.Array, k_BCH: jax.Array, weights_BTN: jax.Array, *, ratio: int, topk: int,
                 segment_ids_BT: jax.Array | None = None, impl: str = "auto", interpret=None,
                 block_sizes: IndexerBlockSizes | None = None, fused: bool = False) -> jax.Array:
    """int32 [B, T, topk]: the highest-scoring visible entries per token, best first; slots beyond the
    number of visible entries min((t + 1) // ratio, C) hold -1. Arguments as for `indexer_scores`;
    segment_ids_BT int [B, T] (0 = padding) keep each token to the entries whose last pooled token lies in
    its run of equal ids.

    Memory stays linear in T * topk, never T * C: the tokens go through in chunks (lax.map), and each
    chunk's [B, P, C] scores are reduced to their top-k before the next chunk is scored. fused=True (Triton
    lowering only; the XLA and Mosaic TPU paths ignore it, Mosaic having no per-lane scatter) writes no
    scores: the kernel keeps each token's candidates above a rising threshold in a [B, P, capacity] list
    (capacity ~ 2 * topk, `indexer_topk_gpu`) and jax.lax.top_k ranks that list; same entries, same tie
    order (lowest index first). It stays off by default, "auto" included, until timed against the chunked
    path on the GPU (benchmarks/attention.py --only indexer). The result is an index set, so nothing here is
    differentiated (the inputs are cut from the gradient).
    """
    _validate(q_BTNH, k_BCH, weights_BTN, ratio)
    check_positive("topk", topk)
    check_segment_ids(segment_ids_BT, *q_BTNH.shape[:2])
    lowering = resolve_lowering(impl, interpret)
    q_BTNH, k_BCH, weights_BTN = (lax.stop_gradient(x) for x in (q_BTNH, k_BCH, weights_BTN))
    B, T, N, H = q_BTNH.shape
    first_BT = first_entry(window_start(segment_ids_BT, B, T), ratio)
    C = k_BCH.shape[1]
    if C == 0:
        return jnp.full((B, T, topk), -1, jnp.int32)
    fused = fused and lowering.impl == "pallas_gpu"
    blocks = block_sizes or DEFAULT_BLOCKS.get(lowering.impl)
    if fused:   # keys and indices of the candidate lists
        per_token = B * 8 * indexer_topk_gpu.candidate_capacity(min(topk, C), blocks)
    else:       # float32 scores (the reference also holds [B, P, N, C] dots)
        per_token = B * C * 4 * (N if lowering.impl == "xla" else 1)
    chunk = min(round_up(T, 16), max(16, _TOPK_CHUNK_BYTES // per_token // 16 * 16))
    n_chunks = -(-T // chunk)
    to_chunks = lambda x: jnp.moveaxis(pad_axis(x, 1, n_chunks * chunk).reshape(B, n_chunks, chunk, *x.shape[2:]),
                                       1, 0)

    def chunk_topk(args):
        t0, q_BPNH, weights_BPN, first_BP = args
        if fused:
            return indexer_topk_gpu.fused_topk(q_BPNH, k_BCH, weights_BPN, first_BP, t0, ratio=ratio,
                                               topk=min(topk, C), blocks=blocks, interpret=lowering.interpret)
        if lowering.impl == "xla":
            scores_BPC = indexer_scores_reference(q_BPNH, k_BCH, weights_BPN, ratio=ratio, token_offset=t0)
        else:
            scores_BPC = _ENGINES[lowering.impl].forward(
                q_BPNH, k_BCH, weights_BPN, t0, ratio=ratio, blocks=blocks,
                interpret=lowering.interpret)
        scores_BPC = jnp.where(jnp.arange(C) >= first_BP[:, :, None], scores_BPC, -jnp.inf)
        best_BPK, idx_BPK = lax.top_k(scores_BPC, min(topk, C))
        return jnp.where(jnp.isneginf(best_BPK), -1, idx_BPK).astype(jnp.int32)

    starts = jnp.arange(n_chunks, dtype=jnp.int32) * chunk
    # [n_chunks, B, P, K]
    idx_chunks = lax.map(chunk_topk, (starts, to_chunks(q_BTNH), to_chunks(weights_BTN), to_chunks(first_BT)))
    idx_BTK = jnp.moveaxis(idx_chunks, 0, 1).reshape(B, n_chunks * chunk, -1)[:, :T]
    return pad_axis(idx_BTK, 2, topk, value=-1)
