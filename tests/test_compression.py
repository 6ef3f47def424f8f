"""Sequence compressors and the lightning indexer against direct loops, and causality: no query ever
selects or sees a compressed entry whose window has not ended, and padding never enters an entry."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from layers.compression import Compressor, LightningIndexer, entry_visibility, top_k_entries
from layers.rope import RopeSpec
from layers.sparse_attention import CompressedAttention, csa_attention, hca_attention

D, H, ROPE_DIM, THETA, EPS = 24, 12, 4, 100.0, 1e-6
ROPE = RopeSpec(kind="default", theta=THETA, style="interleaved")
run = nnx.jit(lambda module, *args: module(*args))   # one compiled call instead of many eager ops


def normal(seed: int, *shape) -> jax.Array:
    return jnp.asarray(np.random.default_rng(seed).normal(size=shape), jnp.float32)


def build(factory, seed: int):
    """The module with every parameter random (norm scales and position biases start at constants),
    drawn by numpy: no per-shape jax.random programs to compile."""
    module = nnx.eval_shape(factory)
    rng = np.random.default_rng(seed)
    for _, var in nnx.to_flat_state(nnx.state(module, nnx.Param)):
        value = var.get_value()
        var.set_value(jnp.asarray(rng.normal(size=value.shape) * (1.0 if value.ndim == 1 else 0.5), value.dtype))
    return module


def _loop_compress(comp: Compressor, x, positions, segments=None) -> np.ndarray:
    """Entry by entry, channel by channel, with the rotation written out."""
    kv = np.asarray(x) @ np.asarray(comp.kv_proj[...])
    gate = np.asarray(x) @ np.asarray(comp.gate_proj[...])
    bias, scale = np.asarray(comp.position_bias[...]), np.asarray(comp.norm.scale[...])
    B, T, _ = x.shape
    R = comp.ratio
    out = np.zeros((B, T // R, H), np.float32)
    for b, s in np.ndindex(B, T // R):
        last = (s + 1) * R - 1
        own = range(s * R, last + 1)
        e = np.zeros(H, np.float32)
        for c in range(H):
            # (token, channel): own window, second half when windows overlap; previous window, first half
            sources = [(t, H + c if comp.overlap else c) for t in own]
            if comp.overlap and s > 0:
                sources += [(t, c) for t in range(s * R - R, s * R)]
            if segments is not None:
                sources = [(t, ch) for t, ch in sources if segments[b, t] == segments[b, last] != 0]
            if sources:
                g = np.array([gate[b, t, ch] + bias[t % R, ch] for t, ch in sources])
                w = np.exp(g - g.max())
                e[c] = (w / w.sum()) @ np.array([kv[b, t, ch] for t, ch in sources])
        e = e / np.sqrt(np.mean(e ** 2) + EPS) * scale
        pos = positions[b, last] - (R - 1)
        for i in range(ROPE_DIM // 2):
            angle, j = pos * THETA ** (-2 * i / ROPE_DIM), H - ROPE_DIM + 2 * i
            e[j], e[j + 1] = (e[j] * np.cos(angle) - e[j + 1] * np.sin(angle),
                              e[j + 1] * np.cos(angle) + e[j] * np.sin(angle))
        out[b, s] = e
    return out


@pytest.mark.parametrize("ratio,overlap", [(4, True), (8, False)])
def test_compressor_matches_loop(ratio, overlap):
    comp = build(lambda: Compressor(D, H, ratio, overlap=overlap, rope=ROPE, rope_dim=ROPE_DIM, eps=EPS,
                                    rngs=nnx.Rngs(0)), 1)
    x = normal(2, 2, 35, D)          # 35: a trailing partial window
    positions = jnp.broadcast_to(jnp.arange(35) + 3, (2, 35))
    got = np.asarray(run(comp, x, positions))
    assert got.shape == (2, 35 // ratio, H)
    np.testing.assert_allclose(got, _loop_compress(comp, x, np.asarray(positions)), atol=2e-5)


def test_padding_and_other_segments_are_never_pooled():
    """Left padding, two packed segments and right padding: entries match the loop that skips foreign
    tokens, and changing the padding or another segment's tokens leaves an entry unchanged."""
    comp = build(lambda: Compressor(D, H, 4, overlap=True, rope=ROPE, rope_dim=ROPE_DIM, eps=EPS,
                                    rngs=nnx.Rngs(0)), 3)
    segments = np.array([[0] * 6 + [1] * 13 + [2] * 9 + [0] * 4], np.int32)   # T = 32, 8 entries
    x = normal(4, 1, 32, D)
    positions = jnp.arange(32)[None]
    got = np.asarray(run(comp, x, positions, jnp.asarray(segments)))
    np.testing.assert_allclose(got, _loop_compress(comp, x, np.asarray(positions), segments), atol=2e-5)
    noisy = x.at[:, :6].set(9.0).at[:, 28:].set(-9.0).at[:, 19:28].add(1.0)   # padding and segment 2 change
    changed = np.asarray(run(comp, noisy, positions, jnp.asarray(segments)))
    own_seg1 = [s for s in range(8) if segments[0, 4 * s + 3] == 1]
    np.testing.assert_allclose(changed[0, own_seg1], got[0, own_seg1], atol=1e-6)
    visible = np.asarray(entry_visibility(32, 8, 4, jnp.asarray(segments)))[0]
    assert not visible[:, [0, 7]].any()                       # all-padding entries are seen by no one
    assert not visible[:19, [s for s in range(8) if segments[0, 4 * s + 3] == 2]].any()


def test_indexer_never_selects_the_future():
    idx = build(lambda: LightningIndexer(D, 16, num_heads=3, head_dim=8, ratio=4, top_k=5, overlap=True,
                                         rope=ROPE, rope_dim=ROPE_DIM, eps=EPS, rngs=nnx.Rngs(0)), 5)
    T = 48
    x = normal(6, 2, T, D)
    qr = normal(7, 2, T, 16)
    chosen = np.asarray(run(idx, x, qr, jnp.broadcast_to(jnp.arange(T), (2, T))))
    assert chosen.shape == (2, T, 5)
    for t in range(T):
        visible = (t + 1) // 4
        row = chosen[:, t]
        assert ((row >= 0) & (row < visible) | (row == -1)).all(), (t, row)
        assert ((row >= 0).sum(-1) == min(5, visible)).all()       # every slot used while entries remain
        assert all(len(set(r[r >= 0])) == (r >= 0).sum() for r in row)
    scores = jnp.array([[[3.0, -jnp.inf, 1.0, -jnp.inf]]])
    np.testing.assert_array_equal(top_k_entries(scores, 3), [[[0, 2, -1]]])


@pytest.mark.parametrize("kind", ["csa", "hca"])
def test_layer_is_causal(kind):
    """The whole layer (compressor, indexer, window, top-k): outputs before t ignore the tokens after t."""
    attn = build(lambda: CompressedAttention(
        D, 4, H, q_rank=16, out_groups=2, out_rank=8, window=5, rope=ROPE, rope_dim=ROPE_DIM, compress_ratio=4,
        overlap=kind == "csa", index_heads=3, index_dim=8, index_top_k=2 if kind == "csa" else 0, eps=EPS,
        rngs=nnx.Rngs(0)), 8)
    T, cut = 40, 21
    x = normal(9, 1, T, D)
    positions = jnp.arange(T)[None]
    before = np.asarray(run(attn, x, positions))
    after = np.asarray(run(attn, x.at[:, cut:].set(normal(10, 1, T - cut, D)), positions))
    np.testing.assert_allclose(after[:, :cut], before[:, :cut], atol=1e-5)
    assert np.abs(after[:, cut:] - before[:, cut:]).max() > 1e-3


def test_csa_with_every_visible_entry_is_hca():
    B, T, N, S, ratio = 2, 24, 3, 6, 4
    q, kv, comp, sinks = normal(11, B, T, N, H), normal(12, B, T, H), normal(13, B, S, H), normal(14, N)
    visible = np.asarray(entry_visibility(T, S, ratio))[0]
    indices = np.where(visible, np.arange(S), -1)[None].repeat(B, 0)[..., ::-1].astype(np.int32)  # any order
    csa = jax.jit(lambda *a: csa_attention(*a, window=5, scale=H ** -0.5))
    hca = jax.jit(lambda *a: hca_attention(*a, window=5, ratio=ratio, scale=H ** -0.5))
    np.testing.assert_allclose(csa(q, kv, comp, jnp.asarray(indices), sinks), hca(q, kv, comp, sinks), atol=1e-6)


@pytest.mark.parametrize("kind, csa_dkv, fused_topk", [("csa", "atomic", False), ("csa", "staged", True),
                                                      ("hca", "atomic", False), ("sliding", "atomic", False)])
def test_layer_kernels_match_the_references_on_packed_segments(kind, csa_dkv, fused_topk):
    """attention_impl="pallas" (kernels in interpret mode, including the indexer's chunked or fused top-k,
    and CSA's atomic or staged backward) against the pure-JAX layer on two packed documents and right
    padding: outputs and parameter gradients."""
    attn = build(lambda: CompressedAttention(
        D, 4, H, q_rank=16, out_groups=2, out_rank=8, window=5, rope=ROPE, rope_dim=ROPE_DIM,
        compress_ratio=0 if kind == "sliding" else 4, overlap=kind == "csa", index_heads=3, index_dim=8,
        index_top_k=3 if kind == "csa" else 0, eps=EPS, csa_dkv=csa_dkv, fused_topk=fused_topk,
        rngs=nnx.Rngs(0)), 12)
    T = 40
    x = normal(15, 2, T, D)
    segments = jnp.asarray(np.array([[1] * T, [1] * 13 + [2] * 24 + [0] * 3]), jnp.int32)
    positions = jnp.asarray(np.array([np.arange(T), list(range(13)) + list(range(24)) + [0] * 3]), jnp.int32)

    def loss_and_grads(impl):
        attn.impl = impl
        graphdef, params = nnx.split(attn, nnx.Param)
        loss = lambda p: jnp.sum(nnx.merge(graphdef, p)(x, positions, segment_ids_BT=segments) ** 2)
        out = jax.jit(lambda p: nnx.merge(graphdef, p)(x, positions, segment_ids_BT=segments))(params)
        return out, jax.jit(jax.grad(loss))(params)

    ref, ref_grads = loss_and_grads("xla")
    out, grads = loss_and_grads("pallas")
    if kind == "csa":   # the options reach the kernels
        graphdef, params = nnx.split(attn, nnx.Param)
        program = str(jax.make_jaxpr(jax.grad(lambda p: jnp.sum(nnx.merge(graphdef, p)(
            x, positions, segment_ids_BT=segments))))(params))
        assert ("name=indexer_topk_fused" in program) == fused_topk
        assert ("name=csa_staged_dkv" in program) == (csa_dkv == "staged")
    def relative_error(a, b):   # against the array's scale (the indexer's gradients are all zero: the top-k cuts them)
        a, b = np.asarray(a), np.asarray(b)
        return float(np.abs(a - b).max() / (np.abs(b).max() or 1.0))

    assert np.isfinite(np.asarray(out)).all()
    assert relative_error(out, ref) < 1e-5
    for (path, g), (_, r) in zip(nnx.to_flat_state(grads), nnx.to_flat_state(ref_grads)):
        assert relative_error(g.get_value(), r.get_value()) < 1e-5, path


def test_unknown_csa_dkv_is_named():
    with pytest.raises(ValueError, match="unknown csa_dkv 'fast'; expected one of"):
        CompressedAttention(D, 4, H, q_rank=16, out_groups=2, out_rank=8, window=5, rope=ROPE, rope_dim=ROPE_DIM,
                            compress_ratio=4, overlap=True, index_heads=3, index_dim=8, index_top_k=3, eps=EPS,
                            csa_dkv="fast", rngs=nnx.Rngs(0))
