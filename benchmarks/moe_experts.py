"""Times the routed-expert MLP alone (gate, up, down as grouped matmuls) for each `grouped_matmul` impl.

    python benchmarks/moe_experts.py            # GPU: Laguna-small and DeepSeek-V4-small expert shapes
    python benchmarks/moe_experts.py --smoke    # 64 tokens, any platform (checks it runs)

Per impl: median forward and forward+backward (grads w.r.t. tokens and the three weights) in ms, and
TFLOP/s on the routed FLOPs (2 x tokens x top_k x D x F x 3 forward, 3x that for forward+backward).
"""
from __future__ import annotations

import argparse
import os
import sys

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks._timing import median_seconds  # noqa: E402
from layers.moe import grouped_matmul  # noqa: E402

# name, tokens M, d_model D, expert width F, experts E, top-k K
SHAPES = [("laguna small", 32768, 512, 160, 32, 4), ("deepseek_v4 small", 32768, 512, 448, 12, 2)]


def experts(x_MD, gate_EDF, up_EDF, down_EFD, experts_MK, impl: str):
    """The expert MLP of layers.moe.Experts (unit routing weights), with the grouped matmul impl chosen."""
    M, K = experts_MK.shape
    order_P = jnp.argsort(experts_MK.reshape(-1), stable=True)
    sizes_E = jnp.bincount(experts_MK.reshape(-1), length=gate_EDF.shape[0]).astype(jnp.int32)
    x_PD = jnp.take(x_MD, order_P // K, axis=0)
    h_PF = (jax.nn.silu(grouped_matmul(x_PD, gate_EDF, sizes_E, impl=impl))
            * grouped_matmul(x_PD, up_EDF, sizes_E, impl=impl))
    y_PD = grouped_matmul(h_PF, down_EFD, sizes_E, impl=impl)
    return jnp.zeros_like(x_MD).at[order_P // K].add(y_PD)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="64 tokens, float32")
    parser.add_argument("--iters", type=int, default=10)
    args = parser.parse_args(argv)
    dtype = jnp.float32 if args.smoke else jnp.bfloat16
    print(f"device: {jax.devices()[0].device_kind}")
    print(f"{'shape':<20} {'impl':<8} {'fwd ms':>8} {'TFLOP/s':>8} {'fwd+bwd ms':>11} {'TFLOP/s':>8}")
    for name, M, D, F, E, K in SHAPES:
        M = 64 if args.smoke else M
        ks = jax.random.split(jax.random.key(0), 5)
        x = jax.random.normal(ks[0], (M, D), jnp.float32).astype(dtype)
        gate, up = ((jax.random.normal(k, (E, D, F), jnp.float32) * D ** -0.5).astype(dtype) for k in ks[1:3])
        down = (jax.random.normal(ks[3], (E, F, D), jnp.float32) * F ** -0.5).astype(dtype)
        chosen = jax.random.randint(ks[4], (M, K), 0, E)
        flops = 2 * M * K * D * F * 3
        for impl in ("ragged", "blocked"):
            fwd = jax.jit(lambda *a, impl=impl: experts(*a, impl=impl))
            loss = lambda x, g, u, d, c, impl=impl: experts(x, g, u, d, c, impl).astype(jnp.float32).sum()
            fwd_bwd = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3)))
            t_f = median_seconds(fwd, (x, gate, up, down, chosen), 1 if args.smoke else args.iters) * 1e3
            t_fb = median_seconds(fwd_bwd, (x, gate, up, down, chosen), 1 if args.smoke else args.iters) * 1e3
            print(f"{name:<20} {impl:<8} {t_f:>8.2f} {flops / t_f / 1e9:>8.1f} {t_fb:>11.2f} "
                  f"{3 * flops / t_fb / 1e9:>8.1f}", flush=True)


if __name__ == "__main__":
    main()
