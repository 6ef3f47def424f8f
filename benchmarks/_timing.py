"""The benchmarks' one timer: median wall time of a JAX call, measured after a warm-up call."""
from __future__ import annotations

import statistics
import time

import jax


def median_seconds(fn, args, iters: int) -> float:
    """Median over `iters` calls of `fn(*args)`, each waited on, after one untimed call (compilation)."""
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return statistics.median(times)
