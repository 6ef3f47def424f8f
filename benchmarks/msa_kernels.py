"""Checks and times the Memory Sparse Attention kernels (pallas_kernels/msa*.py) against their pure-JAX
references, at the paper's Qwen3-4B heads (32 query / 8 kv heads of 128, bf16).

    python benchmarks/msa_kernels.py            # GPU: checks, then routing over 16K..100M-token banks and attention
    python benchmarks/msa_kernels.py --sweep    # also a few block sizes of each kernel
    python benchmarks/msa_kernels.py --smoke    # tiny shapes, interpret mode on CPU (checks the script runs)

1. Correctness: the Triton lowering against the reference (forward and gradients, float32 and bf16) at
   sizes that are not multiples of the tiles; prints the max abs errors and asserts they are within
   tolerance (a fraction of the reference's largest magnitude).
2. Routing: one query of T router tokens against banks of 16K, 1M, 10M and 100M tokens (C = tokens / 64
   pooled chunks, documents of 1024 tokens, top-16): the chunk-score kernel alone and the whole route
   (+ document max + top-k), ms per query, GB/s of bank keys read (C x 8 x 128 bf16) and TFLOP/s (of the
   T x N x C per-head dots the scores stand for; the mean-reduction kernel does them as T x K x C dots of
   group-mean queries, in two 16-bit halves); the reference where its [B, T, N, C] dots fit. Banks that do not fit the device's memory are skipped.
3. Attention over [memory; own]: forward and forward+backward ms and TFLOP/s (fwd+bwd counted as 3.5x the
   forward's FLOPs) of the kernel and the reference; "OOM" where the reference does not fit.
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
from pallas_kernels import MsaBlockSizes, msa_attention, msa_chunk_scores, msa_route  # noqa: E402
from pallas_kernels.msa import unambiguous_chunks  # noqa: E402

CHUNK, DOC_TOKENS, TOP_K = 64, 1024, 16


def unit(x):
    return (x / jnp.linalg.norm(x.astype(jnp.float32), axis=-1, keepdims=True)).astype(x.dtype)


def normal(seed, shape, dtype):
    return jax.random.normal(jax.random.key(seed), shape, jnp.float32).astype(dtype)


def memory_limit() -> float:
    stats = jax.devices()[0].memory_stats() or {}
    return float(stats.get("bytes_limit", 1 << 62))


def timed(fn, args, iters):
    """(status, median seconds): compiles first; out-of-memory is a status, not a crash."""
    try:
        compiled = jax.jit(fn).lower(*args).compile()
        return "ok", median_seconds(compiled, args, iters)
    except Exception as e:  # noqa: BLE001 - reported in the table
        message = str(e).strip().splitlines()[0][:160] if str(e).strip() else ""
        print(f"    ({type(e).__name__}: {message})")
        oom = "RESOURCE_EXHAUSTED" in str(e) or "out of memory" in str(e).lower()
        return ("OOM" if oom else "error"), None


def max_error(actual, expected) -> tuple[float, float]:
    """(max |actual - expected|, max |expected|) over the finite reference entries."""
    a, e = np.asarray(actual, np.float32), np.asarray(expected, np.float32)
    finite = np.isfinite(e)
    assert np.array_equal(np.isfinite(a), finite), "non-finite values where the reference has none"
    return float(np.abs(a - e)[finite].max(initial=0.0)), float(np.abs(e[finite]).max(initial=0.0))


# ------------------------------------------------------------------------------------------- correctness
def check(args, impl, blocks):
    tol = {jnp.float32: 1e-4, jnp.bfloat16: 2e-2}
    H, N, K = args.head_dim, args.heads, args.kv_heads
    T, C, S = (37, 203, 45) if args.smoke else (300, 5003, 1000)
    print(f"== correctness: {impl} vs reference (T={T}, bank chunks={C}, own tokens={S}) ==")
    for dtype in (jnp.float32, jnp.bfloat16):
        q, k = unit(normal(0, (2, T, N, H), dtype)), unit(normal(1, (C, K, H), dtype))
        valid = jnp.array([T, T // 3], jnp.int32)
        for head_reduce in ("mean", "max"):
            probe = jnp.where(unambiguous_chunks(q, k, valid, head_reduce=head_reduce), normal(2, (2, C), jnp.float32), 0.0)

            def route(impl_, head_reduce=head_reduce, probe=probe):
                f = lambda q, k: msa_chunk_scores(q, k, valid_B=valid, head_reduce=head_reduce, impl=impl_,
                                                  block_sizes=blocks if impl_ != "xla" else None)
                out, vjp = jax.vjp(f, q, k)
                return out, vjp(probe)
            got, ref = jax.jit(lambda: route(impl))(), jax.jit(lambda: route("xla"))()
            report(f"routing {head_reduce:<4}", dtype, zip(("scores", "dq", "dk"), [got[0], *got[1]],
                                                           [ref[0], *ref[1]]), tol[dtype])
        ks = [normal(i, shape, dtype) for i, shape in enumerate([(2, S, N, H), (2, S, K, H), (2, S, K, H),
                                                                 (2, 300, K, H), (2, 300, K, H)], start=3)]
        sinks, count = normal(9, (N,), jnp.float32), jnp.array([300, 77], jnp.int32)
        probe = normal(10, (2, S, N, H), dtype)
        for window in (0, 16 if args.smoke else 256):
            def attend(impl_, window=window):
                f = lambda *a: msa_attention(*a[:5], count, sinks_N=a[5], window=window, impl=impl_,
                                             block_sizes=blocks if impl_ != "xla" else None)
                out, vjp = jax.vjp(f, *ks, sinks)
                return out, vjp(probe)
            got, ref = jax.jit(lambda: attend(impl))(), jax.jit(lambda: attend("xla"))()
            names = ("out", "dq", "dk", "dv", "dmem_k", "dmem_v", "dsinks")
            report(f"attention window {window:<3}", dtype, zip(names, [got[0], *got[1]], [ref[0], *ref[1]]),
                   tol[dtype])


def report(what, dtype, triples, tol):
    parts, ok = [], True
    for name, a, e in triples:
        err, scale = max_error(a, e)
        ok &= err <= tol * max(1.0, scale)
        parts.append(f"{name} {err:.2e}")
    print(f"  {what} {jnp.dtype(dtype).name:<8} max abs err: " + ", ".join(parts) + ("" if ok else "  FAIL"))
    assert ok, f"{what} {jnp.dtype(dtype).name}: error over {tol} x max(1, max |reference|)"


# ----------------------------------------------------------------------------------------------- routing
def bench_routing(args, impl, blocks):
    H, N, K, T = args.head_dim, args.heads, args.kv_heads, args.query_tokens
    sizes = [1 << 12, 1 << 14] if args.smoke else [16 * 1024, 1 << 20, 10 * (1 << 20), 100 * (1 << 20)]
    print(f"\n== routing: 1 query x {T} tokens, {N}/{K} heads x {H}, bf16 bank, chunks of {CHUNK}, top-{TOP_K} ==")
    print(f"{'bank tokens':>12} | {'chunks':>9} | {'kernel ms':>9} | {'GB/s keys':>9} | {'TFLOP/s':>7} | "
          f"{'route ms':>8} | {'ref ms':>8} | {'ref route ms':>12}")
    for tokens in sizes:
        C = tokens // CHUNK
        bank_bytes = C * K * H * 2
        ref_bytes = 4 * T * N * C * 2            # the reference's float32 [T, N, C] dots, twice
        if 3 * bank_bytes > memory_limit():      # the bank, its normalisation's temporary, headroom
            print(f"{tokens:>12} | {C:>9} | skipped: a bank of {bank_bytes / 2**30:.1f} GiB does not fit")
            continue
        q = unit(normal(0, (1, T, N, H), jnp.bfloat16))
        k = unit(normal(1, (C, K, H), jnp.bfloat16))
        doc_C = (jnp.arange(C, dtype=jnp.int32) * CHUNK) // DOC_TOKENS
        M = -(-C * CHUNK // DOC_TOKENS)
        flops = 2.0 * T * N * H * C
        cells = []
        for impl_ in (impl, "xla"):
            if impl_ == "xla" and 2 * ref_bytes + bank_bytes > memory_limit():
                cells += ["OOM", "OOM"]
                continue
            b = blocks if impl_ != "xla" else None
            scores = lambda q, k, doc_C, impl_=impl_, b=b: msa_chunk_scores(q, k, impl=impl_, block_sizes=b)
            route = lambda q, k, doc_C, impl_=impl_, b=b: msa_route(q, k, doc_C, M, min(TOP_K, M), impl=impl_,
                                                                    block_sizes=b)[1]
            for fn in (scores, route):
                status, seconds = timed(fn, (q, k, doc_C), args.iters)
                cells.append(seconds if seconds else status)
        kernel = cells[0]
        ms = lambda x: f"{x * 1e3:.3f}" if isinstance(x, float) else x
        rate = lambda x, total, unit_: f"{total / x / unit_:.1f}" if isinstance(x, float) else "-"
        print(f"{tokens:>12} | {C:>9} | {ms(kernel):>9} | {rate(kernel, bank_bytes, 1e9):>9} | "
              f"{rate(kernel, flops, 1e12):>7} | {ms(cells[1]):>8} | {ms(cells[2]):>8} | {ms(cells[3]):>12}",
              flush=True)
        del q, k, doc_C


# --------------------------------------------------------------------------------------------- attention
def bench_attention(args, impl, blocks):
    H, N, K = args.head_dim, args.heads, args.kv_heads
    shapes = [(40, 20)] if args.smoke else [(2048, 1024), (8192, 4096), (16384, 16384)]
    print(f"\n== attention over [memory; own]: {N}/{K} heads x {H}, bf16, causal own part, no window ==")
    print(f"{'own T':>7} | {'memory C':>8} | {'variant':<10} | {'pass':<7} | {'ms':>9} | {'TFLOP/s':>7}")
    for T, C in shapes:
        inputs = [normal(i, shape, jnp.bfloat16) for i, shape in enumerate(
            [(1, T, N, H), (1, T, K, H), (1, T, K, H), (1, C, K, H), (1, C, K, H)])]
        flops = 4.0 * N * H * (T * C + T * (T + 1) / 2)
        for label, impl_ in (("pallas", impl), ("xla ref", "xla")):
            b = blocks if impl_ != "xla" else None
            attend = lambda *a, impl_=impl_, b=b: msa_attention(*a, impl=impl_, block_sizes=b)
            grads = jax.grad(lambda *a, f=attend: f(*a).astype(jnp.float32).sum(), argnums=(0, 1, 2, 3, 4))
            for mode, fn, factor in (("fwd", attend, 1.0), ("fwd+bwd", grads, 3.5)):
                if impl_ == "xla" and 4 * N * T * (T + C) * (4 if mode == "fwd" else 8) > memory_limit():
                    status, seconds = "OOM", None
                else:
                    status, seconds = timed(fn, inputs, args.iters)
                time_s = f"{seconds * 1e3:9.3f}" if seconds else f"{status:>9}"
                rate = f"{factor * flops / seconds / 1e12:7.1f}" if seconds else f"{'-':>7}"
                print(f"{T:>7} | {C:>8} | {label:<10} | {mode:<7} | {time_s} | {rate}", flush=True)
        del inputs


def sweep(args, impl):
    """A few tile choices of each kernel at one size (1M-token bank; 8K own tokens with 4K memory chunks)."""
    H, N, K, T = args.head_dim, args.heads, args.kv_heads, args.query_tokens
    C = (1 << 14 if args.smoke else 1 << 20) // CHUNK
    q, k = unit(normal(0, (1, T, N, H), jnp.bfloat16)), unit(normal(1, (C, K, H), jnp.bfloat16))
    print(f"\n== sweep: routing, {C} chunks ==")
    for bt, bc, warps in ((16, 32, 4), (16, 64, 4), (16, 128, 4), (32, 64, 4), (16, 128, 8), (64, 64, 8)):
        b = MsaBlockSizes(block_t=bt, block_c=bc, num_warps=warps)
        status, seconds = timed(lambda q, k, b=b: msa_chunk_scores(q, k, impl=impl, block_sizes=b), (q, k), args.iters)
        print(f"  block_t {bt:>3} block_c {bc:>3} warps {warps}: " + (f"{seconds * 1e3:.3f} ms" if seconds else status))
    Ts, Cm = (40, 20) if args.smoke else (8192, 4096)
    inputs = [normal(i, shape, jnp.bfloat16) for i, shape in enumerate(
        [(1, Ts, N, H), (1, Ts, K, H), (1, Ts, K, H), (1, Cm, K, H), (1, Cm, K, H)])]
    print(f"== sweep: attention fwd+bwd, T={Ts}, C={Cm} ==")
    for bq, bk, warps, stages in ((64, 64, 4, 2), (128, 64, 8, 2), (64, 32, 4, 3), (128, 32, 4, 2), (32, 64, 4, 2)):
        b = MsaBlockSizes(block_q=bq, block_kv=bk, num_warps=warps, num_stages=stages)
        f = jax.grad(lambda *a, b=b: msa_attention(*a, impl=impl, block_sizes=b).astype(jnp.float32).sum(),
                     argnums=(0, 1, 2, 3, 4))
        status, seconds = timed(f, inputs, args.iters)
        print(f"  block_q {bq:>3} block_kv {bk:>3} warps {warps} stages {stages}: "
              + (f"{seconds * 1e3:.3f} ms" if seconds else status))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny shapes, interpret mode on CPU")
    parser.add_argument("--sweep", action="store_true", help="also time a few block sizes")
    parser.add_argument("--query-tokens", type=int, default=64, help="router query tokens per query")
    parser.add_argument("--iters", type=int, default=10)
    args = parser.parse_args()
    args.heads, args.kv_heads, args.head_dim = (4, 2, 16) if args.smoke else (32, 8, 128)
    if args.smoke:
        args.query_tokens, args.iters = 8, 1
        blocks = MsaBlockSizes(block_t=8, block_c=16, block_q=16, block_kv=16)
    else:
        blocks = None
        if jax.default_backend() != "gpu":
            sys.exit("msa_kernels.py times the Triton lowering on a GPU; use --smoke elsewhere")
    print(f"device: {jax.devices()[0].device_kind}, jax {jax.__version__}")
    check(args, "pallas_gpu", blocks)
    bench_routing(args, "pallas_gpu", blocks)
    bench_attention(args, "pallas_gpu", blocks)
    if args.sweep:
        sweep(args, "pallas_gpu")


if __name__ == "__main__":
    main()
