"""Unit tests of the layers Laguna-like models add: YaRN rope, the attention output gate and the sigmoid
router, against transformers' code and against arithmetic."""
from __future__ import annotations

import math
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from transformers import LagunaConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
from transformers.models.laguna.modeling_laguna import LagunaRotaryEmbedding, LagunaTopKRouter, apply_rotary_pos_emb

from layers.attention import Attention
from layers.moe import SigmoidRouter
from layers.rope import RopeSpec, apply_rope
from tests.hf_utils import perturb_

RELEASED = dict(rope_theta=5e5, factor=32.0, original_max_position_embeddings=4096, beta_fast=64.0, beta_slow=1.0,
                attention_factor=1.0, partial_rotary_factor=0.5)
SMALL = dict(rope_theta=1e4, factor=8.0, original_max_position_embeddings=8, beta_fast=8.0, beta_slow=2.0,
             partial_rotary_factor=0.5)


def _hf_config(head_dim, yarn, truncate=None):
    rope = {"full_attention": {"rope_type": "yarn", **yarn},
            "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}
    if truncate is not None:
        rope["truncate"] = truncate   # transformers reads it here, not from the per-type entry
    return LagunaConfig(num_hidden_layers=2, head_dim=head_dim, layer_types=["full_attention", "sliding_attention"],
                        max_position_embeddings=int(yarn["factor"] * yarn["original_max_position_embeddings"]),
                        rope_parameters=rope)


def _spec(yarn, truncate=None):
    return RopeSpec(kind="yarn", theta=yarn["rope_theta"], fraction=yarn.get("partial_rotary_factor", 1.0),
                    factor=yarn["factor"], original_max_positions=yarn["original_max_position_embeddings"],
                    beta_fast=yarn.get("beta_fast", 32.0), beta_slow=yarn.get("beta_slow", 1.0),
                    attention_factor=yarn.get("attention_factor"), truncate=True if truncate is None else truncate)


@pytest.mark.parametrize("head_dim,yarn,truncate", [
    (128, RELEASED, None),                                        # XS.2 full layers: 64 of 128 dims rotate
    (128, RELEASED, False),
    (64, dict(rope_theta=1e4, factor=4.0, original_max_position_embeddings=64), None),  # full rotary, mscale
    (16, SMALL, None), (16, SMALL, False),
])
def test_yarn_inv_freq_matches_transformers(head_dim, yarn, truncate):
    hf_inv_freq, hf_attention_factor = ROPE_INIT_FUNCTIONS["yarn"](
        _hf_config(head_dim, yarn, truncate), None, layer_type="full_attention")
    spec = _spec(yarn, truncate)
    ours = spec.inv_frequencies(head_dim)
    assert ours.shape == (int(head_dim * yarn.get("partial_rotary_factor", 1.0)) // 2,)
    np.testing.assert_allclose(ours, hf_inv_freq.numpy(), rtol=1e-6)
    assert spec.attention_factor == pytest.approx(hf_attention_factor, rel=1e-12)


def test_yarn_truncate_and_default_attention_factor():
    assert not np.allclose(_spec(SMALL, True).inv_frequencies(16), _spec(SMALL, False).inv_frequencies(16))
    assert _spec(SMALL).attention_factor == pytest.approx(0.1 * math.log(8.0) + 1.0)
    assert RopeSpec().attention_factor == 1.0


def test_yarn_partial_rotation_matches_transformers():
    config = _hf_config(32, SMALL)
    rotary = LagunaRotaryEmbedding(config)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 7, 3, 32)).astype(np.float32)
    pos = np.stack([np.arange(7), np.arange(7) * 50 + 300]).astype(np.int64)
    cos, sin = rotary(torch.from_numpy(x), torch.from_numpy(pos), "full_attention")
    expected, _ = apply_rotary_pos_emb(torch.from_numpy(x), torch.from_numpy(x), cos, sin, unsqueeze_dim=2)
    spec = _spec(SMALL)
    ours = np.asarray(apply_rope(jnp.asarray(x), jnp.asarray(pos), spec))
    np.testing.assert_allclose(ours, expected.numpy(), atol=2e-5)
    np.testing.assert_array_equal(ours[..., 16:], x[..., 16:])   # pairs (j, j + 8) inside the first 16 dims


def test_bad_rope_settings_are_named():
    with pytest.raises(ValueError, match="original_max_positions > 0"):
        RopeSpec(kind="yarn", factor=4.0)
    with pytest.raises(ValueError, match=r"\['factor'\] apply to kind 'yarn' only"):
        RopeSpec(kind="default", factor=4.0)


def _attention(gate: str) -> Attention:
    """A shape-only layer filled with numpy values seeded by parameter name (so layers with different
    gates share q, k, v, o and the norms) without compiling the initialisers."""
    layer = nnx.eval_shape(lambda: Attention(24, 4, 2, 8, rope=RopeSpec(), window=3, output_gate=gate,
                                             rngs=nnx.Rngs(0)))
    for path, var in nnx.to_flat_state(nnx.state(layer, nnx.Param)):
        rng = np.random.default_rng(zlib.crc32(repr(path).encode()))
        var.set_value(jnp.asarray(rng.standard_normal(var.get_value().shape, np.float32) * 0.3))
    return layer


def test_output_gate_per_head_and_per_element():
    x = jax.random.normal(jax.random.key(1), (2, 6, 24))
    pos = jnp.broadcast_to(jnp.arange(6), (2, 6))
    forward = nnx.jit(lambda layer, x_BTD: layer(x_BTD, pos)[0])
    plain, per_head, per_element = _attention("none"), _attention("per_head"), _attention("per_element")
    assert plain.g_proj is None and per_head.g_proj.shape == (24, 4) and per_element.g_proj.shape == (24, 4, 8)
    y_plain = forward(plain, x)

    per_head.g_proj.set_value(jnp.zeros((24, 4)))                  # softplus(0) = ln 2 on every head
    np.testing.assert_allclose(forward(per_head, x), math.log(2.0) * y_plain, rtol=1e-5, atol=1e-6)

    g_DN = jax.random.normal(jax.random.key(2), (24, 4))
    per_head.g_proj.set_value(g_DN)
    per_element.g_proj.set_value(jnp.broadcast_to(g_DN[:, :, None], (24, 4, 8)))
    np.testing.assert_allclose(forward(per_element, x), forward(per_head, x), rtol=1e-5, atol=1e-6)
    gate = per_head.output_gate(x.astype(jnp.bfloat16))
    assert gate.shape == (2, 6, 4, 1) and gate.dtype == jnp.float32


def test_bad_attention_settings_are_named():
    with pytest.raises(ValueError, match="unknown output_gate 'sigmoid'"):
        Attention(24, 4, 2, 8, rope=RopeSpec(), output_gate="sigmoid", rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="num_heads=3 is not divisible by num_kv_heads=2"):
        Attention(24, 3, 2, 8, rope=RopeSpec(), rngs=nnx.Rngs(0))


@pytest.mark.parametrize("softcap,scale", [(0.0, 1.0), (1.5, 2.5)])
def test_sigmoid_router_matches_transformers(softcap, scale):
    config = LagunaConfig(hidden_size=16, num_experts=7, num_experts_per_tok=3, num_hidden_layers=2,
                          moe_router_logit_softcapping=softcap)
    hf = LagunaTopKRouter(config)
    perturb_(hf, seed=3)                                  # weight ~ N(0, 1/16), correction bias ~ 1 + N(0, 0.09)
    router = SigmoidRouter(16, 7, 3, softcap=softcap, routed_scale=scale, rngs=nnx.Rngs(0))
    router.proj.set_value(jnp.asarray(hf.weight.detach().numpy().T))
    router.correction_bias.set_value(jnp.asarray(hf.e_score_correction_bias.detach().numpy()))
    x = np.random.default_rng(4).standard_normal((40, 16)).astype(np.float32) * 3
    hf_logits, hf_weights, hf_experts = (t.detach().numpy() for t in hf(torch.from_numpy(x)))
    weights, experts, scores = (np.asarray(a) for a in nnx.jit(lambda r, x_MD: r(x_MD))(router, jnp.asarray(x)))
    np.testing.assert_array_equal(np.sort(experts, -1), np.sort(hf_experts, -1))
    order, hf_order = np.argsort(experts, -1), np.argsort(hf_experts, -1)
    np.testing.assert_allclose(np.take_along_axis(weights, order, -1) / scale,
                               np.take_along_axis(hf_weights, hf_order, -1), rtol=1e-6)
    np.testing.assert_allclose(scores, 1 / (1 + np.exp(-hf_logits)), rtol=1e-6)
    # the bias changed the choice somewhere, yet the weights are the unbiased scores renormalised
    assert (np.sort(np.argsort(-scores, -1)[:, :3], -1) != np.sort(experts, -1)).any()
    np.testing.assert_allclose(weights.sum(-1), scale, rtol=1e-6)


def test_correction_bias_selects_but_takes_no_gradient():
    router = SigmoidRouter(8, 5, 2, rngs=nnx.Rngs(0))
    router.correction_bias.set_value(jnp.array([0.0, 0.0, 0.0, 0.0, 10.0]))
    x = jax.random.normal(jax.random.key(5), (9, 8))
    _, experts, _ = nnx.jit(lambda r: r(x))(router)
    assert (experts == 4).any(-1).all()
    grads = nnx.jit(nnx.grad(lambda r: jnp.sum(r(x)[0] ** 2)))(router)
    assert not np.any(np.asarray(grads["correction_bias"][...]))
    assert np.any(np.asarray(grads["proj"][...]))
