"""Gemma-4-like decoder against transformers' Gemma4ForCausalLM (fp32, every parameter perturbed), then
the round trip zoo -> HF -> transformers."""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, Gemma4ForCausalLM, Gemma4TextConfig

import zoo
from tests.hf_utils import hf_logits, perturb_

TOL = 1e-4

DENSE = dict(  # per-layer embeddings, kv sharing across both layer types, double-wide MLP, softcap
    vocab_size=96, hidden_size=48, intermediate_size=64, num_hidden_layers=6, num_attention_heads=4,
    num_key_value_heads=2, head_dim=16, global_head_dim=32, sliding_window=5,
    layer_types=["sliding_attention", "full_attention", "sliding_attention", "full_attention",
                 "sliding_attention", "full_attention"],
    num_kv_shared_layers=3, use_double_wide_mlp=True, hidden_size_per_layer_input=8,
    vocab_size_per_layer_input=96, final_logit_softcapping=30.0)
MOE = dict(  # the parallel MoE block and attention_k_eq_v with its own kv-head count on full layers
    vocab_size=80, hidden_size=40, intermediate_size=56, num_hidden_layers=4, num_attention_heads=4,
    num_key_value_heads=2, head_dim=12, global_head_dim=24, num_global_key_value_heads=1,
    attention_k_eq_v=True, sliding_window=6,
    layer_types=["sliding_attention", "sliding_attention", "full_attention", "full_attention"],
    hidden_size_per_layer_input=0, enable_moe_block=True, num_experts=5, top_k_experts=2,
    moe_intermediate_size=24, final_logit_softcapping=None)


def _hf_model(kwargs, seed):
    torch.manual_seed(seed)
    config = Gemma4TextConfig(**kwargs)
    config._attn_implementation = "eager"
    model = Gemma4ForCausalLM(config).eval()
    perturb_(model, seed)
    return model


@pytest.mark.parametrize("name,kwargs", [("dense_ple_shared", DENSE), ("moe_k_eq_v", MOE)])
def test_logits_match_transformers_and_round_trip(name, kwargs, tmp_path):
    hf_model = _hf_model(kwargs, seed=1)
    hf_model.save_pretrained(tmp_path / "hf")
    ids = np.random.default_rng(0).integers(0, kwargs["vocab_size"], size=(2, 17))
    expected = hf_logits(hf_model, ids)

    model = zoo.from_hf(str(tmp_path / "hf"), dtype="float32")
    ours = np.asarray(model(jnp.asarray(ids)))
    assert ours.shape == expected.shape
    assert np.abs(ours - expected).max() <= TOL, np.abs(ours - expected).max()

    zoo.to_hf(model, str(tmp_path / "back"))
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "back", attn_implementation="eager").eval()
    assert type(reloaded).__name__ == "Gemma4ForCausalLM"
    again = hf_logits(reloaded, ids)
    assert np.abs(again - expected).max() <= TOL, np.abs(again - expected).max()
