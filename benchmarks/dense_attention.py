"""Times dense causal attention at the real shapes of the zoo's families: our Pallas flash kernel
(pallas_kernels.flash_attention), cuDNN (jax.nn.dot_product_attention, where it takes the shape) and the
pure-JAX XLA reference.

    python benchmarks/dense_attention.py                   # GPU (H100): 4K, 16K, 64K tokens, bf16
    python benchmarks/dense_attention.py --seq 16384       # one length
    python benchmarks/dense_attention.py --smoke           # tiny shapes, any platform (checks it runs)

Shapes (batch 1, one layer): Gemma 4 E2B sliding (8 q / 1 kv heads, d 256, window 512) and global
(8 / 1, d 512); Laguna sliding and global layers (64 and 48 q heads / 8 kv, d 128, window 512 on the
sliding ones); ZAYA1 CCA (8 q / 2 kv, d 128, full causal). Per variant: median wall time of fwd and of
fwd+bwd (grad w.r.t. q, k, v), and TFLOP/s on the FLOPs actually needed (each token's visible keys;
fwd+bwd counted as 3.5x fwd). cuDNN takes head_dim <= 128 only ("n/a" otherwise); the XLA reference
materializes [heads, T, T] float32 logits and is skipped ("mem") where that would not fit.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks._timing import median_seconds  # noqa: E402
from layers.attention import attention_mask, reference_attention  # noqa: E402
from pallas_kernels import FlashBlockSizes, flash_attention  # noqa: E402


@dataclasses.dataclass(frozen=True)
class Shape:
    name: str
    heads: int
    kv_heads: int
    head_dim: int
    window: int = 0


SHAPES = [Shape("gemma4-e2b sliding", 8, 1, 256, 512), Shape("gemma4-e2b global", 8, 1, 512),
          Shape("laguna sliding (64q)", 64, 8, 128, 512), Shape("laguna global (48q)", 48, 8, 128),
          Shape("zaya1 cca", 8, 2, 128)]
SMOKE_SHAPES = [Shape("smoke sliding", 4, 1, 32, 8), Shape("smoke global", 4, 2, 16)]
SMOKE_BLOCKS = FlashBlockSizes(block_q=16, block_kv=16)
XLA_LOGIT_BYTES_LIMIT = 24 << 30


def needed_flops(s: Shape, T: int) -> float:
    t = np.arange(T, dtype=np.float64)
    keys = np.minimum(t + 1, s.window) if s.window else t + 1
    return 4.0 * s.heads * s.head_dim * float(np.sum(keys))


def variants(s: Shape, T: int, *, smoke: bool, interpret):
    scale = s.head_dim ** -0.5
    impl = "pallas_tpu" if jax.default_backend() == "tpu" else "pallas_gpu"
    out = {"ours": lambda q, k, v: flash_attention(q, k, v, window=s.window, scale=scale, impl=impl,
                                                   interpret=interpret,
                                                   block_sizes=SMOKE_BLOCKS if smoke else None)}
    if jax.default_backend() == "gpu" and s.head_dim <= 128:
        out["cudnn"] = lambda q, k, v: jax.nn.dot_product_attention(
            q, k, v, scale=scale, is_causal=True, implementation="cudnn",
            local_window_size=(s.window - 1, 0) if s.window else None)
    else:
        out["cudnn"] = None
    if s.heads * T * T * 4 * 3 <= XLA_LOGIT_BYTES_LIMIT:
        def xla(q, k, v):
            pos = jnp.arange(T)[None]
            return reference_attention(q, k, v, attention_mask(pos, pos, window=s.window), scale=scale)
        out["xla"] = xla
    else:
        out["xla"] = "mem"
    return out


def run(shapes, lengths, *, smoke: bool, iters: int, dtype, interpret):
    rows = []
    for s in shapes:
        for T in lengths:
            ks = jax.random.split(jax.random.PRNGKey(0), 4)
            q = jax.random.normal(ks[0], (1, T, s.heads, s.head_dim), jnp.float32).astype(dtype)
            k = jax.random.normal(ks[1], (1, T, s.kv_heads, s.head_dim), jnp.float32).astype(dtype)
            v = jax.random.normal(ks[2], (1, T, s.kv_heads, s.head_dim), jnp.float32).astype(dtype)
            cot = jax.random.normal(ks[3], q.shape, jnp.float32).astype(dtype)
            flops = needed_flops(s, T)
            for name, fn in variants(s, T, smoke=smoke, interpret=interpret).items():
                if fn is None or isinstance(fn, str):
                    rows.append((s.name, T, name, fn or "n/a", "", "", ""))
                    continue
                fwd = jax.jit(fn)
                # the cotangent is an argument, not a closed-over constant (XLA would constant-fold it)
                fwd_bwd = jax.jit(jax.grad(lambda q, k, v, c, f=fn: jnp.sum(f(q, k, v).astype(jnp.float32)
                                                                                * c), argnums=(0, 1, 2)))
                try:
                    t_f = median_seconds(fwd, (q, k, v), iters)
                    t_fb = median_seconds(fwd_bwd, (q, k, v, cot), iters)
                except Exception as e:  # noqa: BLE001 - report and go on (OOM, unsupported shape)
                    rows.append((s.name, T, name, f"error: {type(e).__name__}: {str(e).splitlines()[0][:60]}",
                                 "", "", ""))
                    continue
                rows.append((s.name, T, name, f"{t_f * 1e3:.3f}", f"{flops / t_f / 1e12:.1f}",
                             f"{t_fb * 1e3:.3f}", f"{3.5 * flops / t_fb / 1e12:.1f}"))
    return rows


def print_table(rows):
    header = ("shape", "tokens", "impl", "fwd ms", "fwd TFLOP/s", "fwd+bwd ms", "fwd+bwd TFLOP/s")
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    line = lambda r: "  ".join(str(c).ljust(w) for c, w in zip(r, widths))
    print(line(header))
    print(line(["-" * w for w in widths]))
    for r in rows:
        print(line(r))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on any platform (interpret mode)")
    parser.add_argument("--seq", type=int, action="append", help="token counts (default 4096 16384 65536)")
    parser.add_argument("--iters", type=int, default=10)
    args = parser.parse_args(argv)
    if args.smoke:
        rows = run(SMOKE_SHAPES, args.seq or [40], smoke=True, iters=1, dtype=jnp.float32, interpret=None)
    else:
        rows = run(SHAPES, args.seq or [4096, 16384, 65536], smoke=False, iters=args.iters,
                   dtype=jnp.bfloat16, interpret=None)
    print(f"device: {jax.devices()[0].device_kind}")
    print_table(rows)
    return rows


if __name__ == "__main__":
    main()
