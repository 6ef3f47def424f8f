"""Shared test setup: the micro config and helpers that run `train.py` / `eval.py` as subprocesses.

This file doubles as the config file of subprocess runs (`python train.py --config=tests/conftest.py`),
so in-process and subprocess tests train exactly the same micro model.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile

from configs.gemma4 import get_config as gemma4_config
from zoo.gemma4 import model_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MICRO_CONFIG = os.path.abspath(__file__)
# train.py / eval.py subprocesses share a persistent compilation cache that keeps even quick compilations,
# so each micro program is compiled once rather than once per subprocess.
SUBPROCESS_ENV = {**os.environ,
                  "JAX_COMPILATION_CACHE_DIR": os.path.join(tempfile.gettempdir(), "lc-zoo-tests-jax-cache"),
                  "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}


def all_eqns(jaxpr):
    """Every equation of `jaxpr` and of the jaxprs inside it (shard_map and scan bodies, custom_vjp rules,
    pallas_call bodies), depth first."""
    for eqn in jaxpr.eqns:
        yield eqn
        for value in eqn.params.values():
            for sub in value if isinstance(value, (tuple, list)) else (value,):
                sub = getattr(sub, "jaxpr", sub)   # a ClosedJaxpr's Jaxpr,
                sub = getattr(sub, "jaxpr", sub)   # or one inside a custom_vjp's wrapper
                if hasattr(sub, "eqns"):
                    yield from all_eqns(sub)


def get_config():
    """Tiny's features (PLE, kv sharing, sliding + full layers with different head dims) at toy size."""
    config = gemma4_config("tiny")
    config.model = model_config(
        vocab_size=256, d_model=32, attention_types=("sliding", "full", "full"), num_heads=2, num_kv_heads=1,
        head_dim=16, global_head_dim=32, sliding_window=8, mlp_dim=64, num_kv_shared_layers=1, ple_dim=8,
        max_positions=512)
    config.train.update(steps=6, batch_size=4, seq_len=32, log_every=1, eval_every=3, eval_batches=2,
                        checkpoint_every=2, keep_checkpoints=2)
    config.optimizer.warmup_steps = 2
    return config


def run_script(script: str, *args: str, timeout: float = 180) -> subprocess.CompletedProcess:
    """`python SCRIPT ARGS...` from the repository root, output captured as text."""
    return subprocess.run([sys.executable, os.path.join(ROOT, script), *args], cwd=ROOT, env=SUBPROCESS_ENV,
                          capture_output=True, text=True, timeout=timeout)


def read_metrics(workdir: str) -> list[dict]:
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def checkpoint_steps(workdir: str) -> list[int]:
    """Finished checkpoint steps (Orbax writes into a temporary folder and renames it when done)."""
    folder = os.path.join(workdir, "checkpoints")
    return sorted(int(n) for n in os.listdir(folder) if n.isdigit()) if os.path.isdir(folder) else []
