"""Trains a decoder from a config file; rerunning the same command resumes from the latest checkpoint.

    python train.py                                    # tiny Gemma-4 on the standard library's sources
    python train.py --config=configs/gemma4.py:small --workdir=runs/small --config.train.steps=2000

    python train.py --init_from=converted/ --workdir=runs/finetune    # fine-tune a converted checkpoint

Writes WORKDIR/config.json, WORKDIR/metrics.jsonl, TensorBoard event files and Orbax checkpoints under
WORKDIR/checkpoints/. SIGTERM or Ctrl-C finishes the current step, saves and exits. Bad input, an
unreadable source or a failed write ends with one line on stderr naming the file or flag at fault.
"""
from __future__ import annotations

import os
import signal
import sys


def _interrupted(signum, frame):
    """Ctrl-C during start-up (imports, flag parsing): one line, status 130."""
    print("error: interrupted before training started; nothing was saved", file=sys.stderr, flush=True)
    os._exit(130)


signal.signal(signal.SIGINT, _interrupted)   # first thing: the imports below take seconds

import re  # noqa: E402
import warnings  # noqa: E402

from absl import app, flags, logging
from ml_collections import config_flags

from zoo import distributed

ROOT = os.path.dirname(os.path.abspath(__file__))


def fail(message) -> None:
    """Ends the program with one line on stderr."""
    print(f"error: {' '.join(str(message).split())}", file=sys.stderr)
    sys.exit(1)


def describe_config_error(error: Exception) -> str:
    """One line for a config-flag failure: config_flags embeds the config file's whole traceback, and
    reports an unknown override key as a KeyError/AttributeError naming only the key's last part."""
    text = str(error)
    if isinstance(error, (AttributeError, KeyError)):
        guess = re.search(r'Did you mean "(\w+)" instead of "(\w+)"', text)
        key = guess.group(2) if guess else re.search(r"(\w+)", text).group(1)
        override = [a for a in sys.argv[1:] if a.startswith("--config.")
                    and key in a.split("=", 1)[0].split(".")]
        return (f"unknown config key {key!r} in {override[0] if override else 'an override'}"
                + (f" (did you mean {guess.group(1)!r}?)" if guess else ""))
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if "Traceback (most recent call last)" in text:
        return f"{lines[0].split(': ')[0]}: {lines[-1]}"
    return lines[-1] if isinstance(error, OSError) else " ".join(lines)


try:   # without --config on the command line the default is parsed right here, overrides included
    _CONFIG = config_flags.DEFINE_config_file(
        "config", default=os.path.join(ROOT, "configs", "gemma4.py") + ":tiny",
        help_string="config file and preset, e.g. configs/gemma4.py:tiny; override keys with --config.KEY=VALUE")
except Exception as e:  # noqa: BLE001 - any failure here is a bad config or override
    fail(describe_config_error(e))
_WORKDIR = flags.DEFINE_string("workdir", "./runs/default", "run directory: config, metrics, checkpoints")
_INIT_FROM = flags.DEFINE_string(
    "init_from", None, "start a new run from the parameters of this zoo checkpoint or training workdir (e.g. "
    "from `python -m zoo.convert hf-to-zoo`), with a fresh optimizer; its model config is used, except keys "
    "given as --config.model.KEY=VALUE")
# Multi-host (README "Sharding"): --distributed, --coordinator_address, --num_processes, --process_id.
_DISTRIBUTED_FLAGS = distributed.define_flags()


def maybe_initialize_distributed() -> None:
    """`jax.distributed.initialize` when a flag above is given or JAX_COORDINATOR_ADDRESS is set
    (`zoo.distributed`); before anything touches a device."""
    try:
        distributed.maybe_initialize_distributed(**_DISTRIBUTED_FLAGS())
    except distributed.InitializationError as e:
        fail(e)


def parse_flags(argv):
    """absl flag parsing with a one-line error (unknown preset, unknown override key, bad value)."""
    try:
        return flags.FLAGS(argv)
    except Exception as e:  # noqa: BLE001 - config files and overrides fail in many ways
        fail(describe_config_error(e))


def init_from_config(config, init_from: str):
    """`config` with the model section of the checkpoint at `init_from`, except the keys the command line
    overrides (`--config.model.KEY=VALUE`) and the preset's parameter dtype (master weights)."""
    from zoo import checkpoints   # lazily, as in run()

    model = checkpoints.read_config(init_from).model
    model.dtype = config.model.dtype
    for arg in sys.argv[1:]:
        if arg.startswith("--config.model."):
            *parents, leaf = arg.split("=", 1)[0][len("--config.model."):].split(".")
            source, target = config.model, model
            for key in parents:
                source, target = source[key], target[key]
            target[leaf] = source[leaf]
    config.model = model
    return config


def quiet_closed_event_loop(previous=sys.unraisablehook):
    """An unraisable-exception hook that drops `RuntimeError: Event loop is closed`: after a failed
    asynchronous checkpoint write (e.g. a full disk) Orbax closes its event loop, and TensorStore's
    pending callbacks report that, once per array still in flight, as dozens of tracebacks around our
    one-line error. Every other unraisable exception is reported as before."""
    def hook(unraisable):
        value = unraisable.exc_value
        if not (isinstance(value, RuntimeError) and str(value) == "Event loop is closed"):
            previous(unraisable)
    return hook


def quiet_unawaited_writes() -> None:
    """Drops the `coroutine ... was never awaited` RuntimeWarnings that Python prints at exit when a
    failed asynchronous checkpoint write leaves Orbax's other fragment writes unscheduled: the failure
    itself is already reported in one line."""
    warnings.filterwarnings("ignore", message=r"coroutine '.*' was never awaited", category=RuntimeWarning)


def main(argv) -> None:
    sys.unraisablehook = quiet_closed_event_loop()
    if len(argv) > 1:
        fail(f"unexpected arguments {argv[1:]}; flags look like --workdir=DIR or --config.train.steps=100")
    if not flags.FLAGS["verbosity"].present:
        # Orbax logs every checkpoint step at INFO, and a failed write at ERROR with tracebacks from each of
        # its threads; the failure reaches us as an exception and is reported in one line.
        logging.set_verbosity(logging.FATAL)
    signal.signal(signal.SIGINT, signal.default_int_handler)   # the loop takes SIGINT over while it runs
    try:
        run()
    except KeyboardInterrupt:   # Ctrl-C outside the loop: loading, restoring, waiting for the last write
        print(f"error: interrupted; finished checkpoints in {_WORKDIR.value} are kept", file=sys.stderr)
        sys.exit(130)


def run() -> None:
    maybe_initialize_distributed()
    # Imported here, after flag parsing, so `--help` and flag errors answer without loading Flax, Orbax
    # and the model code (seconds); there is no import cycle to avoid.
    from zoo.checkpoints import CheckpointWriteError
    from zoo.train import NonFiniteLoss, enable_compilation_cache, train

    enable_compilation_cache()
    workdir = _WORKDIR.value
    config = _CONFIG.value
    try:
        config.get("train")   # a config file that could not be loaded reports itself on first use
    except OSError as e:
        fail(describe_config_error(e))
    try:
        if _INIT_FROM.value is not None:
            config = init_from_config(config, _INIT_FROM.value)
        result = train(config, workdir, init_from=_INIT_FROM.value)
    except CheckpointWriteError as e:
        quiet_unawaited_writes()
        fail(e)
    except (ValueError, OSError, ImportError, KeyError, NonFiniteLoss) as e:
        fail(e)
    if result.already_done:
        print(f"nothing to do: {workdir} already holds step {result.step} (train.steps is "
              f"{config.train.steps}); its files are left as they are")
        return
    if result.interrupted_by:
        print(f"stopped by {result.interrupted_by} at step {result.step}; saved a checkpoint in {workdir}; "
              "rerun the same command to resume")
        return
    summary = ", ".join(f"{k} {result.last_metrics[k]:.4f}" for k in ("loss", "val_loss", "val_bits_per_byte")
                        if k in result.last_metrics)
    print(f"trained to step {result.step} in {workdir}" + (f": {summary}" if summary else ""))


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
