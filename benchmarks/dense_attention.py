"""Times dense causal attention at the real shapes of the zoo's families: our Pallas flash kernel
(pallas_kernels.flash_attention), cuDNN (jax.nn.dot_product_attention, where it takes the shape) and the
pure-JAX XLA reference.

    python benchmarks/dense_attention.py                   # GPU (H100): 4K, 16K, 64K tokens, bf16
    python benchmarks/dense_attention.py --seq 16384       # one length
    python benchmarks/dense_attention.py --smoke           # tiny shapes, any platform (checks it runs)
    python benchmarks/dense_attention.py --sweep --seq 16384 --only laguna   # block sizes of our kernel

Shapes (batch 1, one layer): Gemma 4 E2B sliding (8 q / 1 kv heads, d 256, window 512) and global
(8 / 1, d 512); the sliding layers of the `1b` Gemma-4 preset (8 / 2, d 256, window 1024); Laguna sliding
and global layers (64 and 48 q heads / 8 kv, d 128, window 512 on the sliding ones); ZAYA1 CCA (8 q / 2 kv,
d 128, full causal). Variants: ours (on a Hopper GPU its forward, and at d 64-256 its backward, run on
Mosaic GPU where they fit; "ours, triton fwd" passes the default Triton tiles, which keeps both directions
on Triton), cuDNN, `auto` (what the layers run:
`layers.attention.dot_product_attention`) and the XLA reference. Per variant: median wall time of fwd and
of fwd+bwd (grad w.r.t. q, k, v), and TFLOP/s on the FLOPs actually needed (each token's visible keys;
fwd+bwd counted as 3.5x fwd). cuDNN takes head_dim <= 256 from Hopper on, <= 128 before ("n/a"
otherwise); the XLA reference materializes [heads, T, T] float32 logits and is skipped ("mem") where that
would not fit.

--sweep times only our kernel, fwd and fwd+bwd (the backward uses the same sizes unless a candidate names
its own), for each candidate FlashBlockSizes of the shape's head dim (SWEEP, plus the default; default
16384 tokens), one row each; a candidate that does not compile or run prints "fails: <reason>"; "*" marks
the best per shape and direction.
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
from layers.attention import (attention_mask, cudnn_max_head_dim, dot_product_attention,  # noqa: E402
                              reference_attention)
from pallas_kernels import FlashBlockSizes, flash_attention, flash_hopper_forward  # noqa: E402
from pallas_kernels.flash_attention import default_block_sizes  # noqa: E402


@dataclasses.dataclass(frozen=True)
class Shape:
    name: str
    heads: int
    kv_heads: int
    head_dim: int
    window: int = 0


SHAPES = [Shape("gemma4-e2b sliding", 8, 1, 256, 512), Shape("gemma4-e2b global", 8, 1, 512),
          Shape("gemma4-1b sliding", 8, 2, 256, 1024),
          Shape("laguna sliding (64q)", 64, 8, 128, 512), Shape("laguna global (48q)", 48, 8, 128),
          Shape("zaya1 cca", 8, 2, 128)]
SMOKE_SHAPES = [Shape("smoke sliding", 4, 1, 32, 8), Shape("smoke global", 4, 2, 16)]
SMOKE_BLOCKS = FlashBlockSizes(block_q=16, block_kv=16)
XLA_LOGIT_BYTES_LIMIT = 24 << 30
# --sweep candidates per head dim, (block_q, block_kv, num_warps, num_stages). block_q counts (token, head)
# rows: with G query heads per kv head a tile holds block_q / G tokens. Larger heads, smaller tiles
# (registers: the float32 accumulator is block_q x head_dim; shared memory: K/V tiles x stages).
SWEEP = {
    128: [(32, 64, 4, 2), (64, 32, 4, 3), (64, 64, 4, 2), (64, 64, 4, 3), (64, 128, 4, 2), (64, 128, 8, 3),
          (128, 32, 4, 3), (128, 64, 4, 2), (128, 64, 8, 2), (128, 64, 8, 3), (128, 128, 8, 2), (128, 128, 8, 3)],
    256: [(32, 32, 4, 2), (32, 64, 4, 2), (64, 32, 4, 2), (64, 32, 8, 2), (64, 32, 8, 3), (64, 64, 4, 2),
          (64, 64, 8, 1), (64, 64, 8, 2), (128, 32, 8, 1), (128, 32, 8, 2), (128, 64, 8, 1), (128, 64, 8, 2)],
    512: [(32, 16, 4, 1), (32, 16, 4, 2), (32, 32, 4, 1), (32, 32, 8, 1), (32, 32, 8, 2), (32, 64, 8, 1),
          (64, 16, 8, 1), (64, 16, 8, 2), (64, 32, 8, 1), (64, 32, 8, 2), (64, 64, 8, 1), (128, 16, 8, 1)],
}
SMOKE_SWEEP = [FlashBlockSizes(16, 16), FlashBlockSizes(16, 8, num_warps=8, num_stages=1)]


def needed_flops(s: Shape, T: int) -> float:
    t = np.arange(T, dtype=np.float64)
    keys = np.minimum(t + 1, s.window) if s.window else t + 1
    return 4.0 * s.heads * s.head_dim * float(np.sum(keys))


def own_impl() -> str:
    return "pallas_tpu" if jax.default_backend() == "tpu" else "pallas_gpu"


def ours(s: Shape, blocks: FlashBlockSizes | None, interpret=None):
    return lambda q, k, v: flash_attention(q, k, v, window=s.window, scale=s.head_dim ** -0.5, impl=own_impl(),
                                           interpret=interpret, block_sizes=blocks)


def variants(s: Shape, T: int, *, smoke: bool, interpret, dtype):
    scale = s.head_dim ** -0.5
    out = {"ours": ours(s, SMOKE_BLOCKS if smoke else None, interpret)}
    if not smoke and own_impl() == "pallas_gpu" and flash_hopper_forward.runs_on_this_device():
        # explicit tiles keep both directions on Triton ("ours" runs the Mosaic GPU kernels where they fit)
        out["ours, triton fwd"] = ours(s, default_block_sizes(own_impl(), s.head_dim, dtype), interpret)
    if s.head_dim <= cudnn_max_head_dim():
        out["cudnn"] = lambda q, k, v: jax.nn.dot_product_attention(
            q, k, v, scale=scale, is_causal=True, implementation="cudnn",
            local_window_size=(s.window - 1, 0) if s.window else None)
    else:
        out["cudnn"] = None
    pos = jnp.arange(T)[None]
    out["auto"] = lambda q, k, v: dot_product_attention(
        q, k, v, q_positions_BT=pos, kv_positions_BS=pos, window=s.window, scale=scale, impl="auto",
        default_positions=True)
    if s.heads * T * T * 4 * 3 <= XLA_LOGIT_BYTES_LIMIT:
        def xla(q, k, v):
            return reference_attention(q, k, v, attention_mask(pos, pos, window=s.window), scale=scale)
        out["xla"] = xla
    else:
        out["xla"] = "mem"
    return out


def make_inputs(s: Shape, T: int, dtype):
    """q, k, v and the cotangent of the output (batch 1)."""
    ks = jax.random.split(jax.random.PRNGKey(0), 4)
    q = jax.random.normal(ks[0], (1, T, s.heads, s.head_dim), jnp.float32).astype(dtype)
    k = jax.random.normal(ks[1], (1, T, s.kv_heads, s.head_dim), jnp.float32).astype(dtype)
    v = jax.random.normal(ks[2], (1, T, s.kv_heads, s.head_dim), jnp.float32).astype(dtype)
    return q, k, v, jax.random.normal(ks[3], q.shape, jnp.float32).astype(dtype)


def jitted(fn):
    """fwd(q, k, v) and fwd_bwd(q, k, v, cotangent) -> (dq, dk, dv), both jitted."""
    # the cotangent is an argument, not a closed-over constant (XLA would constant-fold it)
    loss = lambda q, k, v, c: jnp.sum(fn(q, k, v).astype(jnp.float32) * c)
    return jax.jit(fn), jax.jit(jax.grad(loss, argnums=(0, 1, 2)))


def run(shapes, lengths, *, smoke: bool, iters: int, dtype, interpret):
    rows = []
    for s in shapes:
        for T in lengths:
            q, k, v, cot = make_inputs(s, T, dtype)
            flops = needed_flops(s, T)
            for name, fn in variants(s, T, smoke=smoke, interpret=interpret, dtype=dtype).items():
                if fn is None or isinstance(fn, str):
                    rows.append((s.name, T, name, fn or "n/a", "", "", ""))
                    continue
                fwd, fwd_bwd = jitted(fn)
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


def timed(fn, args, iters: int):
    """Median seconds, or the short reason it failed to compile or run (as a string)."""
    try:
        return median_seconds(fn, args, iters)
    except Exception as e:  # noqa: BLE001 - a candidate that does not fit (shared memory, registers)
        first_line = (str(e).strip().splitlines() or [""])[0]
        return f"fails: {type(e).__name__}: {first_line[:80]}"


def label(b: FlashBlockSizes) -> str:
    text = f"q {b.block_q} kv {b.block_kv} warps {b.num_warps} stages {b.num_stages}"
    return text + (f"; backward {label(b.backward)}" if b.backward else "")


def sweep(shapes, lengths, candidates, *, iters: int, dtype):
    """One row per (shape, length, candidate block sizes) with fwd and fwd+bwd times of our kernel."""
    rows = []
    for s in shapes:
        for T in lengths:
            q, k, v, cot = make_inputs(s, T, dtype)
            flops = needed_flops(s, T)
            default = default_block_sizes(own_impl(), s.head_dim, dtype)
            times = []
            for i, b in enumerate(candidates(s)):
                print(f"sweep: {s.name}, {T} tokens, {i + 1}: {label(b)}", file=sys.stderr, flush=True)
                fwd, fwd_bwd = jitted(ours(s, b))
                times.append((b, timed(fwd, (q, k, v), iters), timed(fwd_bwd, (q, k, v, cot), iters)))
            best = [min((t[d] for t in times if isinstance(t[d], float)), default=None) for d in (1, 2)]
            for b, *ts in times:
                cells = []
                for t, work, t_best in zip(ts, (flops, 3.5 * flops), best):
                    ok = isinstance(t, float)
                    cells += [f"{t * 1e3:.3f}{' *' if t == t_best else ''}" if ok else t,
                              f"{work / t / 1e12:.1f}" if ok else ""]
                rows.append((s.name, T, label(b) + (" (default)" if b == default else ""), *cells))
    return rows


def print_table(rows, first=("impl",)):
    header = ("shape", "tokens", *first, "fwd ms", "fwd TFLOP/s", "fwd+bwd ms", "fwd+bwd TFLOP/s")
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    line = lambda r: "  ".join(str(c).ljust(w) for c, w in zip(r, widths))
    print(line(header))
    print(line(["-" * w for w in widths]))
    for r in rows:
        print(line(r))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on any platform (interpret mode)")
    parser.add_argument("--seq", type=int, action="append",
                        help="token counts (default 4096 16384 65536; with --sweep 16384)")
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--sweep", action="store_true", help="time our kernel over candidate block sizes")
    parser.add_argument("--only", default="", help="only the shapes whose name contains this")
    args = parser.parse_args(argv)
    shapes = [s for s in (SMOKE_SHAPES if args.smoke else SHAPES) if args.only in s.name]
    if args.sweep:
        if args.smoke:
            rows = sweep(shapes, args.seq or [40], lambda s: SMOKE_SWEEP, iters=1, dtype=jnp.float32)
        else:
            candidates = lambda s: list(dict.fromkeys(
                [default_block_sizes(own_impl(), s.head_dim), *(FlashBlockSizes(*c) for c in SWEEP[s.head_dim])]))
            rows = sweep(shapes, args.seq or [16384], candidates, iters=args.iters, dtype=jnp.bfloat16)
        print(f"device: {jax.devices()[0].device_kind}")
        print_table(rows, first=("block sizes",))
        return rows
    if args.smoke:
        rows = run(shapes, args.seq or [40], smoke=True, iters=1, dtype=jnp.float32, interpret=None)
    else:
        rows = run(shapes, args.seq or [4096, 16384, 65536], smoke=False, iters=args.iters,
                   dtype=jnp.bfloat16, interpret=None)
    print(f"device: {jax.devices()[0].device_kind}")
    print_table(rows)
    return rows


if __name__ == "__main__":
    main()
