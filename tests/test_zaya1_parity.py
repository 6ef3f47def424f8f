"""ZAYA1-like decoder against transformers' ZayaForCausalLM (fp32, eager, every parameter and buffer
perturbed), the round trip zoo -> HF -> transformers, and padded rows."""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from safetensors.numpy import load_file
from transformers import AutoModelForCausalLM, ZayaConfig, ZayaForCausalLM

import zoo
from configs.zaya1 import get_config
from tests.hf_utils import hf_logits, perturb_
from zoo.zaya1 import from_hf_config, to_hf_config

TOL = 1e-4
COMMON = dict(vocab_size=64, hidden_size=32, num_hidden_layers=4, num_attention_heads=4, moe_intermediate_size=24,
              num_experts=3, router_hidden_size=12, sliding_window=4, eos_token_id=1,
              layer_types=["hybrid", "hybrid_sliding", "hybrid", "hybrid_sliding"])
RELEASED_SHAPE = dict(COMMON, num_key_value_heads=2, head_dim=8)   # 2 kv heads: v = [current head, delayed head]
ODD_SHAPE = dict(COMMON, num_key_value_heads=1, head_dim=12,       # each value head half current, half delayed
                 cca_time0=3, cca_time1=2, tie_word_embeddings=False)
IDS = np.random.default_rng(0).integers(1, COMMON["vocab_size"], size=(2, 13))


def _hf_model(kwargs, seed, ids):
    """A perturbed model whose balancing biases are set as a load balancer would for `ids` (minus each
    layer's mean router probability, plus noise), so that the choices vary from token to token."""
    torch.manual_seed(seed)
    config = ZayaConfig(**kwargs)
    config._attn_implementation = "eager"
    model = ZayaForCausalLM(config).eval()
    perturb_(model, seed)
    mean_probs = []
    handles = [layer.mlp.gate.register_forward_hook(
        lambda module, args, out: mean_probs.append(torch.softmax(out[0], -1).mean(0)))
        for layer in model.model.layers]
    hf_logits(model, ids)
    for h in handles:
        h.remove()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer, probs in zip(model.model.layers, mean_probs):
            layer.mlp.gate.balancing_biases.copy_(-probs + 0.01 * torch.randn(probs.shape, generator=gen))
    return model


def _routes(model, ids):
    """The classes every layer's router picked, with the skip class as `num_experts`."""
    picked = []

    def hook(module, args, out):
        _, probs, indices, _ = out
        picked.append(torch.where(probs == 0, module.num_experts, indices).flatten())
    handles = [layer.mlp.gate.register_forward_hook(hook) for layer in model.model.layers]
    hf_logits(model, ids)
    for h in handles:
        h.remove()
    return torch.cat(picked).numpy()


@nnx.jit
def _logits(model, ids, segment_ids=None):
    return model(ids, segment_ids_BT=segment_ids)


def _max_diff(a, b):
    assert a.shape == b.shape
    return float(np.abs(a - b).max())


@pytest.fixture(scope="module", params=[RELEASED_SHAPE, ODD_SHAPE], ids=["released_shape", "odd_shape"])
def case(request, tmp_path_factory):
    """(HF config kwargs, the perturbed HF model, its checkpoint directory, our model loaded from it)."""
    kwargs, path = request.param, tmp_path_factory.mktemp("hf")
    hf_model = _hf_model(kwargs, 1, IDS)
    hf_model.save_pretrained(path)
    return kwargs, hf_model, path, zoo.from_hf(str(path), dtype="float32")


def test_logits_match_transformers_and_round_trip(case, tmp_path):
    kwargs, hf_model, path, model = case
    # perturb_ reached every tensor: none is left at a constant init value (norms 1, biases/temp 0, ...)
    constant = [n for n, t in hf_model.state_dict().items() if t.numel() > 1 and torch.all(t == t.flatten()[0])]
    assert not constant, constant
    assert set(_routes(hf_model, IDS)) == set(range(kwargs["num_experts"] + 1)), "experts and skip all used"
    expected = hf_logits(hf_model, IDS)
    assert _max_diff(np.asarray(_logits(model, jnp.asarray(IDS))), expected) <= TOL

    zoo.to_hf(model, str(tmp_path))
    saved, written = load_file(path / "model.safetensors"), load_file(tmp_path / "model.safetensors")
    assert sorted(saved) == sorted(written)
    assert all(np.array_equal(saved[n], written[n]) for n in saved)
    # transformers 5.23 resets the skip class's balancing bias to -1 in `from_pretrained` (an unguarded
    # `_init_weights` line), so its reloads are compared with each other, not with the in-memory model.
    reference = AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager").eval()
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").eval()
    assert type(reloaded).__name__ == "ZayaForCausalLM"
    assert _max_diff(hf_logits(reloaded, IDS), hf_logits(reference, IDS)) <= TOL


def test_padding_does_not_reach_real_tokens(case):
    """A left- and a right-padded row (segment ids 0 = padding) give their real tokens the logits of the
    unpadded run, as transformers does with the same attention mask."""
    kwargs, hf_model, _, model = case
    n_pad = 3
    real = IDS[:, : IDS.shape[1] - n_pad]
    padded = np.zeros_like(IDS)
    padded[0, n_pad:], padded[1, :-n_pad] = real[0], real[1]
    mask = np.ones_like(IDS, dtype=np.int32)
    mask[0, :n_pad], mask[1, -n_pad:] = 0, 0
    is_real = mask.astype(bool)

    unpadded = np.asarray(_logits(model, jnp.asarray(IDS)))[:, : real.shape[1]]   # causal: a prefix's logits
    ours = np.asarray(_logits(model, jnp.asarray(padded), jnp.asarray(mask)))
    assert _max_diff(ours[is_real].reshape(unpadded.shape), unpadded) <= TOL
    theirs = hf_logits(hf_model, padded, attention_mask=torch.from_numpy(mask))
    assert _max_diff(ours[is_real], theirs[is_real]) <= TOL


def test_8b_preset_is_the_released_config():
    released = ZayaConfig().to_dict()   # transformers' defaults are ZAYA1-8B
    ours = to_hf_config(get_config("8b").model)
    assert {k: v for k, v in ours.items() if released.get(k) != v} == {"architectures": ["ZayaForCausalLM"]}
    assert from_hf_config(released).to_dict() == get_config("8b").model.to_dict()


def test_identity_skip_output_has_no_hf_equivalent():
    cfg = get_config("tiny").model
    cfg.skip_output = "identity"
    with pytest.raises(ValueError, match="skip_output = 'identity' has no equivalent"):
        to_hf_config(cfg)
