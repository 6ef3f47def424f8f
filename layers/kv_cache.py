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


def take_rows(x_BA: jax.Array, start_B: jax.Array, size: int) -> jax.Array:
    """[B, size, ...]: x[b, start_B[b] : start_B[b] + size] per row."""
    return jax.vmap(lambda x, s: jax.lax.dynamic_slice_in_dim(x, s, size, axis=0))(x_BA, start_B)


def put_rows(x_BA: jax.Array, new_BT: jax.Array, start_B: jax.Array) -> jax.Array:
    """x with new[b] written at x[b, start_B[b]:] per row."""
    return jax.vmap(lambda x, n, s: jax.lax.dynamic_update_slice_in_dim(x, n, s, axis=0))(
        x_BA, new_BT.astype(x_BA.dtype), start_B)
