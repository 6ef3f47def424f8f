"""Checks the Mosaic GPU (Hopper) CSA and HCA forwards (both variants: full scores per warpgroup, and split
scores) against the pure-JAX reference and the Triton forward, then times the forwards at V4-Flash shapes
(64 heads x 512, window 128, CSA top-k 512 at ratio 4, HCA ratio 128) on an H100.

    python benchmarks/compressed_hopper.py                  # check (CSA 1K tokens, HCA 16K), time at 8K-128K
    python benchmarks/compressed_hopper.py --kind hca --seq 32768 --block-k 64 --stages 2

TFLOP/s counts the FLOPs each token actually needs (its visible window and compressed entries), as
benchmarks/attention.py does. The check runs two segments (the second starts mid-sequence, so HCA's walk
starts past entry 0) and compares O with the reference (bf16 tolerance), O and the log-sum-exp (which the
backward consumes) with the Triton forward's, and the gradients of `csa_attention_hopper` /
`hca_attention_hopper` (this forward, Triton's backward) with `csa_attention` / `hca_attention`'s.
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
from pallas_kernels.compressed import (CSA_DEFAULT_BLOCKS, HCA_DEFAULT_BLOCKS, csa_attention,  # noqa: E402
                                       csa_attention_reference, csa_slot_counts, hca_attention,
                                       hca_attention_reference, hca_entry_counts)
from pallas_kernels.common import window_start  # noqa: E402

KINDS = ("csa", "hca")
CHECK_SEQ = {"csa": 1024, "hca": 16384}   # HCA: 128 entries at ratio 128, two key blocks


def _operands(s: Shape, kind: str, segment_ids=None):
    """The kernels' operands (q, kv, comp, indices or None, sinks, lo, count) and the public functions'
    keyword arguments."""
    x = make_inputs(s, jnp.bfloat16)
    B, T = x["q"].shape[:2]
    lo = window_start(segment_ids, B, T)
    if kind == "csa":
        idx = x["indices"]
        return (x["q"], x["kv"], x["csa_comp"], idx, x["sinks"], lo, csa_slot_counts(idx)), {}
    comp = x["hca_comp"]
    count = hca_entry_counts(B, T, comp.shape[1], s.hca_ratio)
    return (x["q"], x["kv"], comp, None, x["sinks"], lo, count), {"ratio": s.hca_ratio}


def _forwards(s: Shape, kind: str, block_k, stages):
    scale = s.head_dim ** -0.5
    ratio = s.hca_ratio if kind == "hca" else None
    blocks = (HCA_DEFAULT_BLOCKS if ratio else CSA_DEFAULT_BLOCKS)["pallas_gpu"]
    triton = jax.jit(lambda *a: compressed_gpu.forward(*a, window=s.window, ratio=ratio, scale=scale,
                                                       blocks=blocks, interpret=False))
    hopper = lambda split: jax.jit(lambda *a: compressed_hopper.forward(
        *a, window=s.window, scale=scale, ratio=ratio, block_k=block_k, stages=stages, split_scores=split))
    return {"triton": triton, "hopper": hopper(False), "hopper_split": hopper(True)}


def check(kind: str, tokens: int, block_k, stages) -> list[str]:
    """Asserts every Hopper variant that compiles against the reference and the Triton forward; returns the
    variants that failed to compile or run (reported, then left out of the timings)."""
    s = Shape(tokens)
    segment_ids = jnp.where(jnp.arange(tokens) < tokens * 9 // 16, 1, 2)[None].astype(jnp.int32)
    ops, kw = _operands(s, kind, segment_ids)
    q, kv, comp, idx, sinks = ops[:5]
    fwd = _forwards(s, kind, block_k, stages)
    o_t, lse_t = fwd.pop("triton")(*ops)
    if kind == "csa":
        ref = csa_attention_reference(q, kv, comp, idx, sinks, window=s.window, segment_ids_BT=segment_ids)
    else:
        ref = hca_attention_reference(q, kv, comp, sinks, window=s.window, ratio=s.hca_ratio,
                                      segment_ids_BT=segment_ids)
    f32 = lambda x: np.asarray(x, np.float32)
    broken = []
    for variant, run in fwd.items():
        try:
            o_h, lse_h = jax.block_until_ready(run(*ops))
        except Exception as error:  # noqa: BLE001 - a lowering/compile error of one variant is reported
            print(f"check {kind} {variant}: FAILED to compile or run: {type(error).__name__}: {error}"[:2000])
            broken.append(variant)
            continue
        for name, got, want, tol in [("o vs reference", o_h, ref, 2e-2), ("o vs triton", o_h, o_t, 2e-2),
                                     ("lse vs triton", lse_h, lse_t, 1e-3)]:
            err = float(np.max(np.abs(f32(got) - f32(want))))
            scale = max(1.0, float(np.max(np.abs(f32(want)))))
            print(f"check {kind} {variant}, {tokens} tokens: {name}: max |diff| {err:.2e} "
                  f"(allowed {tol * scale:.1e})")
            assert np.all(np.isfinite(f32(got))), f"{kind} {variant} {name}: non-finite output"
            assert err <= tol * scale, f"{kind} {variant} {name}: max |diff| {err} over {tol * scale}"
    if "hopper" not in broken:   # the public function's gradients: this forward's O and lse, Triton's backward
        probe = jax.random.normal(jax.random.key(7), q.shape, jnp.bfloat16)
        grads = lambda attend: jax.jit(lambda *a: jax.vjp(attend, *a)[1](probe))(q, kv, comp, sinks)
        common = dict(window=s.window, segment_ids_BT=segment_ids, **kw)
        if kind == "csa":
            got = grads(lambda q, kv, c, sk: compressed_hopper.csa_attention_hopper(q, kv, c, idx, sk, **common))
            want = grads(lambda q, kv, c, sk: csa_attention(q, kv, c, idx, sk, impl="pallas_gpu", **common))
        else:
            got = grads(lambda q, kv, c, sk: compressed_hopper.hca_attention_hopper(q, kv, c, sk, **common))
            want = grads(lambda q, kv, c, sk: hca_attention(q, kv, c, sk, impl="pallas_gpu", **common))
        for name, g, w in zip(("dq", "dkv", "dkv_comp", "dsinks"), got, want):
            err = float(np.max(np.abs(f32(g) - f32(w))))
            allowed = 2e-2 * max(1.0, float(np.max(np.abs(f32(w)))))
            print(f"check {kind} hopper, {tokens} tokens: {name} vs triton: max |diff| {err:.2e} "
                  f"(allowed {allowed:.1e})")
            assert np.all(np.isfinite(f32(g))) and err <= allowed, f"{kind} hopper {name}: max |diff| {err}"
    return broken


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kind", default="csa,hca", help="comma-separated subset of csa,hca")
    parser.add_argument("--seq", type=int, nargs="*", default=[8192, 32768, 131072])
    parser.add_argument("--check-seq", type=int, default=None, help="tokens of the check (default: CSA 1K, HCA 16K)")
    parser.add_argument("--block-k", type=int, default=None)
    parser.add_argument("--stages", type=int, default=None)
    parser.add_argument("--iters", type=int, default=10)
    args = parser.parse_args()
    kinds = args.kind.split(",")
    if any(k not in KINDS for k in kinds):
        sys.exit(f"--kind: expected a comma-separated subset of {KINDS}, got {args.kind!r}")
    if not compressed_hopper.runs_on_this_device():
        sys.exit("needs a Hopper GPU (compute capability 9.x)")
    for kind in kinds:
        broken = check(kind, args.check_seq or CHECK_SEQ[kind], args.block_k, args.stages)
        print(f"\n{'kind':>4} {'tokens':>8} {'forward':>13} {'ms':>9} {'TFLOP/s':>8}")
        for tokens in args.seq:
            s = Shape(tokens)
            ops, _ = _operands(s, kind)
            flops = needed_flops(s)[kind]
            for name, fn in _forwards(s, kind, args.block_k, args.stages).items():
                if name in broken:
                    continue
                seconds = median_seconds(fn, ops, args.iters)
                print(f"{kind:>4} {tokens:>8} {name:>13} {seconds * 1e3:>9.3f} {flops / seconds / 1e12:>8.1f}")


if __name__ == "__main__":
    main()
