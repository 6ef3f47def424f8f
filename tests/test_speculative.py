"""MTP self-speculative decoding (zoo.speculative): greedy output identical to plain greedy `zoo.generate`
on a tiny DeepSeek-V4 config whose rings wrap and whose compressors cross windows while drafts are
verified, with drafts both accepted and rejected (weights perturbed so that the MTP module's guess often,
not always, agrees with the main model), and rewinds both in place and by re-extending the snapshot
(an HCA compressor's pending window the verified chunk crossed)."""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import zoo
from tests.test_decode import _small
from zoo import speculative

NEW = 24


def _agreeing(model, block_scale: float, embed_scale: float):
    """Shrinks every block's output projections and scales up the embedding, so both the main model and
    the MTP module (identity embedding projection, the main readout) mostly pass the latest token's
    embedding to the head: the draft for t + 2 from token t + 1 then often is the main model's guess."""
    flat = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
    for path, var in flat.items():
        w = var.get_value()
        if path[-1] in ("o_b_proj", "down_proj") or path[-1] == "hidden_proj":
            var.set_value(w * block_scale)
        elif path[-1] == "embed_proj":
            var.set_value(jnp.eye(w.shape[0], dtype=w.dtype))
        elif path == ("embed", "table"):
            var.set_value(w * embed_scale)
        elif path[0] == "mtp" and path[2] in ("hyper_head", "final_norm"):
            var.set_value(flat[path[2:]].get_value())
    return model


def test_mtp_speculation_equals_greedy_decoding():
    m = _small("deepseek_v4")   # window 8, CSA ratio 4, HCA ratio 8, 64-token vocabulary
    m.mtp_depth = 1
    model = _agreeing(zoo.build(m, seed=1), block_scale=0.15, embed_scale=10.0)
    prompts = np.random.default_rng(0).integers(2, m.vocab_size, (3, 11))
    lengths = [11, 6, 9]
    want = np.asarray(zoo.generate(model, prompts, max_new_tokens=NEW, prompt_lengths=lengths, prefill_chunk=5))
    got, stats = speculative.generate_mtp(model, prompts, max_new_tokens=NEW, prompt_lengths=lengths,
                                          prefill_chunk=5, return_stats=True)
    np.testing.assert_array_equal(np.asarray(got), want)
    assert 0 < stats["accepted"] < stats["drafted"], stats   # drafts accepted and rejected
    assert 0 < stats["reruns"] < stats["rewinds"], stats      # rewinds in place, and by re-extending
    assert stats["emitted"] >= 3 * (NEW - 1)
    assert stats["tokens_per_step"] > 1.0 and stats["acceptance_rate"] == stats["accepted"] / stats["drafted"]


def test_mtp_speculation_through_decode_kernels():
    """attention_impl="pallas" (interpret mode here): the prefill chunks and the verified chunks (<= 16
    tokens) attend through the decode kernels, on an fp8 cache; still plain greedy's tokens."""
    m = _small("deepseek_v4")
    m.mtp_depth, m.attention_impl = 1, "pallas"
    model = _agreeing(zoo.build(m, seed=1), block_scale=0.15, embed_scale=10.0)
    prompts = np.random.default_rng(0).integers(2, m.vocab_size, (3, 11))
    lengths, new = [11, 6, 9], 12
    want = np.asarray(zoo.generate(model, prompts, max_new_tokens=new, prompt_lengths=lengths, prefill_chunk=5,
                                   cache_dtype="float8_e4m3fn"))
    got, stats = speculative.generate_mtp(model, prompts, max_new_tokens=new, prompt_lengths=lengths,
                                          prefill_chunk=5, cache_dtype="float8_e4m3fn", return_stats=True)
    np.testing.assert_array_equal(np.asarray(got), want)
    assert 0 < stats["accepted"] < stats["drafted"], stats
    assert 0 < stats["reruns"] < stats["rewinds"], stats


def test_speculation_needs_mtp_modules():
    m = _small("deepseek_v4")
    model = zoo.build(m, seed=0)
    with pytest.raises(ValueError, match="MTP modules"):
        speculative.generate_mtp(model, [[3, 4, 5]], max_new_tokens=4)
