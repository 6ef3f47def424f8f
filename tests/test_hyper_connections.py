"""Manifold-constrained hyper-connections: Sinkhorn gives doubly stochastic mixing, the layer and the
head match the formulas written out in numpy, and the layer wraps any [B, T, D] -> [B, T, D] sublayer."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from layers.hyper_connections import HyperConnection, HyperHead, expand, sinkhorn
from layers.mlp import GatedMLP

N, D, EPS, NORM_EPS = 4, 16, 1e-6, 1e-6


def build(factory, seed: int):
    """The module with random parameters (numpy draws; the bias and scales start at constants)."""
    module = nnx.eval_shape(factory)
    rng = np.random.default_rng(seed)
    for _, var in nnx.to_flat_state(nnx.state(module, nnx.Param)):
        value = var.get_value()
        std = 1.0 if value.ndim == 1 else value.shape[-1] ** -0.5
        var.set_value(jnp.asarray(1.0 + rng.normal(size=value.shape) * std if value.ndim == 1
                                  else rng.normal(size=value.shape) * std, jnp.float32))
    return module


def test_sinkhorn_is_doubly_stochastic():
    """20 iterations suffice for typical mixing logits; sharply peaked ones need more (the column sums
    are exact either way: the last pass normalises them)."""
    sinkhorn_of = jax.jit(lambda x, iters: sinkhorn(jax.nn.softmax(x, axis=-1) + EPS, iters, EPS),
                          static_argnums=1)
    for scale, iters in ((1.0, 20), (3.0, 200)):
        comb = np.asarray(sinkhorn_of(np.random.default_rng(0).normal(size=(3, 5, N, N)) * scale, iters))
        assert (comb > 0).all()
        np.testing.assert_allclose(comb.sum(-1), 1.0, atol=1e-5)
        np.testing.assert_allclose(comb.sum(-2), 1.0, atol=1e-5)


def _sigmoid(x):
    return 1 / (1 + np.exp(-x))


def _mixing_logits(x, proj):
    B, T = x.shape[:2]
    flat = x.reshape(B, T, -1)
    flat = flat / np.sqrt(np.mean(flat ** 2, -1, keepdims=True) + NORM_EPS)
    return flat @ proj.reshape(flat.shape[-1], -1)


def test_hyper_connection_matches_formula():
    hc = build(lambda: HyperConnection(N, D, sinkhorn_iters=20, eps=EPS, norm_eps=NORM_EPS, rngs=nnx.Rngs(0)), 1)
    x = np.random.default_rng(2).normal(size=(2, 3, N, D)).astype(np.float32)
    got = np.asarray(nnx.jit(lambda m, x: m(x, jnp.tanh))(hc, jnp.asarray(x)))

    proj, bias, a = (np.asarray(v[...], np.float64) for v in (hc.proj, hc.bias, hc.scale))
    m = _mixing_logits(x.astype(np.float64), proj)
    pre = _sigmoid(m[..., :N] * a[0] + bias[:N]) + EPS
    post = 2 * _sigmoid(m[..., N:2 * N] * a[1] + bias[N:2 * N])
    z = (m[..., 2 * N:] * a[2] + bias[2 * N:]).reshape(2, 3, N, N)
    comb = np.exp(z - z.max(-1, keepdims=True))
    comb = comb / comb.sum(-1, keepdims=True) + EPS
    comb = comb / (comb.sum(-2, keepdims=True) + EPS)
    for _ in range(19):
        comb = comb / (comb.sum(-1, keepdims=True) + EPS)
        comb = comb / (comb.sum(-2, keepdims=True) + EPS)
    u = np.einsum("btn,btnd->btd", pre, x)
    want = post[..., None] * np.tanh(u)[:, :, None] + np.einsum("btjk,btjd->btkd", comb, x)
    np.testing.assert_allclose(got, want, atol=2e-5)


def test_head_collapses_with_sigmoid_weights():
    head = build(lambda: HyperHead(N, D, eps=EPS, norm_eps=NORM_EPS, rngs=nnx.Rngs(0)), 3)
    x = np.random.default_rng(4).normal(size=(2, 3, N, D)).astype(np.float32)
    got = np.asarray(nnx.jit(lambda m, x: m(x))(head, jnp.asarray(x)))
    proj, bias, a = (np.asarray(v[...], np.float64) for v in (head.proj, head.bias, head.scale))
    pre = _sigmoid(_mixing_logits(x.astype(np.float64), proj) * a[0] + bias) + EPS
    np.testing.assert_allclose(got, np.einsum("btn,btnd->btd", pre, x), atol=1e-5)
    streams = np.asarray(expand(jnp.asarray(x[:, :, 0]), N))
    assert streams.shape == (2, 3, N, D) and (streams == x[:, :, :1]).all()


def test_wraps_any_sublayer_and_trains():
    hc = build(lambda: HyperConnection(N, D, rngs=nnx.Rngs(0)), 5)
    mlp = build(lambda: GatedMLP(D, 32, activation="silu", rngs=nnx.Rngs(0)), 6)
    x = jnp.asarray(np.random.default_rng(7).normal(size=(2, 3, N, D)), jnp.float32)

    def loss(hc, mlp):
        return jnp.sum(hc(x, mlp) ** 2)

    grads = nnx.jit(nnx.grad(loss, argnums=(0, 1)))(hc, mlp)
    leaves = jax.tree.leaves(nnx.state(grads))
    assert all(np.isfinite(np.asarray(g)).all() for g in leaves)
    assert all(np.abs(np.asarray(g)).max() > 0 for g in leaves)
