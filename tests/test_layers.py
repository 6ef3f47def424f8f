"""Unit tests of shared layers against transformers' code and against arithmetic."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers import Gemma4TextConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
from transformers.models.gemma4.modeling_gemma4 import apply_rotary_pos_emb

from configs.gemma4 import get_config
from layers.attention import attention_mask, reference_attention
from layers.moe import Experts, grouped_matmul, routed_experts
from layers.partitioning import Partitioning
from layers.rope import RopeSpec, apply_rope
from zoo.gemma4 import kv_share_sources


def test_proportional_inv_freq_matches_transformers():
    config = Gemma4TextConfig(head_dim=256, global_head_dim=512, num_hidden_layers=6)
    hf_inv_freq, _ = ROPE_INIT_FUNCTIONS["proportional"](config, None, layer_type="full_attention")
    ours = RopeSpec(kind="proportional", theta=1e6, fraction=0.25).inv_frequencies(512)
    np.testing.assert_allclose(ours, hf_inv_freq.numpy(), rtol=1e-6)
    assert ours.shape == (256,) and np.count_nonzero(ours) == 64
    # the exponent's denominator is the full head dim: the 2nd frequency is 1e6 ** (-2/512)
    np.testing.assert_allclose(ours[1], 1e6 ** (-2 / 512), rtol=1e-6)


def test_rope_rotation_matches_transformers():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 7, 3, 32)).astype(np.float32)
    pos = np.stack([np.arange(7), np.arange(7) + 100]).astype(np.int32)
    for spec in (RopeSpec(theta=1e4), RopeSpec(kind="proportional", theta=1e6, fraction=0.25)):
        inv = torch.from_numpy(spec.inv_frequencies(32))
        freqs = torch.from_numpy(pos).float()[..., None] * inv
        emb = torch.cat([freqs, freqs], -1)
        expected = apply_rotary_pos_emb(torch.from_numpy(x), emb.cos(), emb.sin(), unsqueeze_dim=2).numpy()
        ours = np.asarray(apply_rope(jnp.asarray(x), jnp.asarray(pos), spec))
        np.testing.assert_allclose(ours, expected, atol=2e-5)


def test_partial_and_interleaved_rope_are_rotations():
    x = jax.random.normal(jax.random.key(0), (1, 5, 2, 16))
    pos = jnp.arange(5)[None] * 7
    for spec in (RopeSpec(fraction=0.5), RopeSpec(style="interleaved")):
        y = apply_rope(x, pos, spec)
        np.testing.assert_allclose(jnp.linalg.norm(y, axis=-1), jnp.linalg.norm(x, axis=-1), rtol=1e-5)
        np.testing.assert_allclose(apply_rope(y, pos, spec, inverse=True), x, atol=1e-5)
    partial = apply_rope(x, pos, RopeSpec(fraction=0.5))
    np.testing.assert_array_equal(partial[..., 8:], x[..., 8:])  # dims past the rotary width pass through


def test_kv_share_sources_released_e2b_e4b():
    e2b = get_config("e2b").model
    assert e2b.kv_sources[15:] == tuple(13 if t == "sliding" else 14 for t in e2b.attention_types[15:])
    assert all(s == -1 for s in e2b.kv_sources[:15])
    e4b = get_config("e4b").model
    assert set(e4b.kv_sources[24:]) == {22, 23}
    assert e4b.kv_sources[41] == 23 and e4b.kv_sources[40] == 22


def test_kv_share_sources_needs_an_owner_of_each_type():
    with pytest.raises(ValueError, match="no earlier non-shared full layer"):
        kv_share_sources(("sliding", "sliding", "full"), 1)


def test_attention_mask_causal_window_segments():
    pos = jnp.arange(6)[None]
    mask = np.asarray(attention_mask(pos, pos, window=3))[0]
    expected = np.array([[i - 3 < j <= i for j in range(6)] for i in range(6)])
    np.testing.assert_array_equal(mask, expected)
    seg = jnp.array([[1, 1, 2, 2, 2, 0]])
    mask = np.asarray(attention_mask(pos, pos, q_segment_ids_BT=seg, kv_segment_ids_BS=seg))[0]
    assert mask[3, 2] and not mask[2, 1] and not mask[5].any() and not mask[:, 5].any()


def test_reference_attention_gqa_and_sinks_against_loop():
    rng = np.random.default_rng(1)
    B, T, N, K, H = 2, 5, 4, 2, 8
    q, k, v = (rng.standard_normal(s).astype(np.float32) for s in ((B, T, N, H), (B, T, K, H), (B, T, K, H)))
    sinks = rng.standard_normal(N).astype(np.float32)
    mask = np.tril(np.ones((T, T), bool))[None].repeat(B, 0)
    out = np.asarray(reference_attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), jnp.asarray(mask),
                                         scale=0.3, sinks_N=jnp.asarray(sinks)))
    for b in range(B):
        for t in range(T):
            for n in range(N):
                logits = 0.3 * k[b, : t + 1, n // 2] @ q[b, t, n]
                w = np.exp(logits - logits.max())
                w /= w.sum() + np.exp(sinks[n] - logits.max())
                np.testing.assert_allclose(out[b, t, n], w @ v[b, : t + 1, n // 2], atol=1e-5)


@pytest.mark.parametrize("matmul", ["ragged", "blocked", "pallas"])
def test_experts_grouped_matmul_matches_per_token_loop(matmul):
    from flax import nnx
    experts = Experts(4, 6, 5, activation="silu", matmul=matmul, rngs=nnx.Rngs(0))
    rng = np.random.default_rng(2)
    x = rng.standard_normal((7, 6)).astype(np.float32)
    ids = rng.integers(0, 4, size=(7, 2))
    ids[:, 1] = (ids[:, 0] + 1) % 4
    w = rng.random((7, 2)).astype(np.float32)
    out = np.asarray(experts(jnp.asarray(x), jnp.asarray(ids), jnp.asarray(w)))
    g, u, d = (np.asarray(p[...]) for p in (experts.gate_proj, experts.up_proj, experts.down_proj))
    for m in range(7):
        want = sum(w[m, j] * ((jax.nn.silu(x[m] @ g[e]) * (x[m] @ u[e])) @ d[e]) for j, e in enumerate(ids[m]))
        np.testing.assert_allclose(out[m], want, atol=1e-5)


def test_routed_experts_seam_and_shards():
    """`routed_experts` on two halves of the experts (ids shifted by each half's first expert, as an
    expert-parallel shard computes them) adds up to all experts at once, forward and gradients; and
    a partitioning's `routed_experts` swaps what `Experts` computes only in the calls it is passed to."""
    from flax import nnx
    E, D, F, M, K = 4, 6, 5, 7, 2
    experts = Experts(E, D, F, activation="silu", limit=0.5, rngs=nnx.Rngs(0))
    k = jax.random.split(jax.random.key(3), 4)
    x, w, probe = (jax.random.normal(k[0], (M, D)), jax.random.uniform(k[1], (M, K)),
                   jax.random.normal(k[2], (M, D)))
    ids = jax.random.randint(k[3], (M, K), 0, E)
    weights = tuple(p[...] for p in (experts.gate_proj, experts.up_proj, experts.down_proj))

    def loss(x, w, *weights, shards):
        """The probed output summed over `shards` shards, each computing its own E / shards experts."""
        n = E // shards
        return sum(jnp.einsum("MD,MD->", routed_experts(x, ids - first, w, *(a[first:first + n] for a in weights),
                                                         act=experts.act, limit=0.5), probe)
                   for first in range(0, E, n))

    for got, want in zip(jax.value_and_grad(functools.partial(loss, shards=2), argnums=range(5))(x, w, *weights),
                         jax.value_and_grad(functools.partial(loss, shards=1), argnums=range(5))(x, w, *weights)):
        for g, r in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
            np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-5)
    plain = experts(x, ids, w)
    doubled = Partitioning(routed_experts=lambda *args, **kwargs: 2 * routed_experts(*args, **kwargs))
    np.testing.assert_allclose(experts(x, ids, w, partitioning=doubled), 2 * plain, rtol=1e-6)
    np.testing.assert_array_equal(experts(x, ids, w), plain)


@pytest.mark.parametrize("P, D, F, sizes", [
    (24, 5, 3, [0, 10, 0, 14]),              # empty groups
    (13, 4, 6, [0, 13, 0]),                  # one group holds every row
    (21, 3, 4, [4, 0, 7, 2]),                # sum(group_sizes) < P: the last rows give zeros
    (37, 6, 5, [9, 11, 17]),                 # P not a multiple of the block (m = 16)
    (5, 4, 3, [1, 0, 2, 0, 0, 1, 0, 1, 0]),  # more experts than rows
    (300, 8, 4, [130, 0, 1, 150, 19]),       # groups of several blocks (m = 64)
])
def test_blocked_grouped_matmul_matches_ragged_dot(P, D, F, sizes):
    E = len(sizes)
    kx, kw, kc = jax.random.split(jax.random.key(P), 3)
    x = jax.random.normal(kx, (P, D), jnp.float32)
    w = jax.random.normal(kw, (E, D, F), jnp.float32)
    cot = jax.random.normal(kc, (P, F), jnp.float32)
    gs = jnp.asarray(sizes, jnp.int32)
    ref = jax.lax.ragged_dot(x, w, gs)
    got = jax.jit(lambda x, w, gs: grouped_matmul(x, w, gs, impl="blocked"))(x, w, gs)
    assert got.shape == ref.shape and got.dtype == ref.dtype
    np.testing.assert_allclose(got, ref, atol=1e-5, rtol=1e-5)
    assert not np.asarray(got[sum(sizes):]).any()
    loss = lambda f: (lambda x, w: jnp.sum(f(x, w, gs) * cot))
    ref_grads = jax.grad(loss(jax.lax.ragged_dot), argnums=(0, 1))(x, w)
    got_grads = jax.grad(loss(lambda x, w, gs: grouped_matmul(x, w, gs, impl="blocked")), argnums=(0, 1))(x, w)
    for g, r in zip(got_grads, ref_grads):
        np.testing.assert_allclose(g, r, atol=1e-5, rtol=1e-5)
    xb, wb = x.astype(jnp.bfloat16), w.astype(jnp.bfloat16)
    ref, got = jax.lax.ragged_dot(xb, wb, gs), grouped_matmul(xb, wb, gs, impl="blocked")
    assert got.dtype == ref.dtype == jnp.bfloat16
    np.testing.assert_allclose(got.astype(jnp.float32), ref.astype(jnp.float32), atol=1e-2, rtol=1e-2)


def test_grouped_matmul_rejects_bad_arguments():
    from flax import nnx

    import zoo
    from tests.sharding_runs import micro_config
    with pytest.raises(ValueError, match="unknown experts_matmul 'cutlass'"):
        Experts(4, 6, 5, matmul="cutlass", rngs=nnx.Rngs(0))
    for key, value in (("experts_matmul", "cutlass"), ("csa_dkv", "fast")):   # named from the config
        cfg = micro_config("deepseek_v4").model
        cfg[key] = value
        with pytest.raises(ValueError, match=f"layer 0: unknown model.{key} '{value}'"):
            zoo.build(cfg)
    x, w, gs = jnp.ones((6, 4)), jnp.ones((3, 4, 5)), jnp.array([2, 2, 2])
    with pytest.raises(ValueError, match="unknown impl 'triton'"):
        grouped_matmul(x, w, gs, impl="triton")
    with pytest.raises(ValueError, match="group_sizes has length 2 but w has E=3"):
        grouped_matmul(x, w, gs[:2])
    with pytest.raises(ValueError, match="ranks"):
        grouped_matmul(x[None], w, gs)
    with pytest.raises(ValueError, match="does not match"):
        grouped_matmul(x, jnp.ones((3, 5, 5)), gs)
