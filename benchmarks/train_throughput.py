"""Training throughput and MFU of a config on a device mesh: tokens/s and model FLOP utilisation.

    python benchmarks/train_throughput.py --config=configs/gemma4.py:1b --seq_len=4096 --batch_size=8 \\
        --mesh=data=1,fsdp=-1
    python benchmarks/train_throughput.py --smoke          # a micro config on CPU, to check the script

Model FLOPs per token = 3 x `zoo.analysis.report(config, context=seq_len)["flops_per_token_seq_mean"]`
(forward + backward; causal attention already halved by that mean over the sequence). MFU = achieved
model FLOP/s / (`--peak_flops` x devices); the default peak is an H100's dense bf16 989 TFLOP/s.
Computation runs in bf16 on float32 master weights (`train.compute_dtype="bfloat16"`).
"""
from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from layers.moe import GROUPED_MATMUL_IMPLS  # noqa: E402
from pallas_kernels.compressed import CSA_DKV  # noqa: E402


def load_config(spec: str):
    path, _, preset = spec.partition(":")
    import importlib.util
    module_spec = importlib.util.spec_from_file_location("bench_config", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.get_config(preset) if preset else module.get_config()


def smoke_config():
    from configs.gemma4 import get_config
    from zoo.gemma4 import model_config
    config = get_config("tiny")
    config.model = model_config(
        vocab_size=256, d_model=32, attention_types=("sliding", "full"), num_heads=2, num_kv_heads=1, head_dim=16,
        global_head_dim=32, sliding_window=8, mlp_dim=64, max_positions=512)
    return config


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="configs/gemma4.py:1b", help="config file and preset")
    p.add_argument("--seq_len", type=int, default=4096)
    p.add_argument("--batch_size", type=int, default=8, help="global batch (sequences per step)")
    p.add_argument("--mesh", default="data=1,fsdp=-1", help="mesh axis sizes, e.g. fsdp=2,tensor=4")
    p.add_argument("--rules", default="fsdp_tensor_expert", help="a zoo.sharding.RULES preset (zoo.sharding.DEFAULT_RULES)")
    p.add_argument("--attention_impl", default=None, help="override model.attention_impl (xla|pallas|auto)")
    p.add_argument("--remat", default=None, help="override model.remat (none|full|dots)")
    p.add_argument("--experts_matmul", default=None, choices=GROUPED_MATMUL_IMPLS,
                   help="override model.experts_matmul, the routed experts' grouped matmul")
    p.add_argument("--csa_dkv", default=None, choices=CSA_DKV,
                   help="override model.csa_dkv, CSA's Pallas backward into the selected entries")
    p.add_argument("--indexer_fused_topk", action="store_true", help="set model.indexer_fused_topk: the "
                   "Pallas indexer selects its top-k while scoring")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--peak_flops", type=float, default=989e12, help="peak FLOP/s of one device")
    p.add_argument("--smoke", action="store_true", help="micro config, seq 32, batch 4, 1+2 steps (CPU)")
    p.add_argument("--profile", default="", metavar="DIR",
                   help="after timing, trace 2 more steps into DIR and print the device ops that take the most time")
    p.add_argument("--top", type=int, default=25, help="how many ops --profile prints")
    a = p.parse_args()

    import ml_collections

    from zoo import sharding
    from zoo.analysis import report
    from zoo.train import trainer

    if a.smoke:
        config, a.seq_len, a.batch_size, a.warmup, a.steps = smoke_config(), 32, 4, 1, 2
        a.mesh, label = "data=-1", "smoke (micro gemma4)"
    else:
        config, label = load_config(a.config), a.config
    if a.attention_impl:
        config.model.attention_impl = a.attention_impl
    if a.remat:
        config.model.remat = a.remat
    if a.experts_matmul:
        config.model.experts_matmul = a.experts_matmul
    if a.csa_dkv:
        config.model.csa_dkv = a.csa_dkv
    if a.indexer_fused_topk:
        config.model.indexer_fused_topk = True
    try:
        mesh = sharding.parse_mesh(a.mesh)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    config.mesh = ml_collections.ConfigDict({axis: mesh.get(axis, 1) for axis in sharding.MESH_AXES})
    config.sharding_rules = a.rules
    config.train.update(batch_size=a.batch_size, seq_len=a.seq_len, compute_dtype="bfloat16",
                        steps=a.warmup + a.steps)

    trainer.enable_compilation_cache()   # reruns of a config on the same machine skip compiling
    started = time.perf_counter()

    def progress(what: str) -> None:
        print(f"[{time.perf_counter() - started:6.1f} s] {what}", file=sys.stderr, flush=True)

    progress(f"{label}: creating the sharded model and optimizer state")
    state = trainer.fresh_state(config)
    params, opt_state, s = state.params, state.opt_state, state.shardings
    step = trainer.make_train_step(state.graphdef, state.tx, "bfloat16", s)
    rng = np.random.default_rng(0)
    tokens = rng.integers(3, config.model.vocab_size, (a.batch_size, a.seq_len + 1), dtype=np.int32)
    inputs, targets = sharding.shard_batch(tokens[:, :-1], s.batch), sharding.shard_batch(tokens[:, 1:], s.batch)

    progress("compiling and running the warm-up steps")
    t0 = time.perf_counter()
    for _ in range(a.warmup):
        params, opt_state, out = step(params, opt_state, inputs, targets)
        jax.block_until_ready(out)
        progress("warm-up step done")
    compile_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(a.steps):
        params, opt_state, out = step(params, opt_state, inputs, targets)
    jax.block_until_ready(out)
    step_s = (time.perf_counter() - t0) / a.steps

    rep = report(config, context=a.seq_len)
    flops_per_token = 3 * rep["flops_per_token_seq_mean"]
    devices = s.mesh.size
    tokens_per_s = a.batch_size * a.seq_len / step_s
    mfu = tokens_per_s * flops_per_token / (a.peak_flops * devices)
    rows = [("config", label), ("params", f"{rep['params_total'] / 1e6:,.1f} M"),
            ("devices", f"{devices} x {jax.devices()[0].device_kind}"), ("mesh", str(dict(s.mesh.shape))),
            ("batch x seq", f"{a.batch_size} x {a.seq_len}"),
            ("attention / remat", f"{config.model.attention_impl} / {config.model.get('remat', 'none')}"),
            ("warmup (incl. compile)", f"{compile_s:.2f} s"),
            ("step time", f"{step_s * 1e3:.1f} ms"), ("tokens/s", f"{tokens_per_s:,.0f}"),
            ("tokens/s/device", f"{tokens_per_s / devices:,.0f}"),
            ("model FLOPs/token (fwd+bwd)", f"{flops_per_token / 1e6:,.1f} MFLOP"),
            ("peak FLOP/s/device", f"{a.peak_flops / 1e12:.0f} T"), ("MFU", f"{100 * mfu:.2f} %"),
            ("last loss", f"{float(out['loss']):.4f}")]
    stats = jax.local_devices()[0].memory_stats() or {}
    if "peak_bytes_in_use" in stats:
        rows.append(("peak memory (device 0)", f"{stats['peak_bytes_in_use'] / 2**30:.1f} GiB"))
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}")
    if a.profile:
        with jax.profiler.trace(a.profile, create_perfetto_trace=True):
            for _ in range(2):
                params, opt_state, out = step(params, opt_state, inputs, targets)
            jax.block_until_ready(out)
        print_device_ops(a.profile, steps=2, top=a.top)


def print_device_ops(trace_dir: str, *, steps: int, top: int) -> None:
    """The device ops of the newest perfetto trace under `trace_dir`, summed by name: ms per step, share
    of all device time, calls per step; the `top` largest."""
    import collections
    import glob
    import gzip
    import json
    paths = sorted(glob.glob(os.path.join(trace_dir, "**", "perfetto_trace.json.gz"), recursive=True),
                   key=os.path.getmtime)
    if not paths:
        raise SystemExit(f"error: --profile: no perfetto_trace.json.gz under {trace_dir}")
    with gzip.open(paths[-1]) as f:
        events = json.load(f)
    events = events["traceEvents"] if isinstance(events, dict) else events
    process = {e["pid"]: e["args"]["name"] for e in events if e.get("ph") == "M" and e.get("name") == "process_name"}
    device_pids = {pid for pid, name in process.items() if "/device:" in name}
    total_us, calls = collections.Counter(), collections.Counter()
    for e in events:
        if e.get("ph") == "X" and e.get("pid") in device_pids:
            total_us[e["name"]] += e.get("dur", 0)
            calls[e["name"]] += 1
    all_us = sum(total_us.values())
    if not all_us:
        raise SystemExit(f"error: --profile: the trace {paths[-1]} holds no device events (a CPU run has "
                         "none: --profile reads GPU and TPU traces)")
    print(f"\ndevice time per step: {all_us / steps / 1e3:.1f} ms (summed over streams; {paths[-1]})")
    print(f"{'ms/step':>9}  {'share':>6}  {'calls':>5}  op")
    for name, us in total_us.most_common(top):
        print(f"{us / steps / 1e3:9.2f}  {100 * us / all_us:5.1f}%  {calls[name] // steps:5d}  {name[:100]}")


if __name__ == "__main__":
    main()
