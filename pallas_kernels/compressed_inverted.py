"""The inverted index of CSA's top-k: for each block of compressed entries, the tokens that selected any of
them, so that a key-major backward kernel can walk them (each entry's dK=dV summed in one program, no
scatter into shared rows). Plain JAX, built once per backward; both lowerings read it.

Layout (per batch row; M = T * K selections, "pair" = one (entry block, token) with >= 1 selection):
  block_start [NB + 1]  pairs of entry block cb are [block_start[cb], block_start[cb + 1])
  pair_token  [M + 2]   the token of each pair; pairs sorted by (block, token)
  pair_start  [M + 2]   the pair's selections are entries[pair_start[p] : pair_start[p + 1]]
  entries     [M + pad] the selected entry ids sorted by (block, token, slot), -1 after the last one
  selections  [M + pad] where each of them sits in the top-k, t * K + slot (0 after the last one)

Shapes: B batch, T tokens, K top-k slots, M = T * K, NB entry blocks.
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp


class InvertedIndex(NamedTuple):
    block_start: jax.Array   # int32 [B, NB + 1]
    pair_token: jax.Array    # int32 [B, M + 2]
    pair_start: jax.Array    # int32 [B, M + 2]
    entries: jax.Array       # int32 [B, M + pad]
    selections: jax.Array    # int32 [B, M + pad]


def inverted_index(indices_BTK: jax.Array, *, num_blocks: int, block: int, pad: int = 0) -> InvertedIndex:
    """CSR of the top-k by entry block: -1 slots dropped, a slot repeated within a token kept (its entry
    then appears twice in that pair's run). The stable sort keeps tokens ascending within a block and
    slots ascending within a pair. `pad` extra -1 entries let a kernel read whole chunks past the end."""
    B, T, K = indices_BTK.shape
    M = T * K
    flat_BM = indices_BTK.reshape(B, M)
    block_BM = jnp.where(flat_BM >= 0, flat_BM // block, num_blocks)
    order_BM = jnp.argsort(block_BM, axis=1, stable=True)
    block_BM = jnp.take_along_axis(block_BM, order_BM, axis=1)
    entry_BM = jnp.take_along_axis(flat_BM, order_BM, axis=1)
    token_BM = order_BM // K
    shift = lambda x_BM: jnp.pad(x_BM[:, :-1], ((0, 0), (1, 0)), constant_values=-1)
    valid_BM = block_BM < num_blocks
    new_pair_BM = ((block_BM != shift(block_BM)) | (token_BM != shift(token_BM))) & valid_BM
    pair_BM = jnp.cumsum(new_pair_BM, axis=1, dtype=jnp.int32) - 1
    target_BM = jnp.where(new_pair_BM, pair_BM, M + 1)          # slot M + 1 takes the rest, unread
    n_valid_B1 = jnp.sum(valid_BM, axis=1, dtype=jnp.int32, keepdims=True)
    b_B1 = jnp.arange(B)[:, None]
    pair_token = jnp.zeros((B, M + 2), jnp.int32).at[b_B1, target_BM].set(token_BM)
    positions_BM = jnp.broadcast_to(jnp.arange(M, dtype=jnp.int32), (B, M))
    pair_start = jnp.broadcast_to(n_valid_B1, (B, M + 2)).at[b_B1, target_BM].set(positions_BM)
    pairs_per_block = jnp.zeros((B, num_blocks + 1), jnp.int32).at[b_B1, block_BM].add(
        new_pair_BM.astype(jnp.int32))
    block_start = jnp.pad(jnp.cumsum(pairs_per_block[:, :num_blocks], axis=1, dtype=jnp.int32), ((0, 0), (1, 0)))
    entries = jnp.pad(jnp.where(valid_BM, entry_BM, -1), ((0, 0), (0, pad)), constant_values=-1)
    selections = jnp.pad(jnp.where(valid_BM, order_BM, 0).astype(jnp.int32), ((0, 0), (0, pad)))
    return InvertedIndex(block_start, pair_token, pair_start, entries, selections)
