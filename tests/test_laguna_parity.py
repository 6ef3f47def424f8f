"""Laguna-like decoder against transformers' LagunaForCausalLM (fp32, eager, every parameter perturbed,
the router's correction bias included), the round trip zoo -> HF -> transformers, the on-disk format,
the presets and config validation."""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from transformers import AutoModelForCausalLM, LagunaConfig, LagunaForCausalLM

import zoo
from configs.laguna import get_config
from tests.hf_utils import hf_logits, perturb_
from zoo import analysis, laguna
from zoo.convert.safetensors_io import SafetensorsDir

TOL = 1e-4
SEQ = 17  # longer than both sliding windows

# Per-layer head counts over 2 kv heads, YaRN on half the dims of full layers, per-head gates, dense layer 0
# then MoE with a routed scaling factor and a router softcap.
PER_HEAD = dict(
    vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=4, num_attention_heads=4,
    num_key_value_heads=2, num_attention_heads_per_layer=[2, 4, 6, 4], head_dim=8, sliding_window=5,
    layer_types=["full_attention", "sliding_attention", "sliding_attention", "full_attention"],
    mlp_layer_types=["dense", "sparse", "sparse", "sparse"], num_experts=6, num_experts_per_tok=2,
    moe_intermediate_size=16, shared_expert_intermediate_size=12, moe_routed_scaling_factor=2.5,
    moe_router_logit_softcapping=1.5, gating=True, max_position_embeddings=32,
    rope_parameters={
        "full_attention": {"rope_type": "yarn", "rope_theta": 5e5, "factor": 4.0, "original_max_position_embeddings": 8,
                           "beta_fast": 64.0, "beta_slow": 1.0, "attention_factor": 1.0, "partial_rotary_factor": 0.5},
        "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}})
# Per-element gates, a MoE layer first, tied embeddings, YaRN with its default attention factor on a quarter
# of the dims and transformers' top-level `truncate`.
PER_ELEMENT = dict(
    vocab_size=48, hidden_size=24, intermediate_size=40, num_hidden_layers=3, num_attention_heads=4,
    num_key_value_heads=2, num_attention_heads_per_layer=[4, 2, 6], head_dim=16, sliding_window=4,
    layer_types=["sliding_attention", "full_attention", "sliding_attention"],
    mlp_layer_types=["sparse", "dense", "sparse"], num_experts=5, num_experts_per_tok=3, moe_intermediate_size=8,
    shared_expert_intermediate_size=10, gating="per-element", tie_word_embeddings=True, max_position_embeddings=64,
    rope_parameters={
        "full_attention": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 8.0, "original_max_position_embeddings": 8,
                           "beta_fast": 16.0, "beta_slow": 2.0, "partial_rotary_factor": 0.25},
        "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}, "truncate": False})


def _hf_model(kwargs, seed):
    torch.manual_seed(seed)
    config = LagunaConfig(**kwargs)
    config._attn_implementation = "eager"
    model = LagunaForCausalLM(config).eval()
    perturb_(model, seed)
    return model


def _logits(model, ids):
    return np.asarray(nnx.jit(lambda m, ids_BT: m(ids_BT))(model, jnp.asarray(ids)))


@pytest.mark.parametrize("name,kwargs", [("per_head", PER_HEAD), ("per_element", PER_ELEMENT)])
def test_logits_match_transformers_and_round_trip(name, kwargs, tmp_path):
    hf_model = _hf_model(kwargs, seed=1)
    hf_model.save_pretrained(tmp_path / "hf")
    ids = np.random.default_rng(0).integers(0, kwargs["vocab_size"], size=(2, SEQ))
    expected = hf_logits(hf_model, ids)

    model = zoo.from_hf(str(tmp_path / "hf"), dtype="float32")
    moe = [i for i, t in enumerate(kwargs["mlp_layer_types"]) if t == "sparse"]
    hf_bias = hf_model.model.layers[moe[0]].mlp.gate.e_score_correction_bias.detach().numpy()
    assert np.abs(hf_bias).min() > 0       # perturbed, and read from `mlp.experts.` on disk
    np.testing.assert_array_equal(np.asarray(model.blocks[moe[0]].mlp.router.correction_bias[...]), hf_bias)
    ours = _logits(model, ids)
    assert ours.shape == expected.shape
    assert np.abs(ours - expected).max() <= TOL, np.abs(ours - expected).max()

    zoo.to_hf(model, str(tmp_path / "back"))
    saved, written = SafetensorsDir(str(tmp_path / "hf")), SafetensorsDir(str(tmp_path / "back"))
    assert {n: saved.shape(n) for n in saved.names()} == {n: written.shape(n) for n in written.names()}
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "back", attn_implementation="eager").eval()
    assert type(reloaded).__name__ == "LagunaForCausalLM"
    again = hf_logits(reloaded, ids)
    assert np.abs(again - expected).max() <= TOL, np.abs(again - expected).max()


def test_save_pretrained_splits_experts_on_disk(tmp_path):
    _hf_model(PER_HEAD, seed=2).save_pretrained(tmp_path)
    names = set(SafetensorsDir(str(tmp_path)).names())
    layer = "model.layers.1.mlp."
    assert {layer + f"experts.{e}.{p}.weight" for e in range(6) for p in ("gate_proj", "up_proj", "down_proj")} <= names
    assert {layer + "experts.e_score_correction_bias", layer + "gate.weight",
            layer + "shared_expert.gate_proj.weight"} <= names
    assert not any("gate_up_proj" in n or "shared_experts" in n for n in names)


def test_released_config_round_trips_through_transformers_config():
    cfg = get_config("xs2").model
    hf = laguna.to_hf_config(cfg)
    hf_config = LagunaConfig(**{k: v for k, v in hf.items() if k not in ("model_type", "architectures")})
    assert hf_config.rope_parameters["full_attention"]["rope_type"] == "yarn"
    assert hf_config.num_attention_heads_per_layer[:4] == [48, 64, 64, 64]
    assert hf_config.eos_token_id == [2, 24] and hf_config.moe_routed_scaling_factor == 2.5
    back = laguna.from_hf_config(hf_config.to_dict())
    assert back.to_dict() == cfg.to_dict()


def test_xs2_preset_matches_the_released_sizes():
    rep = analysis.report(get_config("xs2"), context=131_072)
    assert round(rep["params_total"] / 1e9) == 33 and round(rep["params_active"] / 1e9) == 3
    global_kv = 10 * 131_072 * 2 * 8 * 128 * 2          # 10 full layers keep the whole context
    assert rep["kv_cache_bytes"] == global_kv + 30 * 512 * 2 * 8 * 128 * 2
    small = analysis.count_params(get_config("small"))["params_total"]
    assert 90e6 < small < 110e6


def _config(**changes):
    cfg = laguna.model_config(vocab_size=64, d_model=32, attention_types=("full", "sliding"), num_heads=(2, 4),
                              num_kv_heads=2, head_dim=8, sliding_window=4, mlp_dim=48, moe_layers=(False, False))
    for key, value in changes.items():
        cfg[key] = value
    return cfg


@pytest.mark.parametrize("changes,message", [
    (dict(num_heads=(3, 4)), r"layer 0: num_heads=3 is not divisible by num_kv_heads=2"),
    (dict(num_heads=(2, 4, 4)), r"model.num_heads has 3 entries but model.num_layers is 2"),
    (dict(moe_layers=(False,)), r"model.moe_layers has 1 entries but model.num_layers is 2"),
    (dict(attention_types=("full", "local")), r"attention_types\[1\] = 'local': unknown layer kind"),
    (dict(gating="sigmoid"), r"model.gating = 'sigmoid'"),
    (dict(moe_layers=(False, True)), r"MoE layers need 0 < model.top_k <= model.num_experts"),
])
def test_bad_configs_fail_with_a_clear_message(changes, message):
    with pytest.raises(ValueError, match=message):
        zoo.build_abstract(_config(**changes))
