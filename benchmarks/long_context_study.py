"""The long-context study (docs/long_context.md): every family's `small` preset trained the same way, then
swept on NIAH and MQAR beyond its training length, beside its cache bytes at 128K and decode ms per token.

    python benchmarks/long_context_study.py --out=runs/study            # one GPU: train, sweep, measure
    python benchmarks/long_context_study.py --smoke --out=/tmp/study    # tiny presets, a few steps, CPU

Each family is trained by `train.py` (same data mix, steps, batch and sequence length for all), then all
of them are swept together by `eval.py --tasks` (one line per model on the plots), then each model's
greedy decode is timed at the training length. Prints one markdown table and writes `study.json`.
A family whose workdir already holds a finished run is not trained again (rerun after an interruption).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np

FAMILIES = ("gemma4", "laguna", "zaya1", "deepseek_v4")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="folder for the workdirs, the sweep and study.json")
    p.add_argument("--families", default=",".join(FAMILIES))
    p.add_argument("--preset", default="small")
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--seq_len", type=int, default=1024)
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--task_mix_rate", type=float, default=0.5, help="data.task_mix_rate of every run")
    p.add_argument("--tasks", default="niah_single,mqar")
    p.add_argument("--lengths", default="1024,2048,4096")
    p.add_argument("--depths", default="0,0.5,1")
    p.add_argument("--examples", type=int, default=8)
    p.add_argument("--analysis_context", type=int, default=131_072, help="context of the cache-bytes column")
    p.add_argument("--smoke", action="store_true", help="tiny presets, a few steps, short lengths (CPU)")
    p.add_argument("--skip_train", action="store_true", help="sweep and measure existing workdirs only")
    p.add_argument("--train_only", action="store_true", help="train (or finish training), then stop")
    p.add_argument("--parallel", type=int, default=1, help="runs sharing the device at once")
    p.add_argument("--attention_impl", default=None, help="override model.attention_impl for the sweep and "
                   "the decode timing (training keeps the preset's)")
    args = p.parse_args(argv)
    if args.smoke:
        args.preset, args.steps, args.seq_len, args.batch_size = "tiny", 4, 512, 1
        args.lengths, args.depths, args.examples = "512,1024", "0.5", 2
    return args


def run_all(cmds: list[list[str]], parallel: int) -> list[float]:
    """Runs commands from the repository root, `parallel` at a time (sharing the device: JAX then allocates
    on demand), echoing each; returns their wall times in seconds."""
    env = dict(os.environ, XLA_PYTHON_CLIENT_PREALLOCATE="false") if parallel > 1 else None
    times, running, todo = [0.0] * len(cmds), {}, list(enumerate(cmds))
    while todo or running:
        while todo and len(running) < parallel:
            i, cmd = todo.pop(0)
            print("+", " ".join(cmd), flush=True)
            running[i] = (subprocess.Popen(cmd, cwd=ROOT, env=env), time.perf_counter())
        time.sleep(0.5)
        for i, (proc, start) in list(running.items()):
            if proc.poll() is not None:
                del running[i]
                if proc.returncode:
                    for other, _ in running.values():
                        other.kill()
                    raise SystemExit(f"error: {' '.join(cmds[i][:3])} failed (its message is above)")
                times[i] = time.perf_counter() - start
    return times


def finished(args, workdir: str) -> bool:
    metrics = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(metrics):
        return False
    with open(metrics) as f:
        return any(json.loads(line).get("step") == args.steps for line in f if line.strip())


def train_command(args, family: str, workdir: str, compute_dtype: str) -> list[str]:
    """train.py for one family's preset into `workdir` (checkpoints every 100 steps: a rerun resumes)."""
    return ([sys.executable, "train.py", f"--config=configs/{family}.py:{args.preset}", f"--workdir={workdir}",
                f"--config.train.steps={args.steps}", f"--config.train.seq_len={args.seq_len}",
                f"--config.train.batch_size={args.batch_size}", f"--config.train.eval_every={args.steps}",
                f"--config.train.checkpoint_every={min(100, args.steps)}", f"--config.train.log_every={max(1, args.steps // 10)}",
                f"--config.train.compute_dtype={compute_dtype}", f"--config.data.task_mix_rate={args.task_mix_rate}",
                f"--config.data.task_names={args.tasks}"])


def last_metrics(workdir: str) -> dict:
    """The last logged validation figures of a run."""
    out = {}
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        for line in f:
            row = json.loads(line)
            out.update({k: v for k, v in row.items() if k.startswith("val_") or k == "step"})
    return out


def measure(workdir: str, args, dtype: str) -> dict:
    """Parameters, cache bytes at the analysis context (allocated, via eval_shape) and greedy decode ms per
    token at the training length, batch 1."""
    import jax
    import jax.numpy as jnp

    import zoo
    from zoo import analysis, checkpoints, inference

    config = checkpoints.read_config(workdir)
    spec = jax.eval_shape(lambda: inference.init_cache(config.model, batch_size=1, max_len=args.analysis_context,
                                                       dtype="bfloat16"))
    parts = inference.cache_bytes_by_part(spec)
    model = zoo.load(workdir, dtype=dtype, attention_impl=args.attention_impl)
    prompt_BT = jnp.asarray(np.random.default_rng(0).integers(0, 256, (1, args.seq_len)), jnp.int32)
    times = {}
    for new in (8, 72):   # the difference removes prefill and compilation-free overheads
        zoo.generate(model, prompt_BT, max_new_tokens=new).block_until_ready()   # compile
        start = time.perf_counter()
        zoo.generate(model, prompt_BT, max_new_tokens=new).block_until_ready()
        times[new] = time.perf_counter() - start
    return {"params": int(analysis.count_params(config.model)["params_total"]), "cache_kv_bytes": parts["kv"],
            "cache_state_bytes": parts["state"], "decode_ms_per_token": 1e3 * (times[72] - times[8]) / 64}


def main(argv=None) -> None:
    args = parse_args(argv)
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")   # this process measures after the runs
    dtype = "float32" if args.smoke else "bfloat16"
    families = [f.strip() for f in args.families.split(",") if f.strip()]
    unknown = sorted(set(families) - set(FAMILIES))
    if unknown:
        raise SystemExit(f"error: unknown families {unknown}; choose from {', '.join(FAMILIES)}")
    os.makedirs(args.out, exist_ok=True)
    workdirs = {f: os.path.join(os.path.abspath(args.out), f) for f in families}
    train_s = {}
    todo = [] if args.skip_train else [f for f in families if not finished(args, workdirs[f])]
    times = run_all([train_command(args, f, workdirs[f], dtype) for f in todo], args.parallel)
    train_s.update(zip(todo, times))
    if args.train_only:
        return
    # Each model sweeps alone (in parallel), then one sweep over all of them finds every cell done and
    # draws the shared plots.
    sweep_dir = os.path.join(os.path.abspath(args.out), "sweep")
    sweep = lambda paths, out: [sys.executable, "eval.py", f"--workdir={paths[0]}", f"--workdirs={','.join(paths[1:])}",
                                f"--tasks={args.tasks}", f"--lengths={args.lengths}", f"--depths={args.depths}",
                                f"--examples={args.examples}", f"--batch_size={args.examples}", f"--dtype={dtype}",
                                f"--longctx_dir={out}"] + (
                                    [f"--attention_impl={args.attention_impl}"] if args.attention_impl else [])
    start = time.perf_counter()
    run_all([sweep([workdirs[f]], f"{sweep_dir}_{f}") for f in families], args.parallel)
    os.makedirs(sweep_dir, exist_ok=True)
    with open(os.path.join(sweep_dir, "cells.jsonl"), "w") as out:
        for f in families:
            with open(os.path.join(f"{sweep_dir}_{f}", "cells.jsonl")) as cells:
                out.write(cells.read())
    run_all([sweep([workdirs[f] for f in families], sweep_dir)], 1)
    sweep_s = time.perf_counter() - start
    with open(os.path.join(sweep_dir, "results.json")) as f:
        cells = json.load(f)["cells"]
    lengths = [int(n) for n in args.lengths.split(",")]
    tasks = args.tasks.split(",")
    rows = []
    for family in families:
        row = {"family": family, "train_s": train_s.get(family), "parallel": args.parallel, **last_metrics(workdirs[family]),
               **measure(workdirs[family], args, dtype)}
        for task in tasks:
            for n in lengths:
                mine = [c for c in cells if c["model"] == family and c["task"] == task and c["length"] == n]
                score = "string_match_all" if mine and mine[0]["string_match_all"] is not None else "exact_match"
                row[f"{task}@{n}"] = float(np.mean([c[score] for c in mine]))
        rows.append(row)
    settings = {k: v for k, v in vars(args).items()}
    import jax

    settings.update(attention_impl=args.attention_impl or "preset", device=str(jax.devices()[0].device_kind), dtype=dtype, sweep_s=sweep_s)
    with open(os.path.join(args.out, "study.json"), "w") as f:
        json.dump({"settings": settings, "rows": rows}, f, indent=1)
    header = (["family", "params", "train s", "val bits/byte"] + [f"{t} @{n}" for t in tasks for n in lengths]
              + [f"cache KiB/token @{args.analysis_context // 1024}K", "decode ms/token"])
    print("| " + " | ".join(header) + " |\n|" + "---|" * len(header))
    for r in rows:
        cells_out = [r["family"], f"{r['params'] / 1e6:.1f} M",
                     "-" if r["train_s"] is None else f"{r['train_s']:.0f}", f"{r.get('val_bits_per_byte', float('nan')):.3f}"]
        cells_out += [f"{r[f'{t}@{n}']:.2f}" for t in tasks for n in lengths]
        cells_out += [f"{(r['cache_kv_bytes'] + r['cache_state_bytes']) / args.analysis_context / 1024:.2f}",
                      f"{r['decode_ms_per_token']:.2f}"]
        print("| " + " | ".join(cells_out) + " |")
    print(f"sweep {sweep_s:.0f} s; wrote {args.out}/study.json and {sweep_dir}/ (plots)")


if __name__ == "__main__":
    main()
