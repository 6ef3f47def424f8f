"""Which blocks a dense flash-attention tile walks, shared by the Triton (`flash_gpu`), Mosaic TPU
(`flash_tpu`) and Mosaic GPU (`flash_hopper_*`) kernels: the key blocks a row block sees (future blocks
and blocks left of the window are never visited, so the cost per token of a sliding window is flat in
the sequence), the row blocks that see a key block, and the blocks seen whole, which need no mask.

Rows are (token, group head) pairs, token major (row r is token r // groups); bq rows and bk keys a block.
"""
from __future__ import annotations

import functools

import jax.numpy as jnp
from jax import lax


def key_block_range(i, *, bq: int, bk: int, groups: int, tokens: int, window: int):
    """[lo, hi) key blocks holding a key visible to some row of row block i (causal + window)."""
    first_t = lax.div(i * bq, groups)
    last_t = jnp.minimum(lax.div(i * bq + bq - 1, groups), tokens - 1)
    hi = lax.div(last_t, bk) + 1
    lo = lax.div(jnp.maximum(first_t - window + 1, 0), bk) if window else jnp.zeros_like(hi)
    return lo, jnp.maximum(hi, lo)


def row_block_range(j, *, bq: int, bk: int, groups: int, tokens: int, window: int, n_row_blocks: int):
    """[lo, hi) row blocks holding a row that sees some key of key block j."""
    first_t = j * bk
    last_t = jnp.minimum(first_t + bk - 1 + (window - 1 if window else tokens), tokens - 1)
    lo = lax.div(first_t * groups, bq)
    hi = jnp.minimum(lax.div((last_t + 1) * groups - 1, bq) + 1, n_row_blocks)
    return lo, jnp.maximum(hi, lo)


def _split(lo, hi, lo_full, hi_full):
    """[lo, hi) cut into [lo, a) + [a, b) + [b, hi), where [a, b) lies within [lo_full, hi_full)."""
    a = jnp.clip(lo_full, lo, hi)
    return a, jnp.clip(hi_full, a, hi)


def whole_key_blocks(i, lo, hi, *, bq: int, bk: int, groups: int, window: int):
    """[a, b) within the key blocks [lo, hi) of row block i that every row sees whole (no mask needed):
    each key at or before the block's first token and, with a window, within it of its last token."""
    first_t, last_t = lax.div(i * bq, groups), lax.div(i * bq + bq - 1, groups)
    lo_full = lax.div(jnp.maximum(last_t - window + 1, 0) + bk - 1, bk) if window else lo
    return _split(lo, hi, lo_full, lax.div(first_t + 1, bk))


def whole_row_blocks(j, lo, hi, *, bq: int, bk: int, groups: int, window: int):
    """[a, b) within the row blocks [lo, hi) that see all of key block j: each row's token at or after the
    block's last key and, with a window, within it of the block's first key."""
    lo_full = lax.div((j * bk + bk - 1) * groups + bq - 1, bq)
    return _split(lo, hi, lo_full, lax.div((j * bk + window) * groups, bq) if window else hi)


def walk_blocks(lo, hi, whole, step, carry, segmented: bool):
    """fori_loop of step(j, carry, masked) over blocks [lo, hi): unmasked over the `whole` range (a, b)
    unless segment ids call for the mask everywhere."""
    if segmented:
        return lax.fori_loop(lo, hi, functools.partial(step, masked=True), carry)
    a, b = whole
    carry = lax.fori_loop(lo, a, functools.partial(step, masked=True), carry)
    carry = lax.fori_loop(a, b, functools.partial(step, masked=False), carry)
    return lax.fori_loop(b, hi, functools.partial(step, masked=True), carry)
