"""Sequence compression for long-context attention: gated pooling of every `ratio` tokens into one
compressed entry, and the lightning indexer that picks, per query, the entries worth attending to.

Shapes: B batch, T tokens, R ratio, C = T // R compressed entries, D model width, H entry dim,
F projected channels (H, or 2H for overlapping windows), N index heads, K selected entries.

Compressor; window s is the tokens [s R, (s + 1) R):
    kv, z = x W_kv, x W_z + b[t mod R]                 [B, T, F], b: a learned bias per window slot
    e_s   = sum_t softmax_t(z_t) kv_t                  per channel, over the tokens of the window
    e_s   = rope(rmsnorm(e_s), position of window s's first token)
Overlapping windows (F = 2H) pool 2R tokens: the first H channels of window s - 1's tokens and the last
H channels of window s's own (window 0 has nothing before it). Every entry is complete when its window
ends, so entry s is visible to query t iff s < (t + 1) // R. With segment ids, an entry belongs to the
segment of its window's last token: it pools only that segment's tokens (never padding, id 0) and only
that segment's queries see it.

Lightning indexer (own overlapping compressor K_I at the index width):
    q_I    = rope(qr W_qI)                             [B, T, N, H_I] from the query's low-rank latent qr
    w      = x W_w * H_I^-1/2 * N^-1/2                 [B, T, N]
    I[t,s] = sum_n w[t, n] relu(q_I[t, n] . K_I[s])    over visible entries
    top-k entries per query; slots left without a visible entry hold -1.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from layers import params
from layers import kv_cache
from layers.kv_cache import chunk_positions, put_rows, take_rows
from layers.norms import RMSNorm
from layers.partitioning import UNPARTITIONED, Partitioning
from layers.rope import RopeSpec, apply_rope_tail
from pallas_kernels import indexer_decode_topk, indexer_topk


def entry_segments(segment_ids_BT: jax.Array, ratio: int) -> jax.Array:
    """[B, C]: the segment of each window's last token."""
    C = segment_ids_BT.shape[1] // ratio
    return segment_ids_BT[:, ratio - 1:C * ratio:ratio]


def entry_visibility(num_tokens: int, num_entries: int, ratio: int, segment_ids_BT: jax.Array | None = None
                     ) -> jax.Array:
    """Boolean [B or 1, T, C]: entry s is complete before query t (s < (t + 1) // ratio) and, with
    segment ids, belongs to t's segment (never to padding)."""
    t_T1, s_1C = jnp.arange(num_tokens)[:, None], jnp.arange(num_entries)[None, :]
    visible_1TC = (s_1C < (t_T1 + 1) // ratio)[None]
    if segment_ids_BT is None:
        return visible_1TC
    entry_seg_B1C = entry_segments(segment_ids_BT, ratio)[:, None, :num_entries]
    return visible_1TC & (entry_seg_B1C == segment_ids_BT[:, :, None]) & (entry_seg_B1C != 0)


def _masked_softmax(logits: jax.Array, valid: jax.Array, axis: int) -> jax.Array:
    """softmax over the valid entries of `axis`; all zeros where none is valid."""
    logits = jnp.where(valid, logits, -jnp.inf)
    top = jax.lax.stop_gradient(jnp.max(logits, axis=axis, keepdims=True))
    e = jnp.where(valid, jnp.exp(logits - jnp.where(jnp.isfinite(top), top, 0.0)), 0.0)
    total = jnp.sum(e, axis=axis, keepdims=True)
    return e / jnp.where(total > 0, total, 1.0)


class Compressor(nnx.Module):
    """Pools every `ratio` tokens into one RMS-normalised, rotated entry of width `dim` (see the module
    docstring); `overlap` makes each entry also pool the previous window with its own channels."""

    def __init__(self, d_model: int, dim: int, ratio: int, *, overlap: bool, rope: RopeSpec, rope_dim: int,
                 eps: float = 1e-6, fp4_cache: bool = False, rngs: nnx.Rngs):
        if ratio < 1 or not 0 < rope_dim <= dim:
            raise ValueError(f"compressor needs ratio >= 1 and 0 < rope_dim <= dim, got ratio={ratio}, "
                             f"rope_dim={rope_dim}, dim={dim}")
        self.dim, self.ratio, self.overlap, self.rope, self.rope_dim = dim, ratio, overlap, rope, rope_dim
        self.fp4_cache = fp4_cache   # a float8 cache keeps these entries as fp4 keys (an indexer's), else fp8
        F = 2 * dim if overlap else dim
        self.kv_proj = params.normal(rngs, (d_model, F), ("embed", "compress_kv"))
        self.gate_proj = params.normal(rngs, (d_model, F), ("embed", "compress_kv"))
        self.position_bias = params.zeros((ratio, F), ("compress_slot", "compress_kv"))
        self.norm = RMSNorm(dim, eps=eps, axis_name="compress_dim")

    def __call__(self, x_BTD: jax.Array, positions_BT: jax.Array, segment_ids_BT: jax.Array | None = None
                 ) -> jax.Array:
        """Entries [B, C, H] in x's dtype; the tokens after the last complete window are not pooled."""
        B, T, _ = x_BTD.shape
        R = self.ratio
        C = T // R
        x_BTD = x_BTD[:, :C * R]
        kv_BTF, gate_BTF = self.project(x_BTD, jnp.arange(C * R))
        kv_BCRF, gate_BCRF = kv_BTF.reshape(B, C, R, -1), gate_BTF.reshape(B, C, R, -1)
        if segment_ids_BT is None:
            valid_BCR = jnp.ones((B, C, R), bool)
        else:
            seg_BCR = segment_ids_BT[:, :C * R].reshape(B, C, R)
            entry_seg_BC1 = entry_segments(segment_ids_BT, R)[:, :, None]
            valid_BCR = (seg_BCR == entry_seg_BC1) & (seg_BCR != 0)
        if self.overlap:
            shift = lambda a: jnp.pad(a[:, :-1], [(0, 0), (1, 0)] + [(0, 0)] * (a.ndim - 2))  # window s-1 at s
            prev_valid_BCR = shift(valid_BCR) & (jnp.arange(C) > 0)[None, :, None]
            if segment_ids_BT is not None:   # the previous window's tokens must be of this entry's segment
                prev_valid_BCR &= shift(seg_BCR) == entry_seg_BC1
            return self.pool(shift(kv_BCRF), shift(gate_BCRF), prev_valid_BCR, kv_BCRF, gate_BCRF, valid_BCR,
                             positions_BT[:, R - 1:C * R:R] - (R - 1), x_BTD.dtype)
        # first positions: robust to padding in front of the window
        return self.pool(None, None, None, kv_BCRF, gate_BCRF, valid_BCR, positions_BT[:, R - 1:C * R:R] - (R - 1),
                         x_BTD.dtype)

    def project(self, x_BTD: jax.Array, slots_T: jax.Array) -> tuple[jax.Array, jax.Array]:
        """float32 kv and gate [B, T, F] of each token; `slots_T` (position mod ratio) picks the gate's
        window-slot bias."""
        kv_BTF = jnp.einsum("BTD,DF->BTF", x_BTD, self.kv_proj[...], preferred_element_type=jnp.float32)
        gate_BTF = jnp.einsum("BTD,DF->BTF", x_BTD, self.gate_proj[...], preferred_element_type=jnp.float32)
        bias_TC = self.position_bias[...].astype(jnp.float32)[jnp.mod(slots_T, self.ratio)]
        return kv_BTF, gate_BTF + bias_TC

    def pool(self, prev_kv_BCRF, prev_gate_BCRF, prev_valid_BCR, kv_BCRF, gate_BCRF, valid_BCR, first_BC, dtype
             ) -> jax.Array:
        """Entries [B, C, H] from the projected windows (and, overlapping, the windows before them, whose
        first H channels join in); `first_BC` is the position of each window's first token."""
        H = self.dim
        if self.overlap:
            kv_BCRF = jnp.concatenate([prev_kv_BCRF[..., :H], kv_BCRF[..., H:]], axis=2)
            gate_BCRF = jnp.concatenate([prev_gate_BCRF[..., :H], gate_BCRF[..., H:]], axis=2)
            valid_BCR = jnp.concatenate([prev_valid_BCR, valid_BCR], axis=2)
        weights_BCRH = _masked_softmax(gate_BCRF, valid_BCR[..., None], axis=2)
        entries_BCH = jnp.einsum("BCRH,BCRH->BCH", weights_BCRH, kv_BCRF).astype(dtype)
        entries_BCH = self.norm(entries_BCH)
        return apply_rope_tail(entries_BCH[:, :, None], first_BC, self.rope, self.rope_dim)[:, :, 0]

    def cache_spec(self, batch: int, max_len: int, dtype) -> dict:
        """Every entry of `max_len` tokens, and the projected tokens of the window being filled (after
        the window before it, whose channels an overlapping entry also pools). A float8 `dtype` packs the
        entries (layers.kv_cache.packed_spec: fp8 + block scales + bf16 RoPE part, or fp4 keys)."""
        F = self.kv_proj.shape[1]
        pending = jax.ShapeDtypeStruct((batch, (2 if self.overlap else 1) * self.ratio, F), jnp.float32)
        C = max_len // self.ratio
        entries = (kv_cache.packed_spec((batch, C), self.dim, rope_dim=self.rope_dim, fp4=self.fp4_cache)
                   if jnp.dtype(dtype) == kv_cache.FP8 else jax.ShapeDtypeStruct((batch, C, self.dim), dtype))
        return {"entries_BCH": entries,
                "pending_kv_BPF": pending, "pending_gate_BPF": pending}

    def extend(self, x_BTD: jax.Array, cache: dict, lengths_B: jax.Array, new_B: jax.Array) -> dict:
        """The cache after the first new_B tokens of each row of x [B, T, D] follow its L_B tokens: the
        windows they complete become entries, the rest wait in the pending buffer.

        The pending buffer holds positions [w0 - O, w0 + R) with w0 = R floor(L / R) (O = R overlapping,
        else 0). The chunk is placed behind it in a buffer of whole windows, every window of it is pooled,
        and the complete ones are written (the others dropped)."""
        B, T, _ = x_BTD.shape
        R, O = self.ratio, self.ratio if self.overlap else 0
        C_max = jax.tree.leaves(cache["entries_BCH"])[0].shape[1]
        n = T // R + 2                                    # windows the chunk can touch, and one spare
        lengths_B = lengths_B.astype(jnp.int32)
        w0_B = lengths_B - jnp.mod(lengths_B, R)
        kv_BTF, gate_BTF = self.project(x_BTD, chunk_positions(lengths_B, T))
        buffers = []
        for pending_BPF, new_BTC in ((cache["pending_kv_BPF"], kv_BTF), (cache["pending_gate_BPF"], gate_BTF)):
            buf_BAF = jnp.concatenate([pending_BPF, jnp.zeros((B, n * R, pending_BPF.shape[-1]), jnp.float32)], 1)
            buffers.append(put_rows(buf_BAF, new_BTC, O + lengths_B - w0_B))
        kv_BAF, gate_BAF = buffers
        pos_BA = (w0_B - O)[:, None] + jnp.arange(O + (n + 1) * R)[None]
        valid_BA = (pos_BA >= 0) & (pos_BA < (lengths_B + new_B)[:, None])
        cur = lambda a: a[:, O:O + n * R].reshape(B, n, R, *a.shape[2:])
        prev = lambda a: a[:, :n * R].reshape(B, n, R, *a.shape[2:])
        first_Bn = w0_B[:, None] + R * jnp.arange(n)[None]
        stored = cache["entries_BCH"]
        packed = kv_cache.is_packed(stored)
        entries_BnH = self.pool(prev(kv_BAF), prev(gate_BAF), prev(valid_BA), cur(kv_BAF), cur(gate_BAF),
                                cur(valid_BA), first_Bn, x_BTD.dtype if packed else stored.dtype)
        complete_Bn = first_Bn + R <= (lengths_B + new_B)[:, None]
        rows_Bn = jnp.where(complete_Bn, first_Bn // R, C_max)   # C_max: dropped
        entries_BCH = (kv_cache.write_rows(stored, rows_Bn, entries_BnH) if packed else
                       stored.at[jnp.arange(B)[:, None], rows_Bn].set(entries_BnH, mode="drop"))
        ends_B = lengths_B + new_B
        start_B = ends_B - jnp.mod(ends_B, R) - w0_B           # the new w0, in buffer rows (before O)
        return {"entries_BCH": entries_BCH, "pending_kv_BPF": take_rows(kv_BAF, start_B, O + R),
                "pending_gate_BPF": take_rows(gate_BAF, start_B, O + R)}


def indexer_scores(q_BTNH: jax.Array, k_BCH: jax.Array, weights_BTN: jax.Array, *, ratio: int,
                   segment_ids_BT: jax.Array | None = None) -> jax.Array:
    """float32 [B, T, C]: sum_n weights[t, n] relu(q[t, n] . k[s]) over visible entries, -inf elsewhere
    (the scales are folded into `weights`)."""
    dots_BTNC = jnp.einsum("BTNH,BCH->BTNC", q_BTNH, k_BCH, preferred_element_type=jnp.float32)
    scores_BTC = jnp.einsum("BTNC,BTN->BTC", jax.nn.relu(dots_BTNC), weights_BTN.astype(jnp.float32))
    visible = entry_visibility(q_BTNH.shape[1], k_BCH.shape[1], ratio, segment_ids_BT)
    return jnp.where(visible, scores_BTC, -jnp.inf)


def top_k_entries(scores_BTC: jax.Array, k: int) -> jax.Array:
    """int32 [B, T, min(k, C)]: the best-scoring entries (-inf scores mark invisible ones), best first;
    slots without a visible entry hold -1."""
    top_BTK, idx_BTK = jax.lax.top_k(jax.lax.stop_gradient(scores_BTC), min(k, scores_BTC.shape[-1]))
    return jnp.where(jnp.isneginf(top_BTK), -1, idx_BTK).astype(jnp.int32)


class LightningIndexer(nnx.Module):
    """Picks the `top_k` compressed entries each query attends to (see the module docstring). `fused_topk`:
    the Pallas path selects while scoring (`pallas_kernels.indexer_topk(fused=True)`)."""

    def __init__(self, d_model: int, q_rank: int, num_heads: int, head_dim: int, ratio: int, top_k: int, *,
                 overlap: bool, rope: RopeSpec, rope_dim: int, eps: float = 1e-6, fused_topk: bool = False,
                 rngs: nnx.Rngs):
        self.num_heads, self.head_dim, self.ratio, self.top_k = num_heads, head_dim, ratio, top_k
        self.fused_topk = bool(fused_topk)
        self.rope, self.rope_dim = rope, rope_dim
        self.compressor = Compressor(d_model, head_dim, ratio, overlap=overlap, rope=rope, rope_dim=rope_dim,
                                     eps=eps, fp4_cache=True, rngs=rngs)
        self.q_proj = params.normal(rngs, (q_rank, num_heads, head_dim), ("q_lora", "index_heads", "index_dim"))
        self.weights_proj = params.normal(rngs, (d_model, num_heads), ("embed", "index_heads"))

    def __call__(self, x_BTD: jax.Array, qr_BTQ: jax.Array, positions_BT: jax.Array,
                 segment_ids_BT: jax.Array | None = None, *, kernel: str | None = None,
                 partitioning: Partitioning = UNPARTITIONED) -> jax.Array:
        """int32 [B, T, min(top_k, C)] entry indices, -1 for unused slots. `kernel` ("pallas_gpu" or
        "pallas_tpu") scores through the Pallas indexer in chunks of tokens, never holding [B, T, C]
        scores; its result has `top_k` slots (segments there are runs of equal ids)."""
        keys_BCH = self.compressor(x_BTD, positions_BT, segment_ids_BT)
        q_BTNH, weights_BTN = self._queries(x_BTD, qr_BTQ, positions_BT)
        if kernel:   # a token's score sums over the index heads: only rows split over a mesh
            top = lambda q, keys, weights, seg: indexer_topk(q, keys, weights, ratio=self.ratio, topk=self.top_k,
                                                             segment_ids_BT=seg, impl=kernel,
                                                             fused=self.fused_topk)
            rows = ("batch", None, None)
            in_axes = (rows + (None,), rows, rows, None if segment_ids_BT is None else ("batch", None))
            return partitioning.per_shard(top, in_axes, rows)(q_BTNH, keys_BCH.astype(q_BTNH.dtype), weights_BTN,
                                                              segment_ids_BT)
        scores_BTC = indexer_scores(q_BTNH, keys_BCH, weights_BTN, ratio=self.ratio, segment_ids_BT=segment_ids_BT)
        return top_k_entries(scores_BTC, self.top_k)

    def _queries(self, x_BTD, qr_BTQ, positions_BT) -> tuple[jax.Array, jax.Array]:
        """The index queries [B, T, N, H_I] and their head weights [B, T, N] (float32, scales folded in)."""
        q_BTNH = jnp.einsum("BTQ,QNH->BTNH", qr_BTQ, self.q_proj[...])
        q_BTNH = apply_rope_tail(q_BTNH, positions_BT, self.rope, self.rope_dim)
        weights_BTN = jnp.einsum("BTD,DN->BTN", x_BTD, self.weights_proj[...],
                                 preferred_element_type=jnp.float32)
        return q_BTNH, weights_BTN * (self.head_dim ** -0.5 * self.num_heads ** -0.5)

    def cache_spec(self, batch: int, max_len: int, dtype) -> dict:
        """The index keys of every compressed entry and the pending window of the indexer's compressor."""
        return self.compressor.cache_spec(batch, max_len, dtype)

    def extend(self, x_BTD: jax.Array, qr_BTQ: jax.Array, positions_BT: jax.Array, cache: dict,
               lengths_B: jax.Array, new_B: jax.Array, *, kernel: str | None = None) -> tuple[jax.Array, dict]:
        """Decoding: the chunk's index keys join the cache, then each query picks its top-k among all the
        cached keys visible to it. Returns int32 indices [B, T, min(top_k, C)] (-1: unused) and the cache.
        Ties (e.g. entries that all score exactly 0.0 after the ReLU) go to the lowest entry index, as in
        the forward pass: both rank with `lax.top_k` over entries in position order. `kernel`
        ("pallas_gpu" or "pallas_tpu") scores through the indexer's kernel (pallas_kernels.indexer_decode_topk,
        `top_k` slots)."""
        cache = self.compressor.extend(x_BTD, cache, lengths_B, new_B)
        q_BTNH, weights_BTN = self._queries(x_BTD, qr_BTQ, positions_BT)
        keys_BCH = kv_cache.read(cache["entries_BCH"], q_BTNH.dtype)   # unpacked under an fp4 index cache
        if kernel:
            return indexer_decode_topk(q_BTNH, keys_BCH, weights_BTN,
                                       positions_BT.astype(jnp.int32), ratio=self.ratio, topk=self.top_k,
                                       impl=kernel), cache
        dots_BTNC = jnp.einsum("BTNH,BCH->BTNC", q_BTNH, keys_BCH,
                               preferred_element_type=jnp.float32)
        scores_BTC = jnp.einsum("BTNC,BTN->BTC", jax.nn.relu(dots_BTNC), weights_BTN)
        visible_BTC = jnp.arange(keys_BCH.shape[1])[None, None] < ((positions_BT + 1) // self.ratio)[..., None]
        return top_k_entries(jnp.where(visible_BTC, scores_BTC, -jnp.inf), self.top_k), cache
