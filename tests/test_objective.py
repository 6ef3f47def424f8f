"""The training objective includes multi-token prediction where the model has it."""
from __future__ import annotations

import jax
import numpy as np
from flax import nnx

import zoo
from configs.deepseek_v4 import get_config as dsv4_config
from configs.gemma4 import get_config as gemma4_config
from zoo.decoder import cross_entropy
from zoo.evaluate import make_loss_fn


def _batch(vocab):
    ids = jax.random.randint(jax.random.key(0), (2, 17), 0, vocab)
    return ids[:, :-1], ids[:, 1:]


def test_training_loss_adds_the_weighted_mtp_loss():
    cfg = dsv4_config("tiny").model
    assert cfg.mtp_depth == 1 and cfg.mtp_loss_weight > 0
    model = zoo.build(cfg)
    graphdef, params = nnx.split(model)
    inputs, targets = _batch(cfg.vocab_size)
    train = float(jax.jit(make_loss_fn(graphdef, training=True))(params, inputs, targets))
    val = float(jax.jit(make_loss_fn(graphdef))(params, inputs, targets))
    logits, (mtp_logits,) = nnx.jit(lambda m, x, y: m.forward_with_mtp(x, y))(model, inputs, targets)
    next_token = float(cross_entropy(logits, targets)[0])
    # depth-1 MTP logits at row t predict targets[t + 1]
    mtp = float(cross_entropy(mtp_logits[:, :-1], targets[:, 1:])[0])
    np.testing.assert_allclose(val, next_token, rtol=1e-6)
    np.testing.assert_allclose(train, next_token + cfg.mtp_loss_weight * mtp, rtol=1e-5)
    assert abs(train - val) > 1e-3


def test_training_loss_is_cross_entropy_without_mtp():
    cfg = gemma4_config("tiny").model
    graphdef, params = nnx.split(zoo.build(cfg))
    inputs, targets = _batch(cfg.vocab_size)
    np.testing.assert_allclose(make_loss_fn(graphdef, training=True)(params, inputs, targets),
                               make_loss_fn(graphdef)(params, inputs, targets), rtol=1e-6)
