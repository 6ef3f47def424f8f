"""CSA kernels against the pure-JAX reference: forward and gradients (q, kv, kv_comp, sinks) for the Triton
lowering (interpret mode on CPU, compiled on a GPU) and the Mosaic lowering (TPU interpreter), odd lengths,
batch 2, fp32 and bf16, segments with padding, unused (-1) and repeated top-k slots; the backward's ways of
forming dK=dV of the selected rows (`dkv`) and the inverted index they read."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import BlockSizes, compressed_gpu, compressed_tpu, csa_attention
from pallas_kernels.compressed_inverted import inverted_index
from tests.pallas_kernels.conftest import SMALL_BLOCKS, TOL, output_and_grads


def make_inputs(dtype, *, B=2, T=13, H=4, D=16, S=5, K=4, seed=0):
    ks = jax.random.split(jax.random.key(seed), 5)
    q = jax.random.normal(ks[0], (B, T, H, D), jnp.float32).astype(dtype)
    kv = jax.random.normal(ks[1], (B, T, D), jnp.float32).astype(dtype)
    kv_comp = jax.random.normal(ks[2], (B, S, D), jnp.float32).astype(dtype)
    sinks = jax.random.normal(ks[3], (H,), jnp.float32)
    indices = jax.random.randint(ks[4], (B, T, K), -1, S, jnp.int32)
    indices = indices.at[0, 3, :4].set(jnp.array([2, -1, 2, 0]))       # a repeated row and an unused slot
    indices = indices.at[1, 0].set(-1)                                  # nothing selected at all
    segment_ids = jnp.ones((B, T), jnp.int32)
    segment_ids = segment_ids.at[1].set(jnp.array([1] * 5 + [2] * (T - 7) + [0] * 2))  # 2 segments + padding
    return q, kv, kv_comp, indices, sinks, segment_ids


def _output_and_grads(impl, blocks, window, indices, segment_ids):
    return output_and_grads(lambda q, kv, kv_comp, sinks: csa_attention(
        q, kv, kv_comp, indices, sinks, window=window, segment_ids_BT=segment_ids, impl=impl, block_sizes=blocks))


@pytest.mark.parametrize("impl,dtype", [("pallas_gpu", jnp.float32), ("pallas_gpu", jnp.bfloat16),
                                        ("pallas_tpu", jnp.float32)])
def test_matches_reference(impl, dtype, assert_close):
    q, kv, kv_comp, indices, sinks, segment_ids = make_inputs(dtype)
    probe = jax.random.normal(jax.random.key(7), q.shape)
    out, grads = _output_and_grads(impl, SMALL_BLOCKS[impl], 8, indices, segment_ids)(q, kv, kv_comp, sinks, probe)
    ref, ref_grads = _output_and_grads("xla", None, 8, indices, segment_ids)(q, kv, kv_comp, sinks, probe)
    assert out.dtype == dtype
    assert_close(out, ref, TOL[dtype], "out")
    for name, g, r in zip(("dq", "dkv", "dkv_comp", "dsinks"), grads, ref_grads):
        assert g.dtype == r.dtype, name
        assert_close(g, r, TOL[dtype], name)


def test_large_head_dim_and_default_scale(assert_close):
    """head_dim 512 with the DeepSeek default scale D**-0.5, more heads than one head block."""
    q, kv, kv_comp, indices, sinks, _ = make_inputs(jnp.bfloat16, B=1, T=7, H=24, D=512, S=40, K=24, seed=3)
    blocks = BlockSizes(block_h=16, block_k=16, block_h_dq=16, block_k_dq=16, block_kv_bwd=16, block_rows_bwd=32)
    probe = jax.random.normal(jax.random.key(7), q.shape)
    out, grads = _output_and_grads("pallas_gpu", blocks, 5, indices, None)(q, kv, kv_comp, sinks, probe)
    ref, ref_grads = _output_and_grads("xla", None, 5, indices, None)(q, kv, kv_comp, sinks, probe)
    assert_close(out, ref, 1e-2, "out")
    for name, g, r in zip(("dq", "dkv", "dkv_comp", "dsinks"), grads, ref_grads):
        assert_close(g, r, 1e-2, name)


def test_padding_and_other_segments_are_never_attended():
    q, kv, kv_comp, indices, sinks, segment_ids = make_inputs(jnp.float32)
    run = jax.jit(lambda kv: csa_attention(q, kv, kv_comp, indices, sinks, window=8, segment_ids_BT=segment_ids,
                                           impl="pallas_gpu", block_sizes=SMALL_BLOCKS["pallas_gpu"]))
    out = run(kv)
    changed = run(kv.at[1, -2:].set(1e3))                   # the two padding tokens of sequence 1
    np.testing.assert_array_equal(out[1, :-2], changed[1, :-2])
    changed = run(kv.at[1, :5].set(1e3))                    # segment 1 of sequence 1
    np.testing.assert_array_equal(out[1, 5:-2], changed[1, 5:-2])
    assert not np.array_equal(out[1, :5], changed[1, :5])


@pytest.mark.parametrize("bad,message", [
    (dict(q_BTNH=jnp.zeros((2, 13, 4))), "q must be 4-d"),
    (dict(kv_BTH=jnp.zeros((2, 12, 16))), "kv has shape"),
    (dict(kv_comp_BCH=jnp.zeros((2, 5, 8))), "kv_comp has shape"),
    (dict(indices_BTK=jnp.zeros((2, 13, 4), jnp.float32)), "indices must have dtype"),
    (dict(sinks_N=jnp.zeros((3,))), "sinks has shape"),
    (dict(kv_BTH=jnp.zeros((2, 13, 16), jnp.bfloat16)), "kv must have dtype"),
])
def test_bad_inputs_name_the_tensor(bad, message):
    q, kv, kv_comp, indices, sinks, _ = make_inputs(jnp.float32)
    args = dict(q_BTNH=q, kv_BTH=kv, kv_comp_BCH=kv_comp, indices_BTK=indices, sinks_N=sinks) | bad
    with pytest.raises(ValueError, match=message):
        csa_attention(**args, window=8)
    with pytest.raises(ValueError, match="window must be a positive int"):
        csa_attention(q, kv, kv_comp, indices, sinks, window=0)
    with pytest.raises(ValueError, match="unknown impl"):
        csa_attention(q, kv, kv_comp, indices, sinks, window=8, impl="triton")
    with pytest.raises(ValueError, match="dkv must be one of"):
        csa_attention(q, kv, kv_comp, indices, sinks, window=8, dkv="scatter")


def _selection_cases(T=11, C=40, K=6, seed=5):
    """Top-k rows covering the backward's corner cases: entry 0 picked by every token, entries >= 30 by
    none, -1 slots (also mid-list), a row repeated within a token, a token with nothing selected."""
    rows = np.random.default_rng(seed).integers(1, 30, size=(2, T, K)).astype(np.int32)
    rows[:, :, 0] = 0
    rows[:, ::3, 2] = -1
    rows[:, 1::4, K - 2:] = -1
    rows[0, 4, 3] = rows[0, 4, 1]
    rows[1, 5] = -1
    return jnp.asarray(rows)


def test_inverted_index_lists_every_selection():
    idx = np.asarray(_selection_cases())
    block, n_blocks = 16, 3
    index = [np.asarray(x) for x in inverted_index(jnp.asarray(idx), num_blocks=n_blocks, block=block, pad=4)]
    block_start, pair_token, pair_start, entries, selections = index
    for b in range(idx.shape[0]):
        for cb in range(n_blocks):
            expected_pairs = [(t, sorted((int(e), t * idx.shape[2] + k) for k, e in enumerate(idx[b, t])
                                         if e >= 0 and e // block == cb))
                              for t in range(idx.shape[1])]
            expected_pairs = [(t, sel) for t, sel in expected_pairs if sel]
            got_pairs = []
            for p in range(block_start[b, cb], block_start[b, cb + 1]):
                run = range(pair_start[b, p], pair_start[b, p + 1])
                got_pairs.append((int(pair_token[b, p]), sorted((int(entries[b, i]), int(selections[b, i]))
                                                                for i in run)))
            assert got_pairs == expected_pairs, (b, cb)
        n_valid = int(np.sum(idx[b] >= 0))
        assert pair_start[b, block_start[b, n_blocks]] == n_valid
        assert np.all(entries[b, n_valid:] == -1)


@functools.cache
def _selection_case_run(impl, dkv, blocks):
    """Output and gradients on the _selection_cases top-k (cached: the reference serves every case)."""
    indices = _selection_cases()
    q, kv, kv_comp, _, sinks, segment_ids = make_inputs(jnp.float32, T=11, H=20, S=40, K=6, seed=2)
    probe = jax.random.normal(jax.random.key(7), q.shape)
    return output_and_grads(lambda q, kv, kv_comp, sinks: csa_attention(
        q, kv, kv_comp, indices, sinks, window=4, segment_ids_BT=segment_ids, impl=impl, block_sizes=blocks,
        dkv=dkv))(q, kv, kv_comp, sinks, probe)


# (impl, dkv, block sizes, STAGE_BYTES for 3-token chunks: tokens x head blocks x Kp x Hp x 4 bytes)
_GPU_BLOCKS = BlockSizes(block_h=16, block_k=16, block_h_dq=16, block_k_dq=16, block_kv_bwd=16, block_rows_bwd=16)
_DKV_CASES = [("pallas_gpu", dkv, _GPU_BLOCKS, 3 * 2 * 16 * 16 * 4) for dkv in ("atomic", "inverted", "staged")] + [
    ("pallas_tpu", dkv, SMALL_BLOCKS["pallas_tpu"], 3 * 8 * 16 * 4) for dkv in ("inverted", "staged")]


@pytest.mark.parametrize("impl,dkv,blocks,stage_bytes", _DKV_CASES, ids=[f"{c[0]}-{c[1]}" for c in _DKV_CASES])
def test_dkv_paths_match_reference(impl, dkv, blocks, stage_bytes, assert_close, monkeypatch):
    """The ways of forming dK=dV of the selected rows, with two GPU head blocks, several entry blocks (the
    last ones never selected) and, for "staged", token chunks of 3 (the last one padded)."""
    monkeypatch.setattr(compressed_gpu if impl == "pallas_gpu" else compressed_tpu, "STAGE_BYTES", stage_bytes)
    out, grads = _selection_case_run(impl, dkv, blocks)
    ref, ref_grads = _selection_case_run("xla", "atomic", None)
    assert_close(out, ref, 1e-5, "out")
    assert np.all(np.asarray(ref_grads[2])[:, 30:] == 0) and np.any(np.asarray(ref_grads[2])[:, 0] != 0)
    for name, g, r in zip(("dq", "dkv", "dkv_comp", "dsinks"), grads, ref_grads):
        assert_close(g, r, 1e-5, name)


@pytest.mark.parametrize("dkv", ["inverted", "staged"])
@pytest.mark.parametrize("impl,platform,marker", [("pallas_gpu", "cuda", "__gpu$xla.gpu.triton"),
                                                  ("pallas_tpu", "tpu", "tpu_custom_call")], ids=["triton", "mosaic"])
def test_dkv_paths_lower_for_the_real_platform(dkv, impl, platform, marker):
    """Forward and backward of the atomic-free paths go through the Triton / Mosaic lowering at V4-Flash
    shapes (64 heads x 512, window 128, top-k 128) on CPU; compiling them needs the device."""
    B, T, N, H = 1, 256, 64, 512
    spec = lambda *shape, dtype=jnp.bfloat16: jax.ShapeDtypeStruct(shape, dtype)

    def grads(q, kv, kv_comp, indices, sinks):
        loss = lambda *a: csa_attention(*a[:3], indices, a[3], window=128, impl=impl, interpret=False,
                                        dkv=dkv).sum(dtype=jnp.float32)
        return jax.grad(loss, argnums=(0, 1, 2, 3))(q, kv, kv_comp, sinks)

    exported = jax.export.export(
        jax.jit(grads), platforms=[platform],
        disabled_checks=[jax.export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")],
    )(spec(B, T, N, H), spec(B, T, H), spec(B, T // 4, H), spec(B, T, 128, dtype=jnp.int32),
      spec(N, dtype=jnp.float32))
    assert marker in exported.mlir_module()
