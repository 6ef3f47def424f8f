"""The training loop: resumable, deterministic, and safe to interrupt.

Writes into WORKDIR: `config.json` (the full config), `metrics.jsonl` (one JSON object per logged step),
TensorBoard event files (`events.out.tfevents.*`, the same scalars; all three from process 0 only) and
Orbax checkpoints under `checkpoints/<step>/` (items `params`, `opt_state`; written by every process
together). Rerunning the same command resumes from the newest readable checkpoint and, because batch `s`
is a pure function of (seed, s), reproduces the uninterrupted run exactly; a newer checkpoint that cannot
be read is moved to `unreadable_checkpoints/` (never deleted) and named in a warning. SIGTERM/SIGINT
finish the current step, save and return. A non-finite loss or gradient norm stops the run before
anything from that step is saved. A finished run (a checkpoint at or past `train.steps`) is left as it is.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import sys
import threading
import time

import jax
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec
from tensorboardX import SummaryWriter
from tqdm import tqdm

import zoo
from zoo import checkpoints, data, distributed, memory, sharding
from zoo.sharding import check_batch_splits, shard_batch
from zoo.train.loss import (bits_per_byte, make_loss_fn, make_memory_loss_fn, memory_validation,
                             validation_loss)
from zoo.train.optimizer import make_optimizer

METRICS_FILE = "metrics.jsonl"
UNREADABLE_DIR = "unreadable_checkpoints"
COMPUTE_DTYPES = ("float32", "bfloat16")


class NonFiniteLoss(FloatingPointError):
    """The loss or gradient norm became NaN or infinite."""


@dataclasses.dataclass
class Result:
    step: int                         # steps completed (and saved)
    interrupted_by: str | None        # the signal's name when one stopped the run early
    last_metrics: dict                # the last metrics line written
    already_done: bool = False        # the workdir already held a checkpoint at or past train.steps
    resumed_from: int | None = None   # the checkpoint step the run started from (None: a fresh start)
    set_aside: tuple = ()             # unreadable checkpoints, as (step, reason, where they were moved)


def enable_compilation_cache(directory: str = "~/.cache/lc-zoo/jax") -> None:
    """Keeps compiled XLA programs on disk so reruns and resumes skip compiling; an explicit
    JAX_COMPILATION_CACHE_DIR wins."""
    if not jax.config.jax_compilation_cache_dir:
        jax.config.update("jax_compilation_cache_dir", os.path.expanduser(directory))


def validate(config) -> None:
    """Fails naming the first bad `train.*` value."""
    t = config.train
    for key in ("steps", "batch_size", "seq_len", "log_every", "eval_every", "eval_batches", "checkpoint_every"):
        if int(t[key]) < 1:
            raise ValueError(f"train.{key} must be at least 1, got {t[key]}")
    if t.compute_dtype not in COMPUTE_DTYPES:
        raise ValueError(f"unknown train.compute_dtype {t.compute_dtype!r}; expected one of {COMPUTE_DTYPES}")
    if t.keep_checkpoints is not None and int(t.keep_checkpoints) < 1:
        raise ValueError(f"train.keep_checkpoints must be at least 1 (or None: keep all), got {t.keep_checkpoints}")
    max_positions = config.model.get("max_positions")
    if max_positions is not None and int(t.seq_len) > int(max_positions):
        raise ValueError(f"train.seq_len {t.seq_len} exceeds model.max_positions {max_positions}")


class MetricsLog:
    """`metrics.jsonl`, appended line by line; on (re)start, lines past `keep_through` are dropped so a
    resumed run writes no duplicates (a torn last line from a killed run goes too)."""

    def __init__(self, path: str, keep_through: int):
        kept = []
        if os.path.exists(path):
            with open(path) as f:
                for line in f:
                    try:
                        if json.loads(line)["step"] <= keep_through:
                            kept.append(line)
                    except (ValueError, KeyError, TypeError):
                        continue
        with open(path + ".tmp", "w") as f:
            f.writelines(kept)
        os.replace(path + ".tmp", path)
        self.file = open(path, "a", buffering=1)

    def write(self, record: dict) -> None:
        self.file.write(json.dumps(record) + "\n")

    def close(self) -> None:
        self.file.close()


class RunLog:
    """Where a logged step goes, on the primary process only: `metrics.jsonl`, TensorBoard event files in
    the workdir (tensorboardX; `purge_step` hides a killed run's steps past the resume point), and the
    console: a tqdm bar on a terminal, else (output redirected) one plain line per logged step. On other
    processes every method does nothing."""

    def __init__(self, workdir: str, steps: int, start: int, *, primary: bool, interactive: bool | None = None):
        self.primary, self.steps = primary, steps
        self.interactive = (sys.stdout.isatty() and sys.stderr.isatty()) if interactive is None else interactive
        self.metrics = MetricsLog(os.path.join(workdir, METRICS_FILE), keep_through=start) if primary else None
        self.tensorboard = SummaryWriter(logdir=workdir, purge_step=start + 1, flush_secs=30) if primary else None
        self.bar = tqdm(total=steps, initial=start, desc="train", unit="step", dynamic_ncols=True,
                        disable=not (primary and self.interactive))

    def say(self, text: str) -> None:
        """A status line (e.g. "compiling..."): above the bar, or printed."""
        if self.primary:
            self.bar.write(text) if self.interactive else print(text, flush=True)

    def step_done(self) -> None:
        self.bar.update(1)

    def write(self, record: dict) -> None:
        if not self.primary:
            return
        self.metrics.write(record)
        for key, value in record.items():
            if key != "step":
                self.tensorboard.add_scalar(key, value, record["step"])
        has_val = "val_bits_per_byte" in record
        if self.interactive:
            self.bar.set_postfix(loss=f"{record['loss']:.3f}", tok_s=f"{record['tokens_per_second']:.0f}",
                                 **({"val_bpb": f"{record['val_bits_per_byte']:.3f}"} if has_val else {}))
        else:
            val = (f", val_loss {record['val_loss']:.4f}, val_bits_per_byte {record['val_bits_per_byte']:.4f}"
                   if has_val else "")
            val += "".join(f", {k} {record[k]:.3f}" for k in ("val_loss", "routing_recall", "answer_accuracy")
                           if k in record and not has_val)
            print(f"step {record['step']}/{self.steps}: loss {record['loss']:.4f}, grad_norm "
                  f"{record['grad_norm']:.3f}, learning_rate {record['learning_rate']:.3g}, tokens/s "
                  f"{record['tokens_per_second']:.0f}{val}", flush=True)

    def close(self) -> None:
        self.bar.close()
        if self.primary:
            self.metrics.close()
            self.tensorboard.close()


class StopOnSignal:
    """While active, SIGTERM and SIGINT only record themselves; the loop checks `signal_name`.
    (Python handles signals in the main thread only; elsewhere this does nothing.)"""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.signal_name = None
        self.previous = {}

    def _handle(self, signum, frame):
        self.signal_name = signal.Signals(signum).name

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self.previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        return self

    def __exit__(self, *exc):
        for s, handler in self.previous.items():
            signal.signal(s, handler)


@dataclasses.dataclass
class Shardings:
    """Where everything lives: the mesh, its rules, and the shardings of parameters (a pure dict),
    optimizer state, batches and replicated scalars."""
    mesh: jax.sharding.Mesh
    rules: tuple
    params: dict
    opt_state: object
    batch: NamedSharding
    replicated: NamedSharding


def make_shardings(config, model, tx, mesh=None) -> Shardings:
    """The shardings of `model`'s (possibly abstract) parameters and `tx`'s state on `config.mesh`
    (or `mesh`) under `config.sharding_rules`. Optimizer-state leaves shaped like the parameters take
    their parameter's sharding; the rest (step counts) are replicated."""
    mesh = mesh if mesh is not None else sharding.make_mesh(config.get("mesh", {}))
    rules = sharding.resolve_rules(config.get("sharding_rules", sharding.DEFAULT_RULES))
    replicated = NamedSharding(mesh, PartitionSpec())
    params = nnx.to_pure_dict(sharding.state_shardings(nnx.state(model, nnx.Param), mesh, rules))
    abstract_params = jax.tree.map(lambda v: jax.ShapeDtypeStruct(v.shape, v.dtype),
                                   nnx.to_pure_dict(nnx.state(model, nnx.Param)))
    opt_shape = jax.eval_shape(tx.init, abstract_params)
    opt_state = optax.tree_map_params(tx, lambda _, s: s, opt_shape, params,
                                      transform_non_params=lambda _: replicated,
                                      is_leaf=lambda x: isinstance(x, NamedSharding))
    batch = sharding.batch_sharding(mesh, rules)
    check_batch_splits(config.train.batch_size, batch, "train.batch_size")
    return Shardings(mesh, rules, params, opt_state, batch, replicated)


def make_train_step(graphdef: nnx.GraphDef, tx: optax.GradientTransformation, compute_dtype: str,
                    shardings: Shardings | None = None, *, memory_cfg=None):
    """The jitted update `(params, opt_state, inputs_BT, targets_BT) -> (params, opt_state, metrics)`,
    donating the old parameters and optimizer state. Master weights stay float32; with bf16 compute
    the cast happens inside the differentiated function. With `shardings`, inputs and outputs are
    pinned to them (parameters and optimizer state keep their layout from step to step).
    With `memory_cfg` (a config's `memory` section) the update is `(params, opt_state, batch)` over a
    memory-bank batch (zoo.memory) and the metrics add the loss parts, routing_recall, answer_accuracy."""
    mesh, rules = (None, None) if shardings is None else (shardings.mesh, shardings.rules)
    if memory_cfg is None:
        plain = make_loss_fn(graphdef, compute_dtype, training=True, mesh=mesh, rules=rules)
        loss_fn, num_inputs = (lambda params, *batch: (plain(params, *batch), {})), 2
    else:
        loss_fn = make_memory_loss_fn(graphdef, compute_dtype, memory_cfg, training=True, mesh=mesh, rules=rules)
        num_inputs = 1

    def train_step(params, opt_state, *batch):
        (loss, parts), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, *batch)
        if shardings is not None:   # gradients reduce-scattered straight into the parameters' layout
            grads = jax.lax.with_sharding_constraint(grads, shardings.params)
        updates, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        return params, opt_state, {"loss": loss, "grad_norm": optax.tree.norm(grads), **parts}

    if shardings is None:
        return jax.jit(train_step, donate_argnums=(0, 1))
    s = shardings
    return jax.jit(train_step, donate_argnums=(0, 1),
                   in_shardings=(s.params, s.opt_state) + (s.batch,) * num_inputs,
                   out_shardings=(s.params, s.opt_state, s.replicated))


@dataclasses.dataclass
class TrainState:
    """Everything the loop advances or needs to advance it: the model's graph and parameters (a pure
    dict), the optimizer, its state and learning-rate schedule, the steps done, and the shardings."""
    graphdef: nnx.GraphDef
    params: dict
    opt_state: object
    tx: optax.GradientTransformation
    schedule: optax.Schedule
    step: int
    shardings: Shardings


def _set_aside(workdir: str, mngr, unreadable) -> tuple:
    """Moves unreadable checkpoints out of `checkpoints/` into UNREADABLE_DIR (never deleting them), so
    the resumed run can save those steps again; returns (step, reason, new path) for each."""
    moved = []
    for error in unreadable:
        step = int(os.path.basename(error.where))
        target = os.path.join(workdir, UNREADABLE_DIR, str(step))
        if distributed.is_primary():
            os.makedirs(os.path.dirname(target), exist_ok=True)
            if os.path.exists(target):   # set aside before: keep both
                target = f"{target}.{time.strftime('%Y%m%d-%H%M%S')}"
            os.rename(error.where, target)
        moved.append((step, error.reason, target))
    if moved:
        checkpoints.barrier("set-aside:" + workdir)   # process 0 has moved them
        mngr.reload()
    return tuple(moved)


def _skeleton(config, mesh=None):
    """(graphdef, abstract params as a pure dict, tx, schedule, shardings) of `config`, nothing allocated."""
    abstract_model = zoo.build_abstract(config.model)
    graphdef, abstract_params = nnx.split(abstract_model, nnx.Param)
    tx, schedule = make_optimizer(config, abstract_model)
    s = make_shardings(config, abstract_model, tx, mesh)
    return graphdef, nnx.to_pure_dict(abstract_params), tx, schedule, s


def fresh_state(config, mesh=None, params=None) -> TrainState:
    """Step 0 on `config.mesh` (or `mesh`): parameters from `train.seed` (or `params`, already placed),
    and a fresh optimizer state, created already sharded (nothing materialised whole on one device)."""
    graphdef, _, tx, schedule, s = _skeleton(config, mesh)
    if params is None:
        model = sharding.create_model(config.model, s.mesh, s.rules, seed=config.train.seed)
        params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    opt_state = jax.jit(tx.init, in_shardings=(s.params,), out_shardings=s.opt_state)(params)
    return TrainState(graphdef, params, opt_state, tx, schedule, 0, s)


def _initial_state(config, mngr, workdir: str, init_from: str | None = None, mesh=None
                   ) -> tuple[TrainState, int | None, tuple]:
    """(state, resumed_from, unreadable): the newest readable checkpoint of `mngr` restored into abstract
    targets carrying the current mesh's shardings (whatever mesh saved it), with the newer checkpoints
    that could not be read; else the parameters of `init_from`'s newest readable checkpoint with a fresh
    optimizer state; else `fresh_state`."""
    graphdef, abstract_params, tx, schedule, s = _skeleton(config, mesh)
    params_target = checkpoints.abstract(abstract_params, sharding=s.params)
    if mngr.all_steps():
        missing_opt = [step for step in mngr.all_steps()
                       if not os.path.isdir(os.path.join(str(mngr.directory), str(step), "opt_state"))]
        if missing_opt:
            raise ValueError(f"{workdir} holds checkpoints without optimizer state (a converted checkpoint?); "
                             f"to fine-tune from it use --init_from={workdir} with a new --workdir")
        opt_target = checkpoints.abstract(jax.eval_shape(tx.init, params_target), sharding=s.opt_state)
        start, restored, unreadable = checkpoints.restore_newest_readable(
            mngr, {"params": params_target, "opt_state": opt_target})
        state = TrainState(graphdef, restored["params"], restored["opt_state"], tx, schedule, start, s)
        return state, start, unreadable
    if init_from is None:
        return fresh_state(config, mesh), None, ()
    source, _ = checkpoints._existing_manager(init_from)
    try:
        _, restored, _ = checkpoints.restore_newest_readable(source, {"params": params_target})
    finally:
        source.close()
    return fresh_state(config, mesh, params=restored["params"]), None, ()


def train(config, workdir: str, *, init_from: str | None = None, interactive: bool | None = None) -> Result:
    """Trains `config` in `workdir` up to `train.steps`, resuming from the newest readable checkpoint
    there; a workdir without checkpoints starts from `init_from`'s parameters (a zoo checkpoint or another
    run; fresh optimizer state) if given, else from `train.seed`. A workdir already at or past
    `train.steps` is left untouched. `interactive`: show a progress bar (default: when stdout and stderr
    are terminals) rather than plain log lines."""
    validate(config)
    t = config.train
    corpus = data.load_corpus(config.data)
    data.check_fits(corpus, config.model.vocab_size, t.seq_len)
    zoo.models.validate(config.model)
    if init_from is not None:
        checkpoints.read_config(init_from)   # names a missing directory or config.json before anything is written

    os.makedirs(workdir, exist_ok=True)
    mngr = checkpoints.manager(workdir, keep=t.keep_checkpoints)
    try:
        state, resumed_from, unreadable = _initial_state(config, mngr, workdir, init_from)
        if state.step >= t.steps:
            return Result(step=state.step, interrupted_by=None, last_metrics={}, already_done=True,
                          resumed_from=resumed_from)
        set_aside = _set_aside(workdir, mngr, unreadable)
        if distributed.is_primary():
            checkpoints.write_config(config, workdir)
        log = RunLog(workdir, t.steps, state.step, primary=distributed.is_primary(), interactive=interactive)
        for step, reason, where in set_aside:
            if distributed.is_primary():
                print(f"warning: checkpoint step {step} cannot be read ({reason}); moved it to {where} and "
                      f"resumed from step {state.step}", file=sys.stderr, flush=True)
        try:
            result = _loop(config, workdir, corpus, mngr, state, log)
        finally:
            log.close()
        return dataclasses.replace(result, resumed_from=resumed_from, set_aside=set_aside)
    finally:
        try:
            checkpoints.finish(mngr)
        finally:
            mngr.close()


def _loop(config, workdir: str, corpus, mngr, state: TrainState, log: RunLog) -> Result:
    """The steps from `state.step` to `train.steps` (the state is advanced in place)."""
    t, s = config.train, state.shardings
    memory_cfg = config.get("memory")   # memory-bank training of MSA layers (zoo.memory)
    task = memory.MemoryTask.from_config(config) if memory_cfg is not None else None
    train_step = make_train_step(state.graphdef, state.tx, t.compute_dtype, s, memory_cfg=memory_cfg)
    eval_loss = jax.jit(make_loss_fn(state.graphdef, t.compute_dtype, mesh=s.mesh, rules=s.rules),
                        in_shardings=(s.params, s.batch, s.batch), out_shardings=s.replicated)
    tokens_per_step = t.batch_size * t.seq_len
    if task is not None:
        memory_eval = jax.jit(make_memory_loss_fn(state.graphdef, t.compute_dtype, memory_cfg, mesh=s.mesh,
                                                  rules=s.rules), in_shardings=(s.params, s.batch),
                              out_shardings=s.replicated)
        tokens_per_step = t.batch_size * (task.num_docs * task.doc_len + task.query_len)
    start = state.step
    saved, record = start, {}
    window_start, window_steps = time.perf_counter(), 0
    with StopOnSignal() as stop:
        while state.step < t.steps and stop.signal_name is None:
            if state.step == start:
                log.say(f"step {start + 1}: compiling the train step...")
            if task is None:
                batch = data.train_batch(corpus, seed=t.seed, step=state.step + 1, batch_size=t.batch_size,
                                         seq_len=t.seq_len)
            else:   # examples step * batch_size.. of the training split: a pure function of (seed, step)
                batch = (memory.batch(task, corpus.train_N, seed=t.seed, start=state.step * t.batch_size,
                                      size=t.batch_size),)
            state.params, state.opt_state, out = train_step(state.params, state.opt_state,
                                                            *jax.tree.map(lambda x: shard_batch(x, s.batch), batch))
            loss, grad_norm = float(out["loss"]), float(out["grad_norm"])
            state.step += 1
            step = state.step
            window_steps += 1
            log.step_done()
            if not (math.isfinite(loss) and math.isfinite(grad_norm)):
                checkpoints.finish(mngr)
                last = mngr.latest_step()
                kept = f"the last good checkpoint is step {last}" if last is not None else "no checkpoint was saved"
                raise NonFiniteLoss(f"loss {loss} (gradient norm {grad_norm}) at step {step}; stopped without "
                                    f"saving; {kept} in {os.path.join(workdir, checkpoints.CHECKPOINT_DIR)}")
            is_eval = step % t.eval_every == 0 or step == t.steps
            if step % t.log_every == 0 or is_eval:
                elapsed = time.perf_counter() - window_start
                record = {"step": step, "loss": loss, "grad_norm": grad_norm,
                          "learning_rate": float(state.schedule(step - 1)),
                          "tokens_per_second": window_steps * tokens_per_step / max(elapsed, 1e-9)}
                record.update({k if k.startswith("loss_") else f"train_{k}": float(v) for k, v in out.items()
                               if k not in ("loss", "grad_norm")})   # memory training: parts, batch metrics
                if is_eval and task is not None:
                    record.update(memory_validation(memory_eval, state.params, task, corpus, seed=t.seed + 1,
                                                    num_batches=t.eval_batches, batch_size=t.batch_size,
                                                    batch_sharding=s.batch))
                elif is_eval:
                    val = validation_loss(eval_loss, state.params, corpus, num_batches=t.eval_batches,
                                          batch_size=t.batch_size, seq_len=t.seq_len, batch_sharding=s.batch)
                    record.update(val_loss=val, val_bits_per_byte=bits_per_byte(val, corpus.bytes_per_token))
                log.write(record)
            if step % t.log_every == 0 or is_eval or step == start + 1:
                window_start, window_steps = time.perf_counter(), 0   # step 1 of a process includes compiling
            if step % t.checkpoint_every == 0:
                checkpoints.save(mngr, step, {"params": state.params, "opt_state": state.opt_state})
                saved = step
        if state.step > saved:
            checkpoints.save(mngr, state.step, {"params": state.params, "opt_state": state.opt_state})
    return Result(step=state.step, interrupted_by=stop.signal_name if state.step < t.steps else None,
                  last_metrics=record)
