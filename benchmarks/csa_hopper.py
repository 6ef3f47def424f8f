"""Checks the Mosaic GPU (Hopper) CSA forward (both variants: full scores per warpgroup, and split scores)
against the pure-JAX reference and the Triton forward, then times the forwards at V4-Flash shapes (64 heads
x 512, window 128, top-k 512, ratio 4) on an H100.

    python benchmarks/csa_hopper.py                          # check at 1K tokens, time at 8K, 32K, 128K
    python benchmarks/csa_hopper.py --seq 8192 --block-k 64 --stages 1

TFLOP/s counts the FLOPs each token actually needs (its visible window and selected entries), as
benchmarks/attention.py does. The check compares O with the reference (bf16 tolerance), O and the
log-sum-exp (which the backward consumes) with the Triton forward's, and the gradients of
`csa_attention_hopper` (this forward, Triton's backward) with `csa_attention`'s.
"""
from __future__ import annotations

import argparse
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks._timing import median_seconds  # noqa: E402
from benchmarks.attention import Shape, make_inputs, needed_flops  # noqa: E402
from pallas_kernels import compressed_gpu, compressed_hopper  # noqa: E402
from pallas_kernels.compressed import CSA_DEFAULT_BLOCKS, csa_attention, csa_attention_reference  # noqa: E402
from pallas_kernels.common import window_start  # noqa: E402


def _operands(s: Shape):
    x = make_inputs(s, jnp.bfloat16)
    B, T = x["q"].shape[:2]
    idx = x["indices"]
    slot_K = jnp.arange(1, idx.shape[2] + 1, dtype=jnp.int32)
    count = jnp.max(jnp.where(idx >= 0, slot_K, 0), axis=2, initial=0).astype(jnp.int32)
    return (x["q"], x["kv"], x["csa_comp"], idx, x["sinks"], window_start(None, B, T), count)


def _forwards(s: Shape, block_k, stages):
    scale = s.head_dim ** -0.5
    triton = jax.jit(lambda *a: compressed_gpu.forward(*a, window=s.window, ratio=None, scale=scale,
                                                       blocks=CSA_DEFAULT_BLOCKS["pallas_gpu"], interpret=False))
    hopper = lambda split: jax.jit(lambda *a: compressed_hopper.forward(
        *a, window=s.window, scale=scale, block_k=block_k, stages=stages, split_scores=split))
    return {"triton": triton, "hopper": hopper(False), "hopper_split": hopper(True)}


def check(tokens: int, block_k, stages) -> list[str]:
    """Asserts every Hopper variant that compiles against the reference and the Triton forward; returns the
    variants that failed to compile or run (reported, then left out of the timings)."""
    s = Shape(tokens)
    ops = _operands(s)
    fwd = _forwards(s, block_k, stages)
    o_t, lse_t = fwd.pop("triton")(*ops)
    ref = csa_attention_reference(*ops[:5], window=s.window)
    f32 = lambda x: np.asarray(x, np.float32)
    broken = []
    for variant, run in fwd.items():
        try:
            o_h, lse_h = jax.block_until_ready(run(*ops))
        except Exception as error:  # noqa: BLE001 - a lowering/compile error of one variant is reported
            print(f"check {variant}: FAILED to compile or run: {type(error).__name__}: {error}"[:2000])
            broken.append(variant)
            continue
        for name, got, want, tol in [("o vs reference", o_h, ref, 2e-2), ("o vs triton", o_h, o_t, 2e-2),
                                     ("lse vs triton", lse_h, lse_t, 1e-3)]:
            err = float(np.max(np.abs(f32(got) - f32(want))))
            scale = max(1.0, float(np.max(np.abs(f32(want)))))
            print(f"check {variant}, {tokens} tokens: {name}: max |diff| {err:.2e} (allowed {tol * scale:.1e})")
            assert np.all(np.isfinite(f32(got))), f"{variant} {name}: non-finite output"
            assert err <= tol * scale, f"{variant} {name}: max |diff| {err} over {tol * scale}"
    if "hopper" not in broken:   # csa_attention_hopper's gradients: this forward's O and lse, Triton's backward
        q, kv, comp, idx, sinks = ops[:5]
        probe = jax.random.normal(jax.random.key(7), q.shape, jnp.bfloat16)
        grads = lambda attend: jax.jit(lambda *a: jax.vjp(lambda q, kv, comp, sinks: attend(q, kv, comp, idx, sinks),
                                                          *a)[1](probe))(q, kv, comp, sinks)
        got = grads(lambda *a: compressed_hopper.csa_attention_hopper(*a, window=s.window))
        want = grads(lambda *a: csa_attention(*a, window=s.window, impl="pallas_gpu"))
        for name, g, w in zip(("dq", "dkv", "dkv_comp", "dsinks"), got, want):
            err = float(np.max(np.abs(f32(g) - f32(w))))
            allowed = 2e-2 * max(1.0, float(np.max(np.abs(f32(w)))))
            print(f"check hopper, {tokens} tokens: {name} vs triton: max |diff| {err:.2e} (allowed {allowed:.1e})")
            assert np.all(np.isfinite(f32(g))) and err <= allowed, f"hopper {name}: max |diff| {err}"
    return broken


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seq", type=int, nargs="*", default=[8192, 32768, 131072])
    parser.add_argument("--check-seq", type=int, default=1024)
    parser.add_argument("--block-k", type=int, default=None)
    parser.add_argument("--stages", type=int, default=None)
    parser.add_argument("--iters", type=int, default=10)
    args = parser.parse_args()
    if not compressed_hopper.runs_on_this_device():
        sys.exit("needs a Hopper GPU (compute capability 9.x)")
    broken = check(args.check_seq, args.block_k, args.stages)
    print(f"\n{'tokens':>8} {'forward':>13} {'ms':>9} {'TFLOP/s':>8}")
    for tokens in args.seq:
        s = Shape(tokens)
        ops = _operands(s)
        flops = needed_flops(s)["csa"]
        for name, fn in _forwards(s, args.block_k, args.stages).items():
            if name in broken:
                continue
            seconds = median_seconds(fn, ops, args.iters)
            print(f"{tokens:>8} {name:>13} {seconds * 1e3:>9.3f} {flops / seconds / 1e12:>8.1f}")


if __name__ == "__main__":
    main()
