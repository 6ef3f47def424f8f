"""Per-row key/value storage for decoding: a slot per position (full attention) or a ring of the last
`window` positions (sliding attention), written chunk by chunk.

A chunk is T new tokens per row starting at the row's cache length L_B; only its first `new_B` tokens
are real (rows of a batch advance by different counts, a finished row by 0). Nothing stores positions:
slot j of a ring of size W holds the largest position p < L with p % W == j (none while p < 0), and a
slot of a full cache holds its own position, so both follow from L_B alone.

Shapes: B batch, T new tokens, S cache slots, W ring slots, ... the per-token entry (e.g. [K, H]).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

# The position of an empty ring slot: later than any query, so the causal mask hides it.
EMPTY_POSITION = 2 ** 30


def chunk_positions(lengths_B: jax.Array, num_tokens: int) -> jax.Array:
    """int32 [B, T]: the positions of a chunk of T tokens appended at each row's length."""
    return lengths_B.astype(jnp.int32)[:, None] + jnp.arange(num_tokens, dtype=jnp.int32)[None]


def ring_positions(lengths_B: jax.Array, size: int) -> jax.Array:
    """int32 [B, W]: the position each ring slot holds at cache lengths L_B (EMPTY_POSITION if none)."""
    last_B1 = lengths_B.astype(jnp.int32)[:, None] - 1
    pos_BW = last_B1 - jnp.mod(last_B1 - jnp.arange(size, dtype=jnp.int32)[None], size)
    return jnp.where(pos_BW >= 0, pos_BW, EMPTY_POSITION)


def write_full(cache_BS: jax.Array, new_BT: jax.Array, lengths_B: jax.Array, new_B: jax.Array) -> jax.Array:
    """The cache with the first new_B tokens of each row written at positions L_B .. L_B + new_B - 1."""
    B, T = new_BT.shape[:2]
    S = cache_BS.shape[1]
    slots_BT = chunk_positions(lengths_B, T)
    slots_BT = jnp.where(jnp.arange(T)[None] < new_B[:, None], slots_BT, S)   # S: dropped
    return cache_BS.at[jnp.arange(B)[:, None], slots_BT].set(new_BT.astype(cache_BS.dtype), mode="drop")


def write_ring(ring_BW: jax.Array, new_BT: jax.Array, lengths_B: jax.Array, new_B: jax.Array) -> jax.Array:
    """The ring with the last (at most W) of each row's first new_B tokens written at slot position % W."""
    B, T = new_BT.shape[:2]
    W = ring_BW.shape[1]
    t_1T = jnp.arange(T)[None]
    keep_BT = (t_1T < new_B[:, None]) & (t_1T >= new_B[:, None] - W)   # distinct slots: no write races
    slots_BT = jnp.where(keep_BT, jnp.mod(chunk_positions(lengths_B, T), W), W)
    return ring_BW.at[jnp.arange(B)[:, None], slots_BT].set(new_BT.astype(ring_BW.dtype), mode="drop")


def extend(cache: dict, new: dict, lengths_B: jax.Array, new_B: jax.Array, *, window: int
           ) -> tuple[dict, dict, jax.Array]:
    """Appends a chunk to a full cache (`window` 0) or a ring (its size is the window).

    `cache` and `new` map names to [B, S or W, ...] and [B, T, ...] arrays. Returns what the chunk's
    queries attend over (name -> [B, S', ...]), the key positions [B, S'] (EMPTY_POSITION for empty
    slots) and the updated cache. A full cache is written first and read whole (S' = S); a ring is read
    before it is written, followed by the chunk itself (S' = W + T), so a chunk longer than the ring
    still sees every key its window needs.
    """
    T = next(iter(new.values())).shape[1]
    if not window:
        updated = {k: write_full(cache[k], new[k], lengths_B, new_B) for k in cache}
        S = next(iter(cache.values())).shape[1]
        return updated, jnp.broadcast_to(jnp.arange(S, dtype=jnp.int32), (lengths_B.shape[0], S)), updated
    W = next(iter(cache.values())).shape[1]
    seen = {k: jnp.concatenate([cache[k], new[k].astype(cache[k].dtype)], axis=1) for k in cache}
    pos_BS = jnp.concatenate([ring_positions(lengths_B, W), chunk_positions(lengths_B, T)], axis=1)
    updated = {k: write_ring(cache[k], new[k], lengths_B, new_B) for k in cache}
    return seen, pos_BS, updated


def ring_as_sequence(seen_BS: list[jax.Array], kv_positions_BS: jax.Array, num_tokens: int
                     ) -> tuple[list[jax.Array], jax.Array]:
    """What a chunk of T tokens sees through a ring, [W ring slots; the chunk] (`extend`), as one causal
    sequence: the ring's slots put in position order, its empty slots first, so slot i holds the position
    W - i before the chunk's first token. Returns the arrays [B, W + T, ...] so ordered and segment ids
    int32 [B, W + T] (0 for the empty slots, as padding; 1 elsewhere). Causal attention with window W over
    the sequence is the chunk's windowed attention over the ring and itself, for the fused kernels."""
    W = kv_positions_BS.shape[1] - num_tokens
    ring_pos_BW = kv_positions_BS[:, :W]
    empty_BW = ring_pos_BW >= EMPTY_POSITION
    order_BW = jnp.argsort(jnp.where(empty_BW, -1, ring_pos_BW), axis=1)

    def in_order(x_BS):
        order = order_BW.reshape(order_BW.shape + (1,) * (x_BS.ndim - 2))
        return jnp.concatenate([jnp.take_along_axis(x_BS[:, :W], order, axis=1), x_BS[:, W:]], axis=1)

    filled_BW = jnp.take_along_axis(~empty_BW, order_BW, axis=1)
    segment_ids_BS = jnp.concatenate([filled_BW.astype(jnp.int32),
                                      jnp.ones((kv_positions_BS.shape[0], num_tokens), jnp.int32)], axis=1)
    return [in_order(x) for x in seen_BS], segment_ids_BS


def take_rows(x_BA: jax.Array, start_B: jax.Array, size: int) -> jax.Array:
    """[B, size, ...]: x[b, start_B[b] : start_B[b] + size] per row."""
    return jax.vmap(lambda x, s: jax.lax.dynamic_slice_in_dim(x, s, size, axis=0))(x_BA, start_B)


def put_rows(x_BA: jax.Array, new_BT: jax.Array, start_B: jax.Array) -> jax.Array:
    """x with new[b] written at x[b, start_B[b]:] per row."""
    return jax.vmap(lambda x, n, s: jax.lax.dynamic_update_slice_in_dim(x, n, s, axis=0))(
        x_BA, new_BT.astype(x_BA.dtype), start_B)


# ---- packed low-precision entries (DeepSeek-V4's native cache precision) -------------------------------
# An fp8 entry of width H: its first H - R channels (no RoPE) as float8_e4m3fn in blocks of FP8_BLOCK, each
# block's scale a power of two stored as one biased exponent byte (e8m0) among SCALE_BYTES bytes, and the
# last R (RoPE) channels in bfloat16: (H - R) + 8 + 2R bytes. An fp4 key of width H: float4 e2m1 codes, two
# per byte, with one e8m0 scale byte per FP4_BLOCK values: H / 2 + H / 32 bytes.

FP8 = jnp.float8_e4m3fn
FP8_BLOCK, FP4_BLOCK, SCALE_BYTES = 64, 32, 8
_FP8_MAX, _FP4_MAX = 448.0, 6.0
_FP4_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)


def is_packed(leaf) -> bool:
    """Whether a cache leaf is a packed entry (a dict of its parts) rather than a plain array."""
    return isinstance(leaf, dict)


def packed_spec(shape: tuple[int, ...], dim: int, *, rope_dim: int = 0, fp4: bool = False) -> dict:
    """The parts (jax.ShapeDtypeStruct) of packed entries of width `dim` at leading `shape` (e.g. (B, C))."""
    if fp4:
        if dim % FP4_BLOCK:
            raise ValueError(f"fp4 keys need a width divisible by {FP4_BLOCK}, got {dim}")
        return {"codes_fp4x2": jax.ShapeDtypeStruct((*shape, dim // 2), jnp.uint8),
                "scales_e8m0": jax.ShapeDtypeStruct((*shape, dim // FP4_BLOCK), jnp.uint8)}
    nope = dim - rope_dim
    if -(-nope // FP8_BLOCK) > SCALE_BYTES:
        raise ValueError(f"fp8 entries keep {SCALE_BYTES} block scales of {FP8_BLOCK} channels: at most "
                         f"{SCALE_BYTES * FP8_BLOCK} non-RoPE channels, got {nope}")
    return {"values_fp8": jax.ShapeDtypeStruct((*shape, nope), FP8),
            "scales_e8m0": jax.ShapeDtypeStruct((*shape, SCALE_BYTES), jnp.uint8),
            "rope_bf16": jax.ShapeDtypeStruct((*shape, rope_dim), jnp.bfloat16)}


def _block_exponents(x_blocks: jax.Array, top: float) -> jax.Array:
    """int32 biased exponents e (scale 2^(e - 127), in [1, 254]) putting each block's max |x| <= top."""
    amax = jnp.max(jnp.abs(x_blocks), axis=-1)
    e = jnp.ceil(jnp.log2(jnp.maximum(amax, 1e-30) / top)).astype(jnp.int32) + 127
    return jnp.clip(e, 1, 254)


def _scale(e: jax.Array) -> jax.Array:
    return jnp.exp2((e.astype(jnp.int32) - 127).astype(jnp.float32))


def pack(x: jax.Array, like: dict) -> dict:
    """Entries x [..., H] in the packed layout of `like` (a packed spec or packed entries)."""
    x = x.astype(jnp.float32)
    lead = x.shape[:-1]
    if "codes_fp4x2" in like:
        blocks = x.reshape(*lead, -1, FP4_BLOCK)
        e = _block_exponents(blocks, _FP4_MAX)
        v = blocks / _scale(e)[..., None]
        mids = jnp.asarray([(a + b) / 2 for a, b in zip(_FP4_VALUES, _FP4_VALUES[1:])], jnp.float32)
        codes = jnp.searchsorted(mids, jnp.abs(v)).astype(jnp.uint8) | jnp.where(v < 0, 8, 0).astype(jnp.uint8)
        codes = codes.reshape(*lead, -1, 2)
        return {"codes_fp4x2": codes[..., 0] | (codes[..., 1] << 4), "scales_e8m0": e.astype(jnp.uint8)}
    nope = like["values_fp8"].shape[-1]
    body, rope = x[..., :nope], x[..., nope:]
    blocks = -(-nope // FP8_BLOCK)
    padded = jnp.pad(body, [(0, 0)] * len(lead) + [(0, blocks * FP8_BLOCK - nope)]).reshape(*lead, blocks, FP8_BLOCK)
    e = _block_exponents(padded, _FP8_MAX)
    values = (padded / _scale(e)[..., None]).reshape(*lead, -1)[..., :nope].astype(FP8)
    scales = jnp.pad(e, [(0, 0)] * len(lead) + [(0, SCALE_BYTES - blocks)]).astype(jnp.uint8)
    return {"values_fp8": values, "scales_e8m0": scales, "rope_bf16": rope.astype(jnp.bfloat16)}


def unpack(packed: dict, dtype) -> jax.Array:
    """Packed entries back as [..., H] in `dtype`."""
    if "codes_fp4x2" in packed:
        codes = packed["codes_fp4x2"]
        lead = codes.shape[:-1]
        nibbles = jnp.stack([codes & 15, codes >> 4], axis=-1).reshape(*lead, -1, FP4_BLOCK)
        table = jnp.asarray(_FP4_VALUES + tuple(-v for v in _FP4_VALUES), jnp.float32)
        values = table[nibbles.astype(jnp.int32)] * _scale(packed["scales_e8m0"])[..., None]
        return values.reshape(*lead, -1).astype(dtype)
    values = packed["values_fp8"]
    lead, nope = values.shape[:-1], values.shape[-1]
    blocks = -(-nope // FP8_BLOCK)
    scale = jnp.repeat(_scale(packed["scales_e8m0"][..., :blocks]), FP8_BLOCK, axis=-1)[..., :nope]
    body = values.astype(jnp.float32) * scale
    return jnp.concatenate([body, packed["rope_bf16"].astype(jnp.float32)], axis=-1).astype(dtype)


def write_rows(packed: dict, rows_BN: jax.Array, new_BNH: jax.Array) -> dict:
    """Packed entries with new [B, N, H] written at rows_BN[b, n] of row b (out-of-range rows dropped)."""
    new = pack(new_BNH, packed)
    B = rows_BN.shape[0]
    return {k: packed[k].at[jnp.arange(B)[:, None], rows_BN].set(new[k], mode="drop") for k in packed}


def read(leaf, dtype) -> jax.Array:
    """A cache leaf's entries [..., H] in `dtype`, unpacked if packed."""
    return unpack(leaf, dtype) if is_packed(leaf) else leaf.astype(dtype)
