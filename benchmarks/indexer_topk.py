"""Checks the fused lightning-indexer top-k (`indexer_topk(..., fused=True)`, Triton) against the chunked
path and the reference scores on the GPU, then times it against the scores kernel alone.

    python benchmarks/indexer_topk.py                        # GPU: check at 8K, time 8K / 32K / 128K
    python benchmarks/indexer_topk.py --seq 131072 --sweep   # also a few fused block sizes
    python benchmarks/indexer_topk.py --smoke                # tiny shapes, interpret mode on CPU

V4-Flash indexer (64 heads x 128, ratio 4, top-k 512, bf16, batch 1). The check compares, per token, the
scores of the picked entries (taken from the Pallas scores kernel) of the fused and the chunked top-k, sorted:
ties and last-bit differences between the two kernels' float32 sums may swap equal-scoring entries, never
change the set of scores beyond that. "rising" inputs give later entries higher scores (each new block
beats the current top-k: the fused kernel's worst case, a compaction every few blocks).
"""
from __future__ import annotations

import argparse
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.attention import SMOKE, Shape, make_inputs, measure  # noqa: E402
from pallas_kernels import IndexerBlockSizes, indexer_scores, indexer_topk  # noqa: E402

SWEEP = {"bt2 bs64 w4 s2 (default)": IndexerBlockSizes(block_t=2, block_s=64, num_warps=4, num_stages=2),
         "bt2 bs64 w4 s3": IndexerBlockSizes(block_t=2, block_s=64, num_warps=4, num_stages=3),
         "bt2 bs128 w8 s2": IndexerBlockSizes(block_t=2, block_s=128, num_warps=8, num_stages=2),
         "bt4 bs64 w8 s2": IndexerBlockSizes(block_t=4, block_s=64, num_warps=8, num_stages=2),
         "bt1 bs64 w4 s2": IndexerBlockSizes(block_t=1, block_s=64, num_warps=4, num_stages=2),
         "bt2 bs64 w4 s2 part 1024": IndexerBlockSizes(topk_part=1024),
         "bt2 bs64 w4 s2 part 256": IndexerBlockSizes(topk_part=256)}


def inputs(s: Shape, dtype, rising: bool = False):
    x = make_inputs(s, dtype)
    q, k, w = x["q_i"], x["k_i"], jnp.abs(x["w_i"])
    if rising:   # scores grow with the entry index
        C = k.shape[1]
        q = jnp.abs(q)
        k = (jnp.abs(k).astype(jnp.float32) * (1 + jnp.arange(C) / C)[None, :, None]).astype(dtype)
    return q, k, w


def check(s: Shape, dtype, impl: str, blocks, rising: bool) -> str:
    q, k, w = inputs(s, dtype, rising)
    run = jax.jit(lambda fused, *a: indexer_topk(*a, ratio=s.csa_ratio, topk=s.topk, impl=impl, fused=fused,
                                                 block_sizes=blocks), static_argnums=0)
    fused, chunked = np.asarray(run(True, q, k, w)), np.asarray(run(False, q, k, w))
    scores = np.asarray(indexer_scores(q, k, w, ratio=s.csa_ratio, impl=impl, block_sizes=blocks))
    picked = lambda idx: -np.sort(-np.where(idx >= 0, np.take_along_axis(scores, np.maximum(idx, 0), -1), -np.inf))
    a, b = picked(fused), picked(chunked)
    n_visible = np.minimum((np.arange(s.tokens) + 1) // s.csa_ratio, k.shape[1])
    ok_count = np.array_equal((fused >= 0).sum(-1)[0], np.minimum(n_visible, s.topk))
    ok_causal = bool(np.all(fused[0] < n_visible[:, None]))
    finite = np.isfinite(b)
    ok_set = np.array_equal(np.isfinite(a), finite) and np.allclose(a[finite], b[finite], rtol=1e-5, atol=1e-6)
    same = np.mean(np.sort(fused, -1) == np.sort(chunked, -1))
    status = "PASS" if ok_count and ok_causal and ok_set else "FAIL"
    return (f"{status} check {s.tokens} tokens{' rising' if rising else ''}: counts {ok_count}, causal {ok_causal}, "
            f"score sets {ok_set}, identical indices {same:.4%}")


def timings(s: Shape, dtype, impl: str, iters: int, sweep: bool, blocks):
    rows = []
    q, k, w = inputs(s, dtype)
    topk = lambda fused, b: lambda *a: indexer_topk(*a, ratio=s.csa_ratio, topk=s.topk, impl=impl, fused=fused,
                                                     block_sizes=b)
    variants = [("scores kernel alone", lambda *a: indexer_scores(*a, ratio=s.csa_ratio, impl=impl,
                                                                  block_sizes=blocks)),
                ("top-k chunked", topk(False, blocks)), ("top-k fused", topk(True, blocks))]
    if sweep:
        variants += [(f"top-k fused {label}", topk(True, b)) for label, b in SWEEP.items()]
    for name, fn in variants:
        rows.append((s.tokens, name, *measure(fn, (q, k, w), iters)))
    rising = inputs(s, dtype, rising=True)
    rows.append((s.tokens, "top-k fused, rising scores", *measure(topk(True, blocks), rising, iters)))
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny shapes; interpret mode on CPU")
    parser.add_argument("--seq", default="8192,32768,131072", help="comma-separated token counts to time")
    parser.add_argument("--check-seq", type=int, default=8192, help="token count of the correctness check")
    parser.add_argument("--iters", type=int, default=3)
    parser.add_argument("--sweep", action="store_true", help="also time the fused kernel under SWEEP's blocks")
    args = parser.parse_args()
    dtype, impl = jnp.bfloat16, "pallas_gpu"
    if args.smoke:
        smoke = dict(SMOKE, topk=8)
        checks, shapes = [Shape(tokens=200, **smoke)], [Shape(tokens=200, **smoke)]
        blocks, iters = IndexerBlockSizes(block_t=4, block_s=16, topk_part=8), 1
    else:
        checks, shapes = [Shape(tokens=args.check_seq)], [Shape(tokens=int(t)) for t in args.seq.split(",")]
        blocks, iters = None, args.iters
    print(f"platform {jax.default_backend()} ({jax.devices()[0].device_kind}), jax {jax.__version__}")
    for s in checks:
        for rising in (False, True):
            print(check(s, dtype, impl, blocks, rising), flush=True)
    rows = []
    for s in shapes:
        rows += timings(s, dtype, impl, iters, args.sweep, blocks)
    print(f"\n{'tokens':>7} | {'variant':<40} | {'ms':>9} | {'x scores':>8} | {'mem GiB':>8}")
    base = {}
    for tokens, name, status, seconds, nbytes in rows:
        if name == "scores kernel alone" and seconds:
            base[tokens] = seconds
        ratio = f"{seconds / base[tokens]:8.2f}" if seconds and tokens in base else f"{'-':>8}"
        ms = f"{seconds * 1e3:9.2f}" if seconds else f"{status:>9}"
        mem = f"{nbytes / 2**30:8.3f}" if nbytes else f"{'-':>8}"
        print(f"{tokens:>7} | {name:<40} | {ms} | {ratio} | {mem}")


if __name__ == "__main__":
    main()
