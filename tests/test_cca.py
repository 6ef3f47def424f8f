"""Unit tests of the CCA, residual-scaling and MLP-router layers: what the transformers parity in
test_zaya1_parity.py does not reach (packed segments, the `identity` skip output, gradients)."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from layers.cca import CCA
from layers.mlp_router import SkipMoE
from layers.residual import ScaledResidual
from layers.rope import RopeSpec


def _random(make_module, seed: int):
    """The module with every parameter N(0, 0.5^2) (biases and scales included), balancing biases 0
    (built shape-only first: no per-shape random kernels to compile)."""
    module = nnx.eval_shape(make_module)
    rng = np.random.default_rng(seed)
    for path, var in nnx.to_flat_state(nnx.state(module, nnx.Param)):
        shape = var.get_value().shape
        value = np.zeros(shape) if path[-1] == "balancing_biases" else 0.5 * rng.standard_normal(shape)
        var.set_value(jnp.asarray(value, jnp.float32))
    return module


def test_cca_packed_segments_equal_separate_sequences():
    """Two documents packed in one row (segment ids 1, 2; positions restarting) give each the output of
    its own row: neither the convolutions nor the value shift nor attention reach across."""
    cca = _random(lambda: CCA(16, 4, 2, 8, rope=RopeSpec(theta=100.0, fraction=0.5), kernel_sizes=(3, 2),
                              rngs=nnx.Rngs(0)), seed=1)
    x = jnp.asarray(np.random.default_rng(2).standard_normal((2, 6, 16)), jnp.float32)
    positions = jnp.broadcast_to(jnp.arange(6), (2, 6))
    attend = nnx.jit(lambda cca, x, positions, segments=None: cca(x, positions, segment_ids_BT=segments)[0])
    separate = attend(cca, x, positions)
    packed = attend(cca, x.reshape(1, 12, 16), positions.reshape(1, 12), jnp.array([[1] * 6 + [2] * 6]))
    np.testing.assert_allclose(packed.reshape(2, 6, 16), separate, atol=1e-5)


def test_skip_identity_passes_the_input_scaled_by_its_probability():
    """`identity` against a per-token numpy computation of the router and the experts."""
    D, E, F, R = 6, 3, 5, 4
    moe = _random(lambda: SkipMoE(D, E, F, R, accumulate=True, skip_output="identity", eps=1e-5,
                                  rngs=nnx.Rngs(0)), seed=3)
    x = np.random.default_rng(4).standard_normal((2, 9, D)).astype(np.float32)
    state = np.random.default_rng(5).standard_normal((2, 9, R)).astype(np.float32)
    r = moe.router
    _, _, probs, _ = nnx.jit(lambda r, x, s: r(x, s))(r, jnp.asarray(x.reshape(-1, D)),
                                                      jnp.asarray(state.reshape(-1, R)))
    skip_gap = np.max(probs[:, :E], axis=-1) - probs[:, E]   # a skip bias at the median sends half to skip
    r.balancing_biases[...] = jnp.zeros(E + 1).at[E].set(np.median(skip_gap))
    y, next_state = nnx.jit(lambda moe, x, s: moe(x, s))(moe, jnp.asarray(x), jnp.asarray(state))

    p = {k: np.asarray(getattr(r, k)[...]) for k in ("down_proj", "down_bias", "state_scale", "fc1", "fc1_bias",
                                                     "fc2", "fc2_bias", "out_proj", "balancing_biases")}
    ex = {k: np.asarray(getattr(moe.experts, k)[...]) for k in ("gate_proj", "up_proj", "down_proj")}
    gelu = lambda a: np.asarray(jax.nn.gelu(a, approximate=False))
    silu = lambda a: a / (1 + np.exp(-a))
    chosen = []
    for b in range(2):
        for t in range(9):
            s = x[b, t] @ p["down_proj"] + p["down_bias"] + state[b, t] * p["state_scale"]
            np.testing.assert_allclose(next_state[b, t], s, atol=1e-5)
            n = s / np.sqrt(np.mean(s * s) + 1e-5) * np.asarray(r.norm.scale[...])
            logits = gelu(gelu(n @ p["fc1"] + p["fc1_bias"]) @ p["fc2"] + p["fc2_bias"]) @ p["out_proj"]
            probs = np.exp(logits - logits.max()) / np.exp(logits - logits.max()).sum()
            c = int(np.argmax(probs + p["balancing_biases"]))
            chosen.append(c)
            if c == E:
                want = probs[c] * x[b, t]
            else:
                h = silu(x[b, t] @ ex["gate_proj"][c]) * (x[b, t] @ ex["up_proj"][c])
                want = probs[c] * (h @ ex["down_proj"][c])
            np.testing.assert_allclose(y[b, t], want, atol=1e-5)
    assert chosen.count(E) == 9, chosen   # half the tokens skip, half go to experts


def test_balancing_biases_get_no_gradient_and_temperature_does():
    cca = _random(lambda: CCA(8, 2, 1, 4, rope=RopeSpec(fraction=0.5), rngs=nnx.Rngs(0)), seed=6)
    moe = _random(lambda: SkipMoE(8, 2, 4, 4, accumulate=False, rngs=nnx.Rngs(1)), seed=7)
    x = jnp.asarray(np.random.default_rng(8).standard_normal((1, 6, 8)), jnp.float32)

    def loss(cca, moe):
        a, _ = cca(x, jnp.arange(6)[None])
        y, _ = moe(a, None)
        return jnp.sum(y ** 2)
    g_cca, g_moe = nnx.jit(nnx.grad(loss, argnums=(0, 1)))(cca, moe)
    assert np.all(np.asarray(g_moe.router.balancing_biases[...]) == 0)
    assert np.all(np.asarray(g_cca.temp[...]) != 0)
    assert all(np.isfinite(np.asarray(v)).all() for v in jax.tree.leaves(nnx.state(g_cca)))


def test_scaled_residual():
    res = _random(lambda: ScaledResidual(3), seed=9)
    a, x = np.float32([[1.0, 2.0, 3.0]]), np.float32([[0.5, -1.0, 2.0]])
    want = ((a + np.asarray(res.branch.bias[...])) * np.asarray(res.branch.scale[...])
            + (x + np.asarray(res.residual.bias[...])) * np.asarray(res.residual.scale[...]))
    np.testing.assert_allclose(res(jnp.asarray(a), jnp.asarray(x)), want, rtol=1e-6)
    assert res(jnp.asarray(a, jnp.bfloat16), jnp.asarray(x)).dtype == jnp.float32  # fp32 stream stays fp32
