"""Times the routed-expert MLP alone (gate, up, down as grouped matmuls) for each `grouped_matmul` impl.

    python benchmarks/moe_experts.py            # GPU: Laguna-small and DeepSeek-V4-small expert shapes
    python benchmarks/moe_experts.py --smoke    # 64 tokens, any platform (checks it runs)
    python benchmarks/moe_experts.py --tune     # also the Pallas kernel's block sizes, one row each

Per impl: median forward and forward+backward (grads w.r.t. tokens and the three weights) in ms,
TFLOP/s on the routed FLOPs (2 x tokens x top_k x D x F x 3 forward, 3x that for forward+backward), and
the largest error of the output and the four gradients against impl "ragged" (jax.lax.ragged_dot), relative
to the largest reference value. "pallas" is the Triton grouped matmul (pallas_kernels.grouped_matmul;
interpret mode off GPU). Rows "impl" run the tokens into and out of the expert order by the earlier
dispatch (a gather whose gradient, and an output that, scatter-add into token rows); rows
"routed/impl" run `layers.moe.routed_experts` itself (permutation gathers, a sum over each token's K
copies), so the difference between the two is the dispatch's.
"""
from __future__ import annotations

import argparse
import os
import sys

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks._timing import median_seconds  # noqa: E402
from layers.moe import grouped_matmul, routed_experts  # noqa: E402
from pallas_kernels import GroupedMatmulBlockSizes  # noqa: E402
from pallas_kernels import grouped_matmul as pallas_grouped_matmul  # noqa: E402

# name, tokens M, d_model D, expert width F, experts E, top-k K
SHAPES = [("laguna small", 32768, 512, 160, 32, 4), ("deepseek_v4 small", 32768, 512, 448, 12, 2)]
# --tune: the Pallas kernel's tiles (block_m, block_n, block_k, num_warps, num_stages)
TUNE = [(128, 64, 64, 4, 3), (128, 128, 64, 8, 3), (128, 32, 64, 4, 3), (64, 64, 64, 4, 3), (64, 128, 64, 4, 3),
        (128, 64, 32, 4, 4), (128, 128, 32, 4, 4), (128, 64, 128, 8, 2), (128, 128, 128, 8, 3), (256, 64, 64, 8, 3),
        (128, 256, 64, 8, 3)]


def experts(x_MD, gate_EDF, up_EDF, down_EFD, experts_MK, impl):
    """The expert MLP of layers.moe.Experts (unit routing weights), with the grouped matmul impl chosen
    (a GroupedMatmulBlockSizes: the Pallas kernel with those tiles; "routed/IMPL": routed_experts itself)."""
    M, K = experts_MK.shape
    if isinstance(impl, str) and impl.startswith("routed/"):
        return routed_experts(x_MD, experts_MK, jnp.ones((M, K), x_MD.dtype), gate_EDF, up_EDF, down_EFD,
                              act=jax.nn.silu, impl=impl.split("/")[1])
    if isinstance(impl, GroupedMatmulBlockSizes):
        gmm = lambda x, w, sizes: pallas_grouped_matmul(x, w, sizes, impl="pallas_gpu", block_sizes=impl)
    else:
        gmm = lambda x, w, sizes: grouped_matmul(x, w, sizes, impl=impl)
    order_P = jnp.argsort(experts_MK.reshape(-1), stable=True)
    sizes_E = jnp.bincount(experts_MK.reshape(-1), length=gate_EDF.shape[0]).astype(jnp.int32)
    x_PD = jnp.take(x_MD, order_P // K, axis=0)
    h_PF = jax.nn.silu(gmm(x_PD, gate_EDF, sizes_E)) * gmm(x_PD, up_EDF, sizes_E)
    y_PD = gmm(h_PF, down_EFD, sizes_E)
    return jnp.zeros_like(x_MD).at[order_P // K].add(y_PD)


def max_error(got, expected) -> float:
    """max |got - expected| / max(1, max |expected|) over the leaves (float32)."""
    errors = [jnp.max(jnp.abs(g.astype(jnp.float32) - e.astype(jnp.float32)))
              / jnp.maximum(1.0, jnp.max(jnp.abs(e.astype(jnp.float32))))
              for g, e in zip(jax.tree.leaves(got), jax.tree.leaves(expected))]
    return float(max(errors))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="64 tokens, float32")
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--tune", action="store_true", help="also time the Pallas kernel with the TUNE tiles")
    args = parser.parse_args(argv)
    dtype = jnp.float32 if args.smoke else jnp.bfloat16
    impls = (["ragged", "blocked", "pallas", "routed/blocked", "routed/pallas"]
             + ([GroupedMatmulBlockSizes(*t) for t in TUNE] if args.tune else []))
    label = lambda impl: (impl if isinstance(impl, str) else
                          "pallas m{}n{}k{}w{}s{}".format(impl.block_m, impl.block_n, impl.block_k, impl.num_warps,
                                                          impl.num_stages))
    print(f"device: {jax.devices()[0].device_kind}")
    print(f"{'shape':<20} {'impl':<22} {'fwd ms':>8} {'TFLOP/s':>8} {'fwd+bwd ms':>11} {'TFLOP/s':>8} "
          f"{'max err':>8}")
    for name, M, D, F, E, K in SHAPES:
        M = 64 if args.smoke else M
        ks = jax.random.split(jax.random.key(0), 5)
        x = jax.random.normal(ks[0], (M, D), jnp.float32).astype(dtype)
        gate, up = ((jax.random.normal(k, (E, D, F), jnp.float32) * D ** -0.5).astype(dtype) for k in ks[1:3])
        down = (jax.random.normal(ks[3], (E, F, D), jnp.float32) * F ** -0.5).astype(dtype)
        chosen = jax.random.randint(ks[4], (M, K), 0, E)
        flops = 2 * M * K * D * F * 3
        # the loss weighs every output element differently, so the gradients check the backward's indexing
        probe = jax.random.normal(ks[4], (M, D), jnp.float32)
        reference = None
        for impl in impls:
            fwd = jax.jit(lambda *a, impl=impl: experts(*a, impl=impl))
            loss = lambda x, g, u, d, c, impl=impl: (experts(x, g, u, d, c, impl).astype(jnp.float32) * probe).sum()
            fwd_bwd = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3)))
            inputs = (x, gate, up, down, chosen)
            outputs = (fwd(*inputs), fwd_bwd(*inputs))
            reference = outputs if reference is None else reference
            t_f = median_seconds(fwd, inputs, 1 if args.smoke else args.iters) * 1e3
            t_fb = median_seconds(fwd_bwd, inputs, 1 if args.smoke else args.iters) * 1e3
            print(f"{name:<20} {label(impl):<22} {t_f:>8.2f} {flops / t_f / 1e9:>8.1f} {t_fb:>11.2f} "
                  f"{3 * flops / t_fb / 1e9:>8.1f} {max_error(outputs, reference):>8.1e}", flush=True)


if __name__ == "__main__":
    main()
