"""Shared pieces of the kernel tests: closeness to the reference with every element written, and the
jitted output-and-gradient program the CSA and HCA tests run for kernel and reference alike."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import BlockSizes

TOL = {jnp.float32: 1e-5, jnp.bfloat16: 1e-2}
# CSA/HCA blocks small enough that the tests' short sequences span several of them
SMALL_BLOCKS = {"pallas_gpu": BlockSizes(block_h=16, block_k=16, block_kv_bwd=16, block_rows_bwd=16),
                "pallas_tpu": BlockSizes(block_k=8, block_kv_bwd=8, block_rows_bwd=16)}


def output_and_grads(attend):
    """One jitted program `(q, kv, kv_comp, sinks, probe) -> (out, grads)`: `attend(q, kv, kv_comp, sinks)`
    and the VJP of a random probe w.r.t. those four."""
    @jax.jit
    def run(q, kv, kv_comp, sinks, probe):
        out, vjp = jax.vjp(attend, q, kv, kv_comp, sinks)
        return out, vjp(probe.astype(out.dtype))
    return run


def _assert_close(actual, expected, tol: float, name: str) -> None:
    """Elementwise |actual - expected| <= tol * max(1, max|expected|) (+ tol relative), after checking that
    every element is finite: the interpreters fill outputs with NaN before a kernel runs, so an element a
    kernel never wrote shows up here."""
    actual, expected = np.asarray(actual, np.float32), np.asarray(expected, np.float32)
    assert actual.shape == expected.shape, f"{name}: shape {actual.shape} != {expected.shape}"
    finite = np.isfinite(expected)
    assert np.array_equal(np.isfinite(actual), finite), f"{name}: non-finite values where the reference has none"
    assert np.array_equal(actual[~finite], expected[~finite]), f"{name}: different infinities"
    scale = max(1.0, float(np.abs(expected[finite]).max(initial=0.0)))
    np.testing.assert_allclose(actual[finite], expected[finite], rtol=tol, atol=tol * scale, err_msg=name)


@pytest.fixture
def assert_close():
    return _assert_close
