"""Decoding with each layer kind's cache (zoo.inference): prefill in chunks plus token-by-token decode give
the logits of one full forward pass, for every family and every hybrid preset; the caches hold what their
kinds promise (a ring of `window` slots, nothing for a KV-shared layer); `generate` gives each row of a
batch the tokens it gets alone, samples reproducibly, and rejects bad input with one clear error."""
from __future__ import annotations

import functools
import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import zoo
from configs.hybrid import get_config as hybrid_config
from zoo import inference

T, PROMPT, CHUNK, WINDOW = 29, 13, 5, 8   # ring of 8 wraps; chunks of 5 split ratio-4 and ratio-8 windows


def _small(family: str, preset: str = "tiny"):
    """The family's tiny preset (or a hybrid preset) with 8-token windows, ratio-8 heavy compression and a
    64-token vocabulary, so a 29-token sequence wraps every ring and crosses several compression windows."""
    if family == "hybrid":
        m = hybrid_config(preset).model
    else:
        m = importlib.import_module(f"configs.{family}").get_config(preset).model
    m.vocab_size = 64
    if "windows" in m:
        m.windows = tuple(WINDOW if w else 0 for w in m.windows) if isinstance(m.windows, tuple) else WINDOW
    if "window" in m:
        m.window = WINDOW
    if "hca_ratio" in m:
        m.hca_ratio = 8
    if "index_heads" in m:   # >= 6 index heads: no exact ReLU ties among the indexer's scores
        m.index_heads, m.index_top_k = 8, 3
    if family == "gemma4":
        m.k_eq_v = tuple(t == "full" for t in m.attention_types)
    if "mtp_depth" in m:
        m.mtp_depth = 0
    return m


CASES = [("gemma4", "tiny"), ("laguna", "tiny"), ("zaya1", "tiny"), ("deepseek_v4", "tiny"),
         ("hybrid", "laguna_cca"), ("hybrid", "deepseek_shared"), ("hybrid", "gemma_hca")]


def _jitted_extend(model):
    graphdef, state = nnx.split(model)

    @jax.jit
    def run(state, tokens_BT, cache, new_B):
        return nnx.merge(graphdef, state).extend(tokens_BT, cache, new_B)

    return functools.partial(run, state)


@pytest.mark.parametrize("family,preset", CASES)
def test_prefill_and_decode_equal_the_forward_pass(family, preset):
    m = _small(family, preset)
    model = zoo.build(m, seed=1)
    tokens_BT = jnp.asarray(np.random.default_rng(0).integers(0, m.vocab_size, (2, T)), jnp.int32)
    want_BTV = jax.jit(lambda t: model(t))(tokens_BT)
    extend = _jitted_extend(model)
    cache = inference.init_cache(model, batch_size=2, max_len=T)
    got = []
    for start in range(0, PROMPT, CHUNK):   # the last chunk is padded: 3 real tokens of 5
        chunk_BT = jnp.pad(tokens_BT[:, start:start + CHUNK], [(0, 0), (0, max(0, start + CHUNK - PROMPT))])
        n = min(CHUNK, PROMPT - start)
        logits_BTV, cache = extend(chunk_BT, cache, jnp.full((2,), n, jnp.int32))
        got.append(logits_BTV[:, :n])
    for t in range(PROMPT, T):
        logits_BTV, cache = extend(tokens_BT[:, t:t + 1], cache, jnp.ones((2,), jnp.int32))
        got.append(logits_BTV)
    got_BTV = jnp.concatenate(got, axis=1)
    np.testing.assert_array_equal(np.asarray(cache["lengths_B"]), [T, T])
    diff = float(jnp.max(jnp.abs(got_BTV - want_BTV)))
    assert diff <= 1e-4, f"{family}:{preset}: decode differs from the forward pass by {diff}"
