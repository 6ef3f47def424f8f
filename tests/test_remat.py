"""`model.remat` recomputes blocks in the backward pass: same loss and gradients as keeping activations."""
from __future__ import annotations

import re

import jax
import numpy as np
import pytest
from flax import nnx

import zoo
from tests.sharding_runs import micro_config
from zoo.evaluate import make_loss_fn


# Each policy on two families (remat wraps every block kind alike, in the shared stack), each family once.
@pytest.mark.parametrize("family, remat", [("gemma4", "dots"), ("laguna", "full"), ("zaya1", "full"),
                                           ("deepseek_v4", "dots")])
def test_remat_keeps_loss_and_gradients(family, remat):
    cfg = micro_config(family).model
    tokens = jax.random.randint(jax.random.key(1), (2, 25), 3, cfg.vocab_size)
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    results = {}
    for policy in ("none", remat):
        cfg.remat = policy
        graphdef, params = nnx.split(zoo.build(cfg, seed=0), nnx.Param)
        loss_fn = jax.jit(jax.value_and_grad(make_loss_fn(graphdef, training=True)))
        # one rematerialised region per block and per MTP module (none without remat)
        jaxpr = str(jax.make_jaxpr(make_loss_fn(graphdef, training=True))(params, inputs, targets))
        results[policy] = (loss_fn(params, inputs, targets), len(re.findall(r"\bremat\w*\[", jaxpr)))
    (loss, grads), regions = results["none"]
    assert regions == 0
    (loss_p, grads_p), regions = results[remat]
    assert regions == cfg.num_layers + cfg.get("mtp_depth", 0), (remat, regions)
    np.testing.assert_allclose(loss_p, loss, rtol=1e-6)
    # float32 sums regrouped by the recomputation: differences of ~1e-6 on gradients of ~1e-3
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-5), grads_p, grads)


def test_unknown_remat_policy_is_named():
    cfg = micro_config("gemma4").model
    cfg.remat = "sometimes"
    with pytest.raises(ValueError, match="model.remat 'sometimes'"):
        zoo.build(cfg)
