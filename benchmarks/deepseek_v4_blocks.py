"""Times single DeepSeek-V4 blocks (sliding, CSA, HCA) alone, forward and forward+backward, per
attention_impl and batch size: where a training step's time goes, without compiling the whole model.

    python benchmarks/deepseek_v4_blocks.py                       # GPU: `small` preset, T 4096, B 1 and 8
    python benchmarks/deepseek_v4_blocks.py --smoke               # `tiny` preset, T 64, float32, any platform
"""
from __future__ import annotations

import argparse
import os
import sys

import jax
import jax.numpy as jnp
from flax import nnx

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import zoo  # noqa: E402
from benchmarks._timing import median_seconds  # noqa: E402
from configs.deepseek_v4 import get_config  # noqa: E402
from layers.context import LayerContext  # noqa: E402


def first_of_each_kind(cfg) -> list[int]:
    """One block per (attention type, hash-routed) pair, in layer order."""
    seen, picked = set(), []
    for i, kind in enumerate(cfg.attention_types):
        key = (kind, i < cfg.num_hash_layers)
        if key not in seen:
            seen.add(key)
            picked.append(i)
    return picked


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="small")
    parser.add_argument("--seq_len", type=int, default=4096)
    parser.add_argument("--batch_sizes", default="1,8")
    parser.add_argument("--impls", default="auto,xla")
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--smoke", action="store_true")
    args = parser.parse_args(argv)
    if args.smoke:
        args.preset, args.seq_len, args.batch_sizes, args.iters = "tiny", 64, "1", 1
    dtype = "float32" if args.smoke else "bfloat16"
    T = args.seq_len
    print(f"device: {jax.devices()[0].device_kind}; preset {args.preset}, T {T}, {dtype}")
    for impl in args.impls.split(","):
        cfg = get_config(args.preset).model
        cfg.attention_impl = impl
        model = zoo.models.cast(zoo.build(cfg), dtype)
        for B in (int(b) for b in args.batch_sizes.split(",")):
            tokens_BT = jax.random.randint(jax.random.key(0), (B, T), 3, cfg.vocab_size)
            positions_BT = jnp.broadcast_to(jnp.arange(T), (B, T))
            streams = (cfg.hc_streams,) if cfg.get("hc_streams", 0) else ()
            x = jax.random.normal(jax.random.key(1), (B, T, *streams, cfg.d_model), jnp.float32).astype(dtype)
            for i in first_of_each_kind(cfg):
                graphdef, state = nnx.split(model.blocks[i])

                def run(state, x, graphdef=graphdef):
                    ctx = LayerContext(positions_BT, None, True, tokens_BT=tokens_BT)
                    return nnx.merge(graphdef, state)(x, ctx).astype(jnp.float32).sum()

                t_f = median_seconds(jax.jit(run), (state, x), args.iters) * 1e3
                t_fb = median_seconds(jax.jit(jax.grad(run, argnums=(0, 1))), (state, x), args.iters) * 1e3
                print(f"{impl:<5} B={B:<3} block {i:<3} {cfg.attention_types[i]:<4} "
                      f"hash={str(i < cfg.num_hash_layers):<5} fwd {t_f:8.2f} ms  fwd+bwd {t_fb:8.2f} ms",
                      flush=True)


if __name__ == "__main__":
    main()
