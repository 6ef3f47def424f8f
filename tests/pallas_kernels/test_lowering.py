"""Platform plumbing: impl selection, the interpreters' output poisoning the other tests rely on, and that
the Triton and Mosaic lowerings of every kernel (forward and backward) lower for their real platform at
DeepSeek-V4-Flash attention shapes (64 heads, head_dim 512, window 128, indexer 64 x 128), even on CPU."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels import csa_attention, hca_attention, indexer_scores, indexer_topk, resolve_lowering


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="checks the CPU choices")
def test_auto_and_interpret_choices_on_cpu():
    assert resolve_lowering("auto").impl == "xla"
    assert resolve_lowering("pallas_gpu").interpret is True
    assert isinstance(resolve_lowering("pallas_tpu").interpret, pltpu.InterpretParams)
    assert resolve_lowering("pallas_gpu", interpret=False).interpret is False


@pytest.mark.parametrize("interpret", [True, pltpu.InterpretParams()], ids=["triton", "mosaic"])
def test_interpreters_poison_unwritten_outputs(interpret):
    """A kernel that skips its first block leaves NaN there, so `assert_close` (which requires finite values)
    catches output elements a kernel forgot to write. (The TPU interpreter reuses an output's VMEM buffer
    across grid steps: a write missed on a later step shows up as a stale block, i.e. a mismatch.)"""
    def skip_first_block(x_ref, o_ref):
        @pl.when(pl.program_id(0) > 0)
        def _():
            o_ref[...] = x_ref[...]

    out = pl.pallas_call(skip_first_block, grid=(2,), in_specs=[pl.BlockSpec((8, 128), lambda i: (i, 0))],
                         out_specs=pl.BlockSpec((8, 128), lambda i: (i, 0)),
                         out_shape=jax.ShapeDtypeStruct((16, 128), jnp.float32), interpret=interpret)(
        jnp.ones((16, 128), jnp.float32))
    assert np.all(np.isnan(np.asarray(out[:8]))) and np.all(np.asarray(out[8:]) == 1)


B, T, H, D, W, K = 1, 256, 64, 512, 128, 128
SHAPES = dict(q=(B, T, H, D), kv=(B, T, D), kv_csa=(B, T // 4, D), kv_hca=(B, T // 128, D), idx=(B, T, K),
              sinks=(H,), q_i=(B, T, 64, 128), k_i=(B, T // 4, 128), w_i=(B, T, 64))


def _spec(name):
    dtype = {"idx": jnp.int32, "sinks": jnp.float32, "w_i": jnp.float32}.get(name, jnp.bfloat16)
    return jax.ShapeDtypeStruct(SHAPES[name], dtype)


def _csa(impl):
    def f(q, kv, kv_comp, idx, sinks):
        loss = lambda *a: csa_attention(*a[:3], idx, a[3], window=W, impl=impl, interpret=False).sum(dtype=jnp.float32)
        return jax.grad(loss, argnums=(0, 1, 2, 3))(q, kv, kv_comp, sinks)
    return f, ("q", "kv", "kv_csa", "idx", "sinks")


def _hca(impl):
    def f(q, kv, kv_comp, sinks):
        loss = lambda *a: hca_attention(*a, window=W, ratio=128, impl=impl, interpret=False).sum(dtype=jnp.float32)
        return jax.grad(loss, argnums=(0, 1, 2, 3))(q, kv, kv_comp, sinks)
    return f, ("q", "kv", "kv_hca", "sinks")


def _indexer(impl):
    def f(q, k, w):
        idx = indexer_topk(q, k, w, ratio=4, topk=32, impl=impl, interpret=False)
        scores = lambda *a: indexer_scores(*a, ratio=4, impl=impl, interpret=False)
        grads = jax.grad(lambda *a: jnp.sum(jnp.where(jnp.isfinite(s := scores(*a)), s, 0.0)), argnums=(0, 1, 2))
        return idx, grads(q, k, w)
    return f, ("q_i", "k_i", "w_i")


@pytest.mark.parametrize("kernel", [_csa, _hca, _indexer], ids=["csa", "hca", "indexer"])
@pytest.mark.parametrize("impl,platform", [("pallas_gpu", "cuda"), ("pallas_tpu", "tpu")], ids=["triton", "mosaic"])
def test_lowers_for_the_real_platform(kernel, impl, platform):
    """Forward and backward go through the Triton / Mosaic lowering (not the interpreter). The final
    compilation (Triton -> PTX, Mosaic -> TPU) needs the device and is exercised there."""
    f, names = kernel(impl)
    exported = jax.export.export(
        jax.jit(f), platforms=[platform],
        disabled_checks=[jax.export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")],
    )(*map(_spec, names))
    text = exported.mlir_module()
    assert ("__gpu$xla.gpu.triton" if platform == "cuda" else "tpu_custom_call") in text
