"""Hybrids no released model has (configs/hybrid.py): each family's stack with another family's layer kinds
from the one registry (layers.kinds). Each builds with the modules its config names, trains a few steps on
CPU (loss falls, gradients finite), and the registry's own checks reject a KV-shared layer whose source
cannot hand on keys and values."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import zoo
from configs.hybrid import PRESETS, get_config
from layers.attention import Attention
from layers.cca import CCA
from layers.mlp import GatedMLP
from layers.moe import MoE
from layers.sparse_attention import CompressedAttention
from zoo.evaluate import make_loss_fn

EXPECTED = {   # preset -> each layer's token mixer class, its channel mixer class, the layers without k/v
    "laguna_cca": ((Attention, CCA, CCA, CCA, Attention, CCA, CCA, Attention), (GatedMLP,) + (MoE,) * 7, {7}),
    "deepseek_shared": ((Attention, CompressedAttention, CompressedAttention, Attention), (MoE,) * 4, {3}),
    "gemma_hca": ((Attention, Attention, CompressedAttention, Attention, Attention, CompressedAttention),
                  (GatedMLP,) * 6, {4}),
}


def _small(preset: str):
    """The preset at a width that trains in seconds (same layer kinds)."""
    config = get_config(preset)
    m = config.model
    m.vocab_size = 64
    return m


@pytest.mark.parametrize("preset", PRESETS)
def test_hybrid_builds_from_the_registry_and_trains(preset):
    m = _small(preset)
    model = zoo.build(m, seed=0)
    attention, mlp, shared = EXPECTED[preset]
    assert tuple(type(b.attn) for b in model.blocks) == attention
    assert tuple(type(b.mlp) for b in model.blocks) == mlp
    for i, block in enumerate(model.blocks):
        if isinstance(block.attn, Attention):
            assert (block.attn.k_proj is None) == (i in shared), i

    graphdef, params = nnx.split(model, nnx.Param)
    params = nnx.to_pure_dict(params)
    loss_fn = make_loss_fn(graphdef, training=True)
    tx = optax.adam(3e-3)
    opt_state = tx.init(params)
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, m.vocab_size, size=(2, 65)))
    inputs, targets = tokens[:, :-1], tokens[:, 1:]

    @jax.jit
    def step(params, opt_state):
        loss, grads = jax.value_and_grad(loss_fn)(params, inputs, targets)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss, optax.tree.norm(grads)

    losses = []
    for _ in range(8):
        params, opt_state, loss, grad_norm = step(params, opt_state)
        assert np.isfinite(float(loss)) and np.isfinite(float(grad_norm))
        losses.append(float(loss))
    assert losses[-1] < losses[0] - 0.1, losses


def test_kv_sharing_needs_a_grouped_query_source():
    m = _small("gemma_hca")
    m.kv_sources = (-1, -1, -1, -1, 2, -1)   # layer 4 reading the HCA layer 2
    with pytest.raises(ValueError, match=r"layer 4 shares k/v of layer 2, a 'hca' layer"):
        zoo.build(m)
    m = _small("laguna_cca")
    m.kv_sources = (-1,) * 7 + (3,)            # a CCA layer owns no shareable k/v either
    with pytest.raises(ValueError, match=r"layer 7 shares k/v of layer 3, a 'cca_sliding' layer"):
        zoo.build(m)
