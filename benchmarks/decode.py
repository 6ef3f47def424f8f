"""Decode speed of a config against transformers on the same device: prefill and decode tokens/s, ms per
decode step, peak memory and the fraction of the measured copy bandwidth a decode step reaches.

    python benchmarks/decode.py --config=configs/gemma4.py:1b --contexts=4096,32768 --batch=1,32 --out=d.json
    python benchmarks/decode.py --config=configs/deepseek_v4.py:small --contexts=4096 --batch=1,32
    python benchmarks/decode.py --smoke             # the config's tiny preset, tiny shapes, on CPU
    python benchmarks/decode.py --config=configs/deepseek_v4.py:small --checkpoint=runs/dsv4_small \
        --speculative --contexts=512 --batch=1 --new=256          # MTP speculation against plain greedy

Per (context, batch) row, random-init weights (--dtype, bf16 by default), a random prompt of `context`
tokens per row:
  zoo   prefill: `inference.prefill_program` (chunked, `--chunk` tokens per step); `--fill=direct` instead
        sets the cache lengths to the context (contents left zero: a decode step reads the same bytes),
        for contexts whose prefill would take too long. decode: `inference.decode_program`, `--new`
        tokens greedy in one `lax.while_loop` over the donated cache (no host callback, no per-step
        host round trip), compiled ahead of time once per shape. ms/step = decode time / (new - 1)
        (the first token comes from the prefill's logits).
  hf    the same weights written by `zoo.to_hf` and loaded by transformers (torch, same device, same
        dtype, its own cache): `generate(do_sample=False)` timed for 1 and for `--new` new tokens;
        prefill = the 1-token call, ms/step = the difference / (new - 1).
bandwidth fraction = (weight bytes read per step + cache bytes read per step) / step time / copy
bandwidth, where the copy bandwidth is 2 x bytes / time of a large elementwise device-to-device pass
(read + write) measured in the same run; weight bytes count every matmul weight a step multiplies (the
output head, not the embedding lookup; of MoE experts the expected number a batch touches under uniform
routing: E (1 - (1 - k / E)^B)); cache bytes are `zoo.analysis.kv_cache`'s arithmetic figure at the
context (what attention must read; with `--cache_dtype=float8_e4m3fn` the native figure). Peak memory: zoo, XLA's figure for the larger of the two programs
(arguments + outputs + temporaries - donated aliases); hf, torch's max_memory_allocated (GPU only).

--speculative (a config with MTP modules; `--checkpoint` loads trained weights, as random ones rarely
agree): per row, greedy `zoo.generate` against `zoo.speculative.generate_mtp` on the same prompts, each
compiled first and timed whole (prefill included: keep the context short against --new), with the
acceptance rate, tokens per main-model call and the speed-up; the outputs must be identical.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks.train_throughput import load_config  # noqa: E402   (config file path[:preset])


def copy_bandwidth(nbytes: int, iters: int = 5) -> float:
    """Bytes/s of an elementwise pass over `nbytes` (each byte read once and written once)."""
    x = jnp.zeros((nbytes // 4,), jnp.uint32)
    flip = jax.jit(lambda x: x ^ jnp.uint32(1))
    jax.block_until_ready(flip(x))
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        jax.block_until_ready(flip(x))
        times.append(time.perf_counter() - start)
    return 2 * (nbytes // 4) * 4 / statistics.median(times)


def weight_bytes_per_step(model_cfg, batch: int, itemsize: int) -> int:
    """Matmul weights one decode step reads (see the module docstring)."""
    from zoo.analysis import count_params
    counts = count_params(model_cfg)
    active = counts["params_matmul_active"]
    E, k = model_cfg.get("num_experts", 0), model_cfg.get("top_k", 0)
    inactive = counts["params_total"] - counts["params_active"]
    if E and k and E > k and inactive:
        experts_total = inactive * E // (E - k)
        active += experts_total * (1 - (1 - k / E) ** batch) - experts_total * k / E
    return int(active * itemsize)


def program_peak(compiled) -> int | None:
    try:
        m = compiled.memory_analysis()
        return int(m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes - m.alias_size_in_bytes)
    except Exception:   # backends without a memory analysis
        return None


def run_zoo(model, context: int, batch: int, new: int, chunk: int, fill: str, reps: int, seed: int,
            cache_dtype=None) -> dict:
    from flax import nnx

    from zoo import inference
    graphdef, state = nnx.split(model)
    V = model.vocab_size
    prompt_BT = jnp.asarray(np.random.default_rng(seed).integers(1, V, (batch, context)), jnp.int32)
    lengths_B = jnp.full((batch,), context, jnp.int32)
    max_len = context + new
    empty = jax.jit(lambda: inference.init_cache(model, batch_size=batch, max_len=max_len, dtype=cache_dtype))
    key = jax.random.key(seed)
    chunk = min(chunk, context)
    cache = empty()
    prefill = inference.prefill_program.lower(graphdef, state, cache, prompt_BT, lengths_B, chunk=chunk).compile()
    logits_BV = jnp.zeros((batch, V), jnp.float32)
    decode = inference.decode_program.lower(graphdef, state, cache, logits_BV, key, max_new_tokens=new).compile()
    prefill_s, decode_s = [], []
    for _ in range(reps + 1):   # the first round warms up
        cache = jax.block_until_ready(empty())
        start = time.perf_counter()
        if fill == "prefill":
            logits_BV, cache = jax.block_until_ready(prefill(state, cache, prompt_BT, lengths_B))
        else:
            cache = dict(cache, lengths_B=lengths_B)
            logits_BV = jax.random.normal(key, (batch, V), jnp.float32)
        mid = time.perf_counter()
        tokens_BN, cache = jax.block_until_ready(decode(state, cache, logits_BV, key))
        end = time.perf_counter()
        prefill_s.append(mid - start)
        decode_s.append(end - mid)
        del cache
    prefill_t, decode_t = statistics.median(prefill_s[1:]), statistics.median(decode_s[1:])
    step = decode_t / (new - 1)
    peaks = [p for p in (program_peak(prefill), program_peak(decode)) if p is not None]
    stats = jax.devices()[0].memory_stats() or {}
    return {"prefill_tokens_per_s": batch * context / prefill_t if fill == "prefill" else None,
            "decode_tokens_per_s": batch / step, "ms_per_step": 1e3 * step,
            "peak_bytes": max(peaks) if peaks else None, "device_peak_bytes": stats.get("peak_bytes_in_use"),
            "tokens": np.asarray(tokens_BN)}


def run_speculative(model, context: int, batch: int, new: int, chunk: int, reps: int, seed: int,
                    cache_dtype=None) -> dict:
    """Plain greedy against MTP speculation, whole generations (prefill included), medians of `reps`."""
    from zoo import inference, speculative
    prompt_BT = np.random.default_rng(seed).integers(1, model.vocab_size, (batch, context))
    common = dict(max_new_tokens=new, prefill_chunk=chunk, cache_dtype=cache_dtype)
    plain = lambda: inference.generate(model, prompt_BT, **common)
    spec = lambda: speculative.generate_mtp(model, prompt_BT, return_stats=True, **common)

    def timed(fn):
        out = jax.block_until_ready(fn())   # compiles
        times = []
        for _ in range(reps):
            start = time.perf_counter()
            out = jax.block_until_ready(fn())
            times.append(time.perf_counter() - start)
        return statistics.median(times), out

    plain_s, want = timed(plain)
    spec_s, (got, stats) = timed(spec)
    return {"plain_s": plain_s, "speculative_s": spec_s, "speedup": plain_s / spec_s,
            "identical": bool(np.array_equal(np.asarray(got), np.asarray(want))), **stats}


def run_hf(path: str, context: int, batch: int, new: int, dtype: str, seed: int) -> dict:
    import torch
    import transformers
    from transformers import AutoModelForCausalLM
    transformers.utils.logging.disable_progress_bar()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        torch.cuda.empty_cache()   # the previous row's model is gone
    model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype)).to(device).eval()
    model.generation_config.eos_token_id = None
    V = model.config.vocab_size
    ids = torch.from_numpy(np.random.default_rng(seed).integers(1, V, (batch, context))).long().to(device)

    def timed(n: int) -> tuple[float, torch.Tensor]:
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        with torch.no_grad():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                                 do_sample=False, pad_token_id=0)
        if device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start, out

    timed(2)   # warm-up
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    one, _ = timed(1)
    full, out = timed(new)
    step = max(full - one, 1e-9) / (new - 1)
    peak = torch.cuda.max_memory_allocated() if device == "cuda" else None
    return {"prefill_tokens_per_s": batch * context / one, "decode_tokens_per_s": batch / step,
            "ms_per_step": 1e3 * step, "peak_bytes": peak, "tokens": out[:, context:].cpu().numpy()}


def _fmt(x, spec=".1f"):
    width = int(spec.split(".")[0] or 0)
    return "-".rjust(width) if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="configs/gemma4.py:1b", help="config file and preset")
    p.add_argument("--contexts", default="4096,32768", help="comma-separated context lengths")
    p.add_argument("--batch", default="1,32", help="comma-separated batch sizes")
    p.add_argument("--new", type=int, default=128, help="new tokens per decode (>= 2)")
    p.add_argument("--chunk", type=int, default=1024, help="prefill chunk")
    p.add_argument("--fill", choices=("prefill", "direct"), default="prefill",
                   help="fill the context by a real prefill, or set the cache lengths directly")
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    p.add_argument("--cache_dtype", default=None, help="cache dtype (default --dtype; float8_e4m3fn: DeepSeek-V4 "
                   "native fp8 cache)")
    p.add_argument("--speculative", action="store_true", help="time MTP speculation against plain greedy")
    p.add_argument("--checkpoint", default="", help="load weights from this zoo checkpoint or workdir")
    p.add_argument("--attention_impl", default=None, help="override model.attention_impl (xla|pallas|auto)")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--no_hf", action="store_true", help="skip the transformers side")
    p.add_argument("--copy_mib", type=int, default=2048, help="size of the bandwidth-measuring pass")
    p.add_argument("--smoke", action="store_true", help="the config's tiny preset at tiny shapes on CPU")
    p.add_argument("--out", default="", help="write the rows as JSON here")
    a = p.parse_args()

    import zoo
    from zoo import analysis, models
    path = a.config.partition(":")[0]
    if a.smoke:
        a.config, a.contexts, a.batch, a.new, a.chunk, a.reps = f"{path}:tiny", "40", "1,2", 6, 16, 1
        a.dtype, a.copy_mib = "float32", 64
    config = load_config(a.config)
    cfg = config.model
    if "mtp_depth" in cfg and not a.speculative:
        cfg.mtp_depth = 0      # plain decoding; transformers has no MTP module either
    if a.attention_impl:
        cfg.attention_impl = a.attention_impl
    cfg.dtype = a.dtype
    if a.new < 2:
        raise SystemExit("error: --new must be >= 2")
    contexts = [int(c) for c in a.contexts.split(",")]
    batches = [int(b) for b in a.batch.split(",")]
    itemsize = jnp.dtype(a.dtype).itemsize
    rows = []
    if a.checkpoint:
        model = zoo.load(a.checkpoint, dtype=a.dtype)
        cfg = model.config
        if cfg.get("mtp_depth", 0) and not a.speculative:
            raise SystemExit("error: plain decoding of a checkpoint with MTP modules: pass --speculative")
    else:
        model = models.cast(zoo.build(cfg, seed=0), a.dtype)
    if a.speculative:
        for context in contexts:
            for batch in batches:
                r = run_speculative(model, context, batch, a.new, a.chunk, a.reps, seed=context + batch,
                                    cache_dtype=a.cache_dtype)
                r.update(config=a.config, checkpoint=a.checkpoint, device=str(jax.devices()[0].device_kind),
                         context=context, batch=batch, new_tokens=a.new)
                print(f"context {context} batch {batch}: plain {r['plain_s'] * 1e3:.1f} ms, speculative "
                      f"{r['speculative_s'] * 1e3:.1f} ms, speed-up {r['speedup']:.2f}x, acceptance "
                      f"{r['acceptance_rate']:.2f}, {r['tokens_per_main_call']:.2f} tokens per main call "
                      f"({r['reruns']} re-runs in {r['steps']} steps), identical output: {r['identical']}",
                      flush=True)
                rows.append(r)
        if a.out:
            with open(a.out, "w") as f:
                json.dump(rows, f, indent=2)
        return
    bandwidth = copy_bandwidth(a.copy_mib << 20)
    device = str(jax.devices()[0].device_kind)
    print(f"# {a.config} on {device}, {a.dtype}, copy bandwidth {bandwidth / 1e9:.0f} GB/s, fill={a.fill}, "
          f"{a.new} new tokens")
    hf_dir = None
    if not a.no_hf:
        hf_dir = tempfile.mkdtemp(prefix="decode_bench_hf_")
        zoo.to_hf(model, os.path.join(hf_dir, "model"))
    header = (f"{'context':>8} {'batch':>5} | {'prefill tok/s':>13} {'decode tok/s':>12} {'ms/step':>8} "
              f"{'peak GiB':>8} {'bw frac':>7} | {'hf prefill':>10} {'hf decode':>10} {'hf ms':>8} "
              f"{'hf GiB':>7} | {'x hf':>6}")
    print(header)
    print("-" * len(header))
    for context in contexts:
        for batch in batches:
            row = {"config": a.config, "device": device, "dtype": a.dtype, "context": context, "batch": batch,
                   "new_tokens": a.new, "fill": a.fill, "cache_dtype": a.cache_dtype or a.dtype,
                   "copy_bandwidth_bytes_per_s": bandwidth}
            weights = weight_bytes_per_step(cfg, batch, itemsize)
            kv = analysis.kv_cache(cfg, context, a.dtype, batch)
            cache = kv["kv_cache_bytes_native" if a.cache_dtype == "float8_e4m3fn" else "kv_cache_bytes"]
            row.update(weight_bytes_per_step=weights, cache_bytes_per_step=cache)
            z = run_zoo(model, context, batch, a.new, a.chunk, a.fill, a.reps, seed=context + batch,
                        cache_dtype=a.cache_dtype)
            zoo_tokens = z.pop("tokens")
            row["zoo"] = z
            row["bandwidth_fraction"] = (weights + cache) / (z["ms_per_step"] / 1e3) / bandwidth
            if hf_dir is not None:
                try:
                    h = run_hf(os.path.join(hf_dir, "model"), context, batch, a.new, a.dtype, seed=context + batch)
                    hf_tokens = h.pop("tokens")
                    row["hf"] = h
                    row["decode_speedup_vs_hf"] = z["decode_tokens_per_s"] / h["decode_tokens_per_s"]
                    if a.fill == "prefill":   # same prompt, same weights: greedy tokens should mostly agree
                        row["first_tokens_agree"] = float(np.mean(hf_tokens[:, 0] == zoo_tokens[:, 0]))
                except Exception as e:   # e.g. out of memory at a long context: the row says so
                    row["hf"] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"}
            rows.append(row)
            h = row.get("hf", {})
            gib = lambda b: None if b is None else b / 2**30
            print(f"{context:>8} {batch:>5} | {_fmt(z['prefill_tokens_per_s'], '13.0f')} "
                  f"{_fmt(z['decode_tokens_per_s'], '12.1f')} {_fmt(z['ms_per_step'], '8.2f')} "
                  f"{_fmt(gib(z['peak_bytes']), '8.2f')} {_fmt(row['bandwidth_fraction'], '7.2f')} | "
                  f"{_fmt(h.get('prefill_tokens_per_s'), '10.0f')} {_fmt(h.get('decode_tokens_per_s'), '10.1f')} "
                  f"{_fmt(h.get('ms_per_step'), '8.2f')} {_fmt(gib(h.get('peak_bytes')), '7.2f')} | "
                  f"{_fmt(row.get('decode_speedup_vs_hf'), '6.2f')}" + (f"  hf: {h['error']}" if "error" in h else ""),
                  flush=True)
    if a.out:
        with open(a.out, "w") as f:
            json.dump(rows, f, indent=2)
        print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
