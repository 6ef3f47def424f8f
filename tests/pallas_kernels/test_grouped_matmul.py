"""The Triton grouped matmul (interpret mode on CPU, compiled on a GPU) against jax.lax.ragged_dot: output
and the x and w gradients, with empty groups, groups smaller than a row tile, groups spanning tile
boundaries, rows past sum(group_sizes) and widths that are no multiple of the tiles; the layer's
impl="pallas" through an expert MLP; input checks; and that forward and backward lower to Triton for a real
GPU, even on CPU."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from layers.moe import grouped_matmul as layer_grouped_matmul
from pallas_kernels import GroupedMatmulBlockSizes, grouped_matmul, grouped_matmul_reference

SMALL = GroupedMatmulBlockSizes(block_m=16, block_n=16, block_k=16)


def _inputs(P, D, F, sizes, dtype=jnp.float32):
    kx, kw, kc = jax.random.split(jax.random.key(P * 7 + D), 3)
    x = jax.random.normal(kx, (P, D), jnp.float32).astype(dtype)
    w = jax.random.normal(kw, (len(sizes), D, F), jnp.float32).astype(dtype)
    dy = jax.random.normal(kc, (P, F), jnp.float32).astype(dtype)
    return x, w, dy, jnp.asarray(sizes, jnp.int32)


@pytest.mark.parametrize("P, D, F, sizes", [
    # 16-row tiles: empty groups (first, middle, last), groups of 5 and 3 rows inside one tile, a group of 30
    # spanning three tiles, rows 58..69 past sum(group_sizes); 3 F tiles, 2 D steps
    (70, 32, 48, [0, 5, 30, 0, 20, 3, 0]),
    # edge tiles masked: D 20 and F 24 (no multiple of 16), P 37; every row in a group
    (37, 20, 24, [9, 0, 28]),
])
def test_matches_ragged_dot(P, D, F, sizes, assert_close):
    x, w, dy, gs = _inputs(P, D, F, sizes)

    @jax.jit
    def run(x, w, dy):
        kernel = lambda x, w: grouped_matmul(x, w, gs, impl="pallas_gpu", block_sizes=SMALL)
        reference = lambda x, w: grouped_matmul_reference(x, w, gs)
        (y, vjp), (y_ref, vjp_ref) = jax.vjp(kernel, x, w), jax.vjp(reference, x, w)
        return (y, *vjp(dy)), (y_ref, *vjp_ref(dy))

    got, expected = run(x, w, dy)
    for name, a, b in zip(("y", "dx", "dw"), got, expected):
        assert a.shape == b.shape and a.dtype == b.dtype, name
        assert_close(a, b, 1e-5, name)
    assert not np.asarray(got[0][sum(sizes):]).any(), "rows past sum(group_sizes) must be zero"
    assert not np.asarray(got[2][np.asarray(sizes) == 0]).any(), "an empty group's dw must be zero"


def test_bfloat16_default_tiles(assert_close):
    x, w, _, gs = _inputs(200, 64, 96, [70, 0, 1, 129], jnp.bfloat16)
    y = jax.jit(lambda x, w: grouped_matmul(x, w, gs, impl="pallas_gpu"))(x, w)
    assert y.dtype == jnp.bfloat16
    assert_close(y, grouped_matmul_reference(x, w, gs), 2e-2, "y bf16")


def test_no_rows():
    y = grouped_matmul(jnp.ones((0, 16)), jnp.ones((2, 16, 8)), jnp.zeros((2,), jnp.int32), impl="pallas_gpu")
    assert y.shape == (0, 8)


def test_layer_pallas_impl_through_an_expert_mlp(assert_close):
    """x and the gate, up and down gradients of silu(x w_g) * (x w_u) w_d against impl="ragged"."""
    P, D, F, sizes = 40, 16, 32, [11, 0, 17, 8]
    x, gate, _, gs = _inputs(P, D, F, sizes)
    up = jnp.flip(gate, 2) * 0.5
    down = jnp.swapaxes(gate, 1, 2) * 0.25

    def loss(impl):
        def f(x, gate, up, down):
            h = jax.nn.silu(layer_grouped_matmul(x, gate, gs, impl=impl)) * layer_grouped_matmul(x, up, gs, impl=impl)
            return jnp.sum(jnp.sin(layer_grouped_matmul(h, down, gs, impl=impl)))
        return jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2, 3)))

    with jax.default_matmul_precision("highest"):    # float32 ragged_dot on a GPU would otherwise use TF32
        (v, grads), (v_ref, grads_ref) = (loss(impl)(x, gate, up, down) for impl in ("pallas", "ragged"))
    assert_close(v, v_ref, 1e-5, "loss")
    for name, g, r in zip(("dx", "dgate", "dup", "ddown"), grads, grads_ref):
        assert_close(g, r, 1e-5, name)


def test_rejects_bad_arguments():
    x, w, gs = jnp.ones((8, 4)), jnp.ones((3, 4, 5)), jnp.array([2, 2, 2])
    cases = [((x, w, gs[:2]), {}, "group_sizes has shape .2,.: axis 0 .experts E of w. must be 3"),
             ((x, jnp.ones((3, 6, 5)), gs), {}, "axis 1 .input width D of x. must be 4"),
             ((x, w.astype(jnp.bfloat16), gs), {}, "w must have dtype"),
             ((x, w, gs.astype(jnp.float32)), {}, "group_sizes must have dtype"),
             ((x[None], w, gs), {}, "x must be 2-d"),
             ((x, w, gs), {"impl": "pallas_tpu"}, "unknown impl 'pallas_tpu'")]
    for args, kwargs, message in cases:
        with pytest.raises(ValueError, match=message):
            grouped_matmul(*args, **kwargs)
    with pytest.raises(ValueError, match="block_m=24 must be a power of two"):
        GroupedMatmulBlockSizes(block_m=24)


def test_lowers_to_triton_for_the_gpu(monkeypatch):
    """Forward, dx and dw go through the Triton lowering (not the interpreter) at Laguna-small expert shapes
    and each Triton module passes MLIR verification (which the export alone does not run; it caught a loop
    bound lowered as i1). Compiling to PTX needs the GPU (`python benchmarks/moe_experts.py` checks and
    times the kernels there)."""
    from jax._src.pallas.triton import pallas_call_registration as registration
    lower, verified = registration.lowering.lower_jaxpr_to_triton_module, []

    def lower_and_verify(*args, **kwargs):
        result = lower(*args, **kwargs)
        verified.append(result.module.operation.verify())   # raises MLIRError naming the op on failure
        return result

    monkeypatch.setattr(registration.lowering, "lower_jaxpr_to_triton_module", lower_and_verify)

    def f(x, w, gs, dy):
        y, vjp = jax.vjp(lambda x, w: grouped_matmul(x, w, gs, impl="pallas_gpu", interpret=False), x, w)
        return y, vjp(dy)

    shapes = [((4096, 512), jnp.bfloat16), ((32, 512, 160), jnp.bfloat16), ((32,), jnp.int32),
              ((4096, 160), jnp.bfloat16)]
    exported = jax.export.export(
        jax.jit(f), platforms=["cuda"],
        disabled_checks=[jax.export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")],
    )(*(jax.ShapeDtypeStruct(s, d) for s, d in shapes))
    assert exported.mlir_module().count("__gpu$xla.gpu.triton") == 3
    assert verified == [True] * 3
