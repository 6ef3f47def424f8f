"""Multi-process (multi-host) runs: JAX's distributed runtime started from flags or the environment, and
which process writes files.

train.py, eval.py and `python -m zoo.convert` take the same flags (README "Sharding"): `--distributed`,
`--coordinator_address`, `--num_processes`, `--process_id`. `jax.distributed.initialize` runs only when
one of them is given or JAX_COORDINATOR_ADDRESS is set, before anything touches a device; arguments not
given fall back to JAX's environment variables (JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES,
JAX_PROCESS_ID) and cluster auto-detection (SLURM, Open MPI, Cloud TPU, ...). Every process then runs
the same program (collectives need them all) and takes part in Orbax checkpoint saves; only the primary
process writes other files and prints progress.
"""
from __future__ import annotations

import os
from collections.abc import Callable

import jax

ENV_COORDINATOR = "JAX_COORDINATOR_ADDRESS"
# (name, type, help): one table for absl (train.py, eval.py) and argparse (python -m zoo.convert).
FLAGS = (
    ("distributed", bool, "call jax.distributed.initialize() with the cluster auto-detected (SLURM, Cloud TPU, "
     "...) or from JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID"),
    ("coordinator_address", str, "host:port of process 0 (implies --distributed)"),
    ("num_processes", int, "number of processes (hosts) in the job (implies --distributed)"),
    ("process_id", int, "this process's index in [0, num_processes) (implies --distributed)"),
)


class InitializationError(RuntimeError):
    """`jax.distributed.initialize` failed; the message is one line."""


def define_flags(flag_values=None) -> Callable[[], dict]:
    """Defines the FLAGS on an absl FlagValues (default `absl.flags.FLAGS`); returns a function giving
    their parsed values as keyword arguments of `maybe_initialize_distributed`."""
    from absl import flags

    define = {bool: flags.DEFINE_bool, str: flags.DEFINE_string, int: flags.DEFINE_integer}
    fv = flags.FLAGS if flag_values is None else flag_values
    holders = {name: define[kind](name, False if kind is bool else None, text, flag_values=fv)
               for name, kind, text in FLAGS}
    return lambda: {name: holder.value for name, holder in holders.items()}


def add_arguments(parser) -> None:
    """Adds the FLAGS to an argparse parser; `maybe_initialize_distributed(**arguments(args))` uses them."""
    group = parser.add_argument_group("multi-process runs (README \"Sharding\")")
    for name, kind, text in FLAGS:
        if kind is bool:
            group.add_argument(f"--{name}", action="store_true", help=text)
        else:
            group.add_argument(f"--{name}", type=kind, default=None, help=text)


def arguments(args) -> dict:
    """The FLAGS' values of an argparse namespace, as keyword arguments of `maybe_initialize_distributed`."""
    return {name: getattr(args, name) for name, _, _ in FLAGS}


def maybe_initialize_distributed(*, distributed: bool = False, coordinator_address: str | None = None,
                                 num_processes: int | None = None, process_id: int | None = None) -> bool:
    """Calls `jax.distributed.initialize` when asked for (any flag given, or JAX_COORDINATOR_ADDRESS set),
    passing only the arguments given; returns whether it did. Call it before anything touches a device.
    Raises InitializationError (one line) when initialization fails."""
    kwargs = {k: v for k, v in (("coordinator_address", coordinator_address), ("num_processes", num_processes),
                                ("process_id", process_id)) if v is not None}
    if not (distributed or kwargs or os.environ.get(ENV_COORDINATOR)):
        return False
    try:
        jax.distributed.initialize(**kwargs)
    except Exception as e:  # noqa: BLE001 - report the cluster problem on one line
        args = ", ".join(f"{k}={v!r}" for k, v in kwargs.items())
        raise InitializationError(" ".join(f"jax.distributed.initialize({args}) failed: {e}".split())) from e
    return True


def is_primary() -> bool:
    """Whether this process writes files other than Orbax checkpoints (config.json, metrics, eval
    reports, Hugging Face checkpoints) and prints progress: process 0 only."""
    return jax.process_index() == 0
