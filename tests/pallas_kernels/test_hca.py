"""HCA kernels against the pure-JAX reference: forward and gradients (q, kv, kv_comp, sinks) for the Triton
lowering (interpret mode on CPU, compiled on a GPU) and the Mosaic lowering (TPU interpreter), odd lengths,
batch 2, fp32 and bf16, segments with padding, no compressed entry at all."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import hca_attention
from tests.pallas_kernels.conftest import SMALL_BLOCKS, TOL, output_and_grads


def make_inputs(dtype, *, B=2, T=29, H=4, D=32, ratio=4, seed=0):
    ks = jax.random.split(jax.random.key(seed), 4)
    q = jax.random.normal(ks[0], (B, T, H, D), jnp.float32).astype(dtype)
    kv = jax.random.normal(ks[1], (B, T, D), jnp.float32).astype(dtype)
    kv_comp = jax.random.normal(ks[2], (B, T // ratio, D), jnp.float32).astype(dtype)
    sinks = jax.random.normal(ks[3], (H,), jnp.float32)
    segment_ids = jnp.ones((B, T), jnp.int32).at[-1].set(jnp.array([1] * 9 + [2] * (T - 12) + [0] * 3))
    return q, kv, kv_comp, sinks, segment_ids


def _output_and_grads(impl, blocks, window, ratio, segment_ids):
    return output_and_grads(lambda q, kv, kv_comp, sinks: hca_attention(
        q, kv, kv_comp, sinks, window=window, ratio=ratio, segment_ids_BT=segment_ids, impl=impl, block_sizes=blocks))


@pytest.mark.parametrize("impl,dtype", [("pallas_gpu", jnp.float32), ("pallas_gpu", jnp.bfloat16),
                                        ("pallas_tpu", jnp.float32)])
def test_matches_reference(impl, dtype, assert_close):
    """T=29, ratio 4: 7 entries, the first visible from token 3; entry blocks of 16 (GPU) / 8 (TPU) mean
    both partial and skipped blocks."""
    q, kv, kv_comp, sinks, segment_ids = make_inputs(dtype)
    probe = jax.random.normal(jax.random.key(7), q.shape)
    args = (q, kv, kv_comp, sinks, probe)
    out, grads = _output_and_grads(impl, SMALL_BLOCKS[impl], 8, 4, segment_ids)(*args)
    ref, ref_grads = _output_and_grads("xla", None, 8, 4, segment_ids)(*args)
    assert out.dtype == dtype
    assert_close(out, ref, TOL[dtype], "out")
    for name, g, r in zip(("dq", "dkv", "dkv_comp", "dsinks"), grads, ref_grads):
        assert g.dtype == r.dtype, name
        assert_close(g, r, TOL[dtype], name)


@pytest.mark.parametrize("impl", ["pallas_gpu", "pallas_tpu"])
def test_a_late_segment_skips_the_entries_before_it(impl, assert_close):
    """Ratio 2, a second segment from token 37: its tokens see entries 18.. only (entry s belongs to the
    segment of its last token 2s + 1), so the walk starts past one (GPU) / two (TPU) entry blocks. Checked
    against the model's own reference (layers.sparse_attention), which states the rule by comparing ids."""
    from layers.sparse_attention import hca_attention as model_hca
    q, kv, _, sinks, _ = make_inputs(jnp.float32, T=45, ratio=2)
    kv_comp = jax.random.normal(jax.random.key(3), (2, 22, q.shape[-1]), jnp.float32)
    segment_ids = jnp.ones((2, 45), jnp.int32).at[1].set(jnp.array([1] * 37 + [2] * 5 + [0] * 3))
    probe = jax.random.normal(jax.random.key(7), q.shape)
    out, grads = _output_and_grads(impl, SMALL_BLOCKS[impl], 6, 2, segment_ids)(q, kv, kv_comp, sinks, probe)
    with jax.default_matmul_precision("highest"):   # float32 as float32 (not TF32) on a GPU too
        ref, ref_grads = output_and_grads(lambda q, kv, kv_comp, sinks: model_hca(
            q, kv, kv_comp, sinks, window=6, ratio=2, scale=q.shape[-1] ** -0.5, segment_ids_BT=segment_ids))(
            q, kv, kv_comp, sinks, probe)
    assert_close(out, ref, 1e-5, "out")
    for name, g, r in zip(("dq", "dkv", "dkv_comp", "dsinks"), grads, ref_grads):
        assert_close(g, r, 1e-5, name)


def test_no_visible_entries_and_a_long_ratio(assert_close):
    """ratio 16 > T: zero compressed entries, the window alone (with the sink) carries the softmax."""
    q, kv, _, sinks, _ = make_inputs(jnp.float32, B=1, T=13)
    kv_comp = jnp.zeros((1, 0, q.shape[-1]), q.dtype)
    probe = jax.random.normal(jax.random.key(7), q.shape)
    out, grads = _output_and_grads("pallas_gpu", SMALL_BLOCKS["pallas_gpu"], 4, 16, None)(q, kv, kv_comp, sinks, probe)
    ref, ref_grads = _output_and_grads("xla", None, 4, 16, None)(q, kv, kv_comp, sinks, probe)
    assert_close(out, ref, 1e-5, "out")
    for name, g, r in zip(("dq", "dkv", "dkv_comp", "dsinks"), grads, ref_grads):
        assert_close(g, r, 1e-5, name)


def test_future_entries_and_padding_are_never_attended():
    q, kv, kv_comp, sinks, segment_ids = make_inputs(jnp.float32)
    run = jax.jit(lambda kv, kv_comp: hca_attention(q, kv, kv_comp, sinks, window=8, ratio=4,
                                                    segment_ids_BT=segment_ids, impl="pallas_gpu",
                                                    block_sizes=SMALL_BLOCKS["pallas_gpu"]))
    out = run(kv, kv_comp)
    changed = run(kv.at[1, -3:].set(1e3), kv_comp.at[:, 5:].set(1e3))   # padding tokens; entries 5, 6
    np.testing.assert_array_equal(out[0, :23], changed[0, :23])          # entry 5 pools tokens 20..23
    np.testing.assert_array_equal(out[1, :23], changed[1, :23])
    assert not np.array_equal(out[0, 23:], changed[0, 23:])


@pytest.mark.parametrize("bad,message", [
    (dict(q_BTNH=jnp.zeros((2, 29, 4, 32), jnp.int32)), "q must have dtype"),
    (dict(kv_BTH=jnp.zeros((1, 29, 32))), "kv has shape"),
    (dict(kv_comp_BCH=jnp.zeros((2, 7))), "kv_comp must be 3-d"),
    (dict(sinks_N=jnp.zeros((4, 1))), "sinks must be 1-d"),
])
def test_bad_inputs_name_the_tensor(bad, message):
    q, kv, kv_comp, sinks, _ = make_inputs(jnp.float32)
    args = dict(q_BTNH=q, kv_BTH=kv, kv_comp_BCH=kv_comp, sinks_N=sinks) | bad
    with pytest.raises(ValueError, match=message):
        hca_attention(**args, window=8, ratio=4)
    with pytest.raises(ValueError, match="ratio must be a positive int"):
        hca_attention(q, kv, kv_comp, sinks, window=8, ratio=0)
