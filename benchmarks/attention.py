"""Times DeepSeek-V4-Flash attention: the CSA / HCA / lightning-indexer kernels against their pure-JAX
references and dense cuDNN attention over the full sequence.

    python benchmarks/attention.py                      # GPU: 8K, 32K, 128K tokens
    python benchmarks/attention.py --smoke              # tiny shapes, any platform (checks it runs)
    python benchmarks/attention.py --seq 8192 --sweep   # also try a few kernel block sizes
    python benchmarks/attention.py --only csa --seq 8192,32768 --csa-dkv atomic,inverted,staged
                                                        # CSA's ways of forming dK=dV of the selected rows
    python benchmarks/attention.py --only csa --seq 8192 --csa-dkv atomic,inverted,staged --check-csa
                                                        # first: their gradients against the reference

The indexer rows include the fused top-k (GPU only; benchmarks/indexer_topk.py checks and sweeps it).

Per variant: median wall time, effective TFLOP/s on the FLOPs actually needed (each token's visible window,
selected / visible compressed entries, or causal prefix; fwd+bwd counted as 3.5x fwd for attention, 3x
for the indexer), and the compiled program's memory (arguments + outputs + temporaries, from XLA's memory
analysis). Variants that do not fit in the memory JAX may use on the device (its bytes_limit) are reported
as OOM (not run when XLA's estimate is already over it); "smem" marks a kernel configuration over the
GPU's shared memory. cuDNN does not take head_dim 512, so dense attention runs as 128 heads x 256 (the
same FLOPs) when 64 x 512 is refused.
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
from pallas_kernels import BlockSizes, csa_attention, hca_attention, indexer_scores, indexer_topk  # noqa: E402


@dataclasses.dataclass(frozen=True)
class Shape:
    """V4-Flash attention: 64 heads x 512, window 128, top-k 512, CSA ratio 4, HCA ratio 128,
    indexer 64 heads x 128."""
    tokens: int
    heads: int = 64
    head_dim: int = 512
    window: int = 128
    topk: int = 512
    csa_ratio: int = 4
    hca_ratio: int = 128
    index_heads: int = 64
    index_dim: int = 128


SMOKE = dict(heads=4, head_dim=32, window=8, topk=4, csa_ratio=4, hca_ratio=8, index_heads=4, index_dim=16)
SMOKE_BLOCKS = BlockSizes(block_h=16, block_k=16, block_kv_bwd=16, block_rows_bwd=16)


def needed_flops(s: Shape) -> dict[str, float]:
    """Forward FLOPs of what each token actually attends to (2 matmuls of 2 FLOPs per MAC)."""
    t = np.arange(s.tokens, dtype=np.float64)
    window = np.minimum(t + 1, s.window)
    csa_entries = np.minimum((t + 1) // s.csa_ratio, s.topk)
    hca_entries = (t + 1) // s.hca_ratio
    per_key = 4.0 * s.heads * s.head_dim
    return {"csa": per_key * np.sum(window + csa_entries), "hca": per_key * np.sum(window + hca_entries),
            "indexer": 2.0 * s.index_heads * s.index_dim * np.sum((t + 1) // s.csa_ratio),
            "dense": per_key * np.sum(t + 1)}


def make_inputs(s: Shape, dtype):
    B, T, H, D = 1, s.tokens, s.heads, s.head_dim
    ks = jax.random.split(jax.random.key(0), 9)
    normal = lambda k, shape, scale=1.0: (scale * jax.random.normal(k, shape, jnp.float32)).astype(dtype)
    # Causal pseudo-random top-k: token t picks min(n_t, K) of its n_t = (t+1)//4 visible entries.
    n_T1 = ((jnp.arange(T) + 1) // s.csa_ratio)[:, None]
    slot_K = jnp.arange(s.topk)[None, :]
    offset_T1 = jax.random.randint(ks[6], (T, 1), 0, 1 << 30)
    idx_TK = jnp.where(slot_K < n_T1, (offset_T1 + 97 * slot_K) % jnp.maximum(n_T1, 1), -1)
    return dict(q=normal(ks[0], (B, T, H, D), D ** -0.25), kv=normal(ks[1], (B, T, D), D ** -0.25),
                csa_comp=normal(ks[2], (B, T // s.csa_ratio, D), D ** -0.25),
                hca_comp=normal(ks[3], (B, T // s.hca_ratio, D), D ** -0.25),
                indices=idx_TK[None].astype(jnp.int32), sinks=jax.random.normal(ks[4], (H,), jnp.float32),
                q_i=normal(ks[5], (B, T, s.index_heads, s.index_dim)),
                k_i=normal(ks[7], (B, T // s.csa_ratio, s.index_dim)),
                w_i=jax.random.normal(ks[8], (B, T, s.index_heads), jnp.float32) * (s.index_heads * s.index_dim) ** -0.5)


def with_backward(fn, argnums):
    """fwd+bwd: the gradient of <fn(...), 1> w.r.t. the differentiable arguments."""
    def loss(*args):
        out = fn(*args)
        return jnp.sum(jnp.where(jnp.isfinite(out), out, 0).astype(jnp.float32))
    return jax.grad(loss, argnums=argnums)


def variants(s: Shape, impl_kernel: str, blocks: BlockSizes | None, dense_layout, csa_dkv=("atomic",)):
    """(name, family, fn, argument names, differentiable argnums) per benchmarked computation; one Pallas
    CSA row per entry of csa_dkv (csa_attention's `dkv`)."""
    csa = lambda impl, b, dkv="atomic": lambda q, kv, comp, idx, sinks: csa_attention(
        q, kv, comp, idx, sinks, window=s.window, impl=impl, block_sizes=b, dkv=dkv)
    hca = lambda impl, b: lambda q, kv, comp, sinks: hca_attention(
        q, kv, comp, sinks, window=s.window, ratio=s.hca_ratio, impl=impl, block_sizes=b)
    scores = lambda impl: lambda q, k, w: indexer_scores(q, k, w, ratio=s.csa_ratio, impl=impl)
    topk = lambda impl, fused=False: lambda q, k, w: indexer_topk(q, k, w, ratio=s.csa_ratio, topk=s.topk,
                                                                 impl=impl, fused=fused)
    csa_args, hca_args, idx_args = ("q", "kv", "csa_comp", "indices", "sinks"), ("q", "kv", "hca_comp", "sinks"), \
        ("q_i", "k_i", "w_i")
    out = []
    for impl, label in ((impl_kernel, "pallas"), ("xla", "xla ref")):
        b = blocks if impl != "xla" else None
        dkvs = csa_dkv if impl != "xla" else ("atomic",)
        out += [(f"CSA {label}" + (f" dkv={d}" if len(dkvs) > 1 else ""), "csa", csa(impl, b, d), csa_args,
                 (0, 1, 2, 4)) for d in dkvs]
        out += [(f"HCA {label}", "hca", hca(impl, b), hca_args, (0, 1, 2, 3)),
                (f"indexer top-k {label}", "indexer", topk(impl), idx_args, None),
                (f"indexer scores {label}", "indexer", scores(impl), idx_args, (0, 1, 2))]
    if impl_kernel == "pallas_gpu":   # selects while scoring: no scores written (Triton only)
        out.append(("indexer top-k pallas fused", "indexer", topk(impl_kernel, fused=True), idx_args, None))
    if dense_layout is not None:
        heads, dim, note = dense_layout
        def dense(q, kv):
            q = q.reshape(*q.shape[:2], heads, dim)
            k = kv.reshape(*kv.shape[:2], heads // s.heads, dim) if heads != s.heads else kv[:, :, None]
            return jax.nn.dot_product_attention(q, k, k, is_causal=True, implementation="cudnn")
        out.append((f"dense cuDNN{note}", "dense", dense, ("q", "kv"), (0, 1)))
    return out


def dense_layout(s: Shape, inputs) -> tuple[int, int, str] | None:
    """cuDNN's head_dim limit: try 512; else the same FLOPs as 2x heads of half the dim (K=V split too)."""
    if jax.default_backend() != "gpu":
        return None
    for heads, dim, note in ((s.heads, s.head_dim, ""), (2 * s.heads, s.head_dim // 2, " (128x256: D=512 unsupported)")):
        q = inputs["q"][:, :256].reshape(1, 256, heads, dim)
        kv = inputs["kv"][:, :256].reshape(1, 256, heads // s.heads, dim) if heads != s.heads else inputs["kv"][:, :256, None]
        try:
            jax.block_until_ready(jax.nn.dot_product_attention(q, kv, kv, is_causal=True, implementation="cudnn"))
            return heads, dim, note
        except Exception:  # noqa: BLE001 - cuDNN reports unsupported configurations as various errors
            continue
    return None


def memory_limit() -> float | None:
    stats = jax.devices()[0].memory_stats() or {}
    return stats.get("bytes_limit")


def _failure(e: Exception) -> str:
    """A short table status for a failed variant; the message goes to the log."""
    message = str(e)
    print(f"    ({type(e).__name__}: {message.strip().splitlines()[0][:160] if message.strip() else ''})")
    if "shared memory" in message.lower():
        return "smem"
    if "RESOURCE_EXHAUSTED" in message or "out of memory" in message.lower():
        return "OOM"
    return "error"


def measure(fn, args, iters: int) -> tuple[str, float | None, float | None]:
    """(status, median seconds, program bytes)."""
    try:
        compiled = jax.jit(fn).lower(*args).compile()
    except Exception as e:  # noqa: BLE001 - reported in the table
        return _failure(e), None, None
    mem = compiled.memory_analysis()
    nbytes = None if mem is None else float(mem.argument_size_in_bytes + mem.output_size_in_bytes
                                             + mem.temp_size_in_bytes - mem.alias_size_in_bytes)
    limit = memory_limit()
    if nbytes is not None and limit is not None and nbytes > limit:
        return "OOM", None, nbytes
    try:
        return "ok", median_seconds(compiled, args, iters), nbytes
    except Exception as e:  # noqa: BLE001 - reported in the table
        return _failure(e), None, nbytes


FAMILIES = ("csa", "hca", "indexer", "dense")


def run(shapes, dtype, iters, impl_kernel, blocks, families=FAMILIES, csa_dkv=("atomic",)):
    rows = []
    for s in shapes:
        inputs = make_inputs(s, dtype)
        flops = needed_flops(s)
        layout = dense_layout(s, inputs) if "dense" in families else None
        for name, family, fn, arg_names, argnums in variants(s, impl_kernel, blocks, layout, csa_dkv):
            if family not in families:
                continue
            args = [inputs[a] for a in arg_names]
            passes = [("fwd", fn, 1.0)]
            if argnums is not None:
                passes.append(("fwd+bwd", with_backward(fn, argnums), 3.0 if family == "indexer" else 3.5))
            for mode, f, factor in passes:
                status, seconds, nbytes = measure(f, args, iters)
                tflops = factor * flops[family] / seconds / 1e12 if seconds else None
                rows.append((s.tokens, name, mode, status, seconds, tflops, nbytes))
                print(format_row(rows[-1]), flush=True)
        del inputs
    return rows


def format_row(row) -> str:
    tokens, name, mode, status, seconds, tflops, nbytes = row
    time_s = f"{seconds * 1e3:10.2f}" if seconds else f"{status:>10}"
    rate = f"{tflops:8.1f}" if tflops else f"{'-':>8}"
    mem = f"{nbytes / 2**30:9.3f}" if nbytes else f"{'-':>9}"
    return f"{tokens:>7} | {name:<46} | {mode:<7} | {time_s} | {rate} | {mem}"


def print_table(rows, title):
    header = f"{'tokens':>7} | {'variant':<46} | {'pass':<7} | {'ms':>10} | {'TFLOP/s':>8} | {'mem GiB':>9}"
    print(f"\n{title}\n{header}\n{'-' * len(header)}")
    for row in rows:
        print(format_row(row))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny shapes; runs anywhere (interpret mode on CPU)")
    parser.add_argument("--seq", default="8192,32768,131072", help="comma-separated token counts")
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--only", default=",".join(FAMILIES), help=f"comma-separated subset of {FAMILIES}")
    parser.add_argument("--csa-dkv", default="atomic", help="comma-separated CSA backward dK=dV paths to time "
                        "(csa_attention's dkv: atomic, inverted, staged)")
    parser.add_argument("--check-csa", action="store_true", help="first compare the gradients of each --csa-dkv "
                        "path with the pure-JAX reference's at the first --seq (random cotangent)")
    parser.add_argument("--sweep", action="store_true", help="also time CSA/HCA under a few block sizes")
    parser.add_argument("--profile", metavar="DIR", help="only write a profiler trace of the kernels' fwd+bwd "
                        "at the first --seq to DIR (per-kernel times: perfetto_trace.json.gz)")
    args = parser.parse_args()
    families = tuple(args.only.split(","))
    if unknown := set(families) - set(FAMILIES):
        parser.error(f"--only: unknown {sorted(unknown)}; expected a subset of {FAMILIES}")
    dtype = jnp.dtype(args.dtype)
    platform = jax.default_backend()
    impl_kernel = {"gpu": "pallas_gpu", "tpu": "pallas_tpu"}.get(platform, "pallas_gpu")
    if args.smoke:
        shapes, blocks, iters = [Shape(tokens=29, **SMOKE)], SMOKE_BLOCKS, 1
    else:
        shapes, blocks, iters = [Shape(tokens=int(t)) for t in args.seq.split(",")], None, args.iters
    print(f"platform {platform} ({jax.devices()[0].device_kind}), jax {jax.__version__}, {dtype.name}, "
          f"kernels {impl_kernel}{' (interpret mode)' if platform == 'cpu' else ''}")
    if args.profile:
        return profile(shapes[0], dtype, impl_kernel, blocks, args.profile)
    if args.check_csa and not check_csa(shapes[0], dtype, impl_kernel, blocks, tuple(args.csa_dkv.split(","))):
        sys.exit("CSA gradients differ from the reference")
    rows = run(shapes, dtype, iters, impl_kernel, blocks, families, tuple(args.csa_dkv.split(",")))
    print_table(rows, "V4-Flash attention (batch 1)")
    if args.sweep:
        print_table(sweep(shapes[0], dtype, iters, impl_kernel, tuple(args.csa_dkv.split(","))),
                    "backward block sizes (CSA / HCA fwd+bwd)")


def check_csa(s: Shape, dtype, impl_kernel: str, blocks, dkvs, tol: float = 2e-2) -> bool:
    """Prints max |kernel - reference| / max(1, max |reference|) of CSA's output and gradients per dkv path
    (cotangent: a random probe); True when all are within tol."""
    inputs = make_inputs(s, dtype)
    args = [inputs[a] for a in ("q", "kv", "csa_comp", "indices", "sinks")]
    probe = jax.random.normal(jax.random.key(1), args[0].shape, jnp.float32).astype(dtype)

    def run_csa(impl, dkv):
        def attend(q, kv, comp, sinks):
            return csa_attention(q, kv, comp, args[3], sinks, window=s.window, impl=impl,
                                 block_sizes=None if impl == "xla" else blocks, dkv=dkv)
        out, vjp = jax.vjp(attend, *args[:3], args[4])
        return (out, *vjp(probe))

    reference = jax.jit(lambda: run_csa("xla", "atomic"))()
    ok = True
    for dkv in dkvs:
        got = jax.jit(lambda: run_csa(impl_kernel, dkv))()
        errors = [float(jnp.max(jnp.abs(g.astype(jnp.float32) - r.astype(jnp.float32)))
                       / max(1.0, float(jnp.max(jnp.abs(r.astype(jnp.float32)))))) for g, r in zip(got, reference)]
        ok &= all(e <= tol for e in errors)
        print(f"check CSA dkv={dkv} at {s.tokens} tokens: " + ", ".join(
            f"{name} {e:.1e}" for name, e in zip(("out", "dq", "dkv", "dkv_comp", "dsinks"), errors)), flush=True)
        del got
    return ok


def profile(s: Shape, dtype, impl_kernel: str, blocks, directory: str):
    """Traces two runs of each Pallas variant's fwd+bwd (after a warm-up) with the JAX profiler."""
    inputs = make_inputs(s, dtype)
    steps = []
    for name, family, fn, arg_names, argnums in variants(s, impl_kernel, blocks, None)[:4]:
        f = jax.jit(fn if argnums is None else with_backward(fn, argnums))
        args = [inputs[a] for a in arg_names]
        jax.block_until_ready(f(*args))
        steps.append((name, f, args))
    with jax.profiler.trace(directory, create_perfetto_trace=True):
        for name, f, args in steps:
            for _ in range(2):
                with jax.profiler.TraceAnnotation(name):
                    jax.block_until_ready(f(*args))
    print(f"trace written under {directory}")


SWEEP = {"default": BlockSizes(),
         "dq 32x64": BlockSizes(block_k_dq=64),
         "dq 32x32 w8": BlockSizes(num_warps_bwd=8),
         "dq 16x32": BlockSizes(block_h_dq=16),
         "dq 32x32 w8 kv16": BlockSizes(num_warps_bwd=8, block_kv_bwd=16)}


def sweep(s: Shape, dtype, iters: int, impl_kernel: str, csa_dkv=("atomic",)):
    """fwd+bwd of the CSA (per --csa-dkv path) and HCA kernels under the backward block sizes in SWEEP."""
    inputs, flops, rows = make_inputs(s, dtype), needed_flops(s), []
    for label, blocks in SWEEP.items():
        for name, family, fn, arg_names, argnums in variants(s, impl_kernel, blocks, None, csa_dkv)[:len(csa_dkv) + 1]:
            status, seconds, nbytes = measure(with_backward(fn, argnums), [inputs[a] for a in arg_names], iters)
            tflops = 3.5 * flops[family] / seconds / 1e12 if seconds else None
            rows.append((s.tokens, f"{name} {label}", "fwd+bwd", status, seconds, tflops, nbytes))
            print(format_row(rows[-1]), flush=True)
    return rows

if __name__ == "__main__":
    main()
