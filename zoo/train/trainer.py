"""The training loop: resumable, deterministic, and safe to interrupt.

Writes into WORKDIR: `config.json` (the full config), `metrics.jsonl` (one JSON object per logged step;
both from process 0 only) and Orbax checkpoints under `checkpoints/<step>/` (items `params`, `opt_state`;
written by every process together). Rerunning the same command resumes from the latest checkpoint and,
because batch `s` is a pure function of (seed, s), reproduces the uninterrupted run exactly. SIGTERM/SIGINT
finish the current step, save and return. A non-finite loss or gradient norm stops the run before anything
from that step is saved.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import threading
import time

import jax
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec
from tqdm import tqdm

import zoo
from zoo import checkpoints, data, distributed, sharding
from zoo.evaluate import bits_per_byte, make_loss_fn, validation_loss
from zoo.sharding import check_batch_splits, shard_batch
from zoo.train.optimizer import make_optimizer

METRICS_FILE = "metrics.jsonl"
COMPUTE_DTYPES = ("float32", "bfloat16")


class NonFiniteLoss(FloatingPointError):
    """The loss or gradient norm became NaN or infinite."""


@dataclasses.dataclass
class Result:
    step: int                      # steps completed (and saved)
    interrupted_by: str | None     # the signal's name when one stopped the run early
    last_metrics: dict             # the last metrics line written


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
    rules = sharding.resolve_rules(config.get("sharding_rules", "fsdp_tensor_expert"))
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
                    shardings: Shardings | None = None):
    """The jitted update `(params, opt_state, inputs_BT, targets_BT) -> (params, opt_state, metrics)`,
    donating the old parameters and optimizer state. Master weights stay float32; with bf16 compute
    the cast happens inside the differentiated function. With `shardings`, inputs and outputs are
    pinned to them (parameters and optimizer state keep their layout from step to step)."""
    mesh, rules = (None, None) if shardings is None else (shardings.mesh, shardings.rules)
    loss_fn = make_loss_fn(graphdef, compute_dtype, training=True, mesh=mesh, rules=rules)

    def train_step(params, opt_state, inputs_BT, targets_BT):
        loss, grads = jax.value_and_grad(loss_fn)(params, inputs_BT, targets_BT)
        if shardings is not None:   # gradients reduce-scattered straight into the parameters' layout
            grads = jax.lax.with_sharding_constraint(grads, shardings.params)
        updates, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        return params, opt_state, {"loss": loss, "grad_norm": optax.tree.norm(grads)}

    if shardings is None:
        return jax.jit(train_step, donate_argnums=(0, 1))
    s = shardings
    return jax.jit(train_step, donate_argnums=(0, 1),
                   in_shardings=(s.params, s.opt_state, s.batch, s.batch),
                   out_shardings=(s.params, s.opt_state, s.replicated))


def _initial_state(config, mngr, mesh=None):
    """(graphdef, params, opt_state, tx, schedule, start_step, shardings): fresh from `train.seed`
    (parameters and optimizer state created already sharded), or restored from the latest checkpoint
    into abstract targets carrying the current mesh's shardings, whatever mesh saved it."""
    start = mngr.latest_step() if mngr is not None else None
    abstract_model = zoo.build_abstract(config.model)
    graphdef, abstract_params = nnx.split(abstract_model, nnx.Param)
    tx, schedule = make_optimizer(config, abstract_model)
    s = make_shardings(config, abstract_model, tx, mesh)
    if start is None:
        model = sharding.create_model(config.model, s.mesh, s.rules, seed=config.train.seed)
        params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
        opt_state = jax.jit(tx.init, in_shardings=(s.params,), out_shardings=s.opt_state)(params)
        return graphdef, params, opt_state, tx, schedule, 0, s
    params_target = checkpoints.abstract(nnx.to_pure_dict(abstract_params), sharding=s.params)
    opt_target = checkpoints.abstract(jax.eval_shape(tx.init, params_target), sharding=s.opt_state)
    restored = checkpoints.restore(mngr, start, {"params": params_target, "opt_state": opt_target})
    return graphdef, restored["params"], restored["opt_state"], tx, schedule, start, s


def train(config, workdir: str) -> Result:
    """Trains `config` in `workdir` up to `train.steps`, resuming from the latest checkpoint there."""
    validate(config)
    t = config.train
    corpus = data.load_corpus(config.data)
    data.check_fits(corpus, config.model.vocab_size, t.seq_len)
    zoo.models.validate(config.model)

    os.makedirs(workdir, exist_ok=True)
    mngr = checkpoints.manager(workdir, keep=t.keep_checkpoints)
    try:
        graphdef, params, opt_state, tx, schedule, start, shardings = _initial_state(config, mngr)
        log = None
        if distributed.is_primary():
            checkpoints.write_config(config, workdir)
            log = MetricsLog(os.path.join(workdir, METRICS_FILE), keep_through=start)
        try:
            return _loop(config, workdir, corpus, mngr, log, graphdef, params, opt_state, tx, schedule, start,
                         shardings)
        finally:
            if log is not None:
                log.close()
    finally:
        mngr.wait_until_finished()
        mngr.close()


def _loop(config, workdir, corpus, mngr, log, graphdef, params, opt_state, tx, schedule, start,
          shardings) -> Result:
    """The steps from `start` to `train.steps`; `log` is None on processes other than the primary one."""
    t = config.train
    train_step = make_train_step(graphdef, tx, t.compute_dtype, shardings)
    eval_loss = jax.jit(make_loss_fn(graphdef, t.compute_dtype, mesh=shardings.mesh, rules=shardings.rules),
                        in_shardings=(shardings.params, shardings.batch, shardings.batch),
                        out_shardings=shardings.replicated)
    tokens_per_step = t.batch_size * t.seq_len
    step, saved, record = start, start, {}
    window_start, window_steps = time.perf_counter(), 0
    bar = tqdm(total=t.steps, initial=start, desc="train", unit="step", dynamic_ncols=True,
               disable=not distributed.is_primary())
    with StopOnSignal() as stop, bar:
        while step < t.steps and stop.signal_name is None:
            inputs_BT, targets_BT = data.train_batch(corpus, seed=t.seed, step=step + 1, batch_size=t.batch_size,
                                                     seq_len=t.seq_len)
            params, opt_state, out = train_step(params, opt_state, shard_batch(inputs_BT, shardings.batch),
                                                shard_batch(targets_BT, shardings.batch))
            loss, grad_norm = float(out["loss"]), float(out["grad_norm"])
            step += 1
            window_steps += 1
            bar.update(1)
            if not (math.isfinite(loss) and math.isfinite(grad_norm)):
                mngr.wait_until_finished()
                last = mngr.latest_step()
                kept = f"the last good checkpoint is step {last}" if last is not None else "no checkpoint was saved"
                raise NonFiniteLoss(f"loss {loss} (gradient norm {grad_norm}) at step {step}; stopped without "
                                    f"saving; {kept} in {os.path.join(workdir, checkpoints.CHECKPOINT_DIR)}")
            is_eval = step % t.eval_every == 0 or step == t.steps
            if step % t.log_every == 0 or is_eval:
                elapsed = time.perf_counter() - window_start
                record = {"step": step, "loss": loss, "grad_norm": grad_norm,
                          "learning_rate": float(schedule(step - 1)),
                          "tokens_per_second": window_steps * tokens_per_step / max(elapsed, 1e-9)}
                if is_eval:
                    val = validation_loss(eval_loss, params, corpus, num_batches=t.eval_batches,
                                          batch_size=t.batch_size, seq_len=t.seq_len,
                                          batch_sharding=shardings.batch)
                    record.update(val_loss=val, val_bits_per_byte=bits_per_byte(val, corpus.bytes_per_token))
                if log is not None:
                    log.write(record)
                bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{record['tokens_per_second']:.0f}",
                                **({"val_bpb": f"{record['val_bits_per_byte']:.3f}"} if is_eval else {}))
            if step % t.log_every == 0 or is_eval or step == start + 1:
                window_start, window_steps = time.perf_counter(), 0   # step 1 of a process includes compiling
            if step % t.checkpoint_every == 0:
                checkpoints.save(mngr, step, {"params": params, "opt_state": opt_state})
                saved = step
        if step > saved:
            checkpoints.save(mngr, step, {"params": params, "opt_state": opt_state})
    return Result(step=step, interrupted_by=stop.signal_name if step < t.steps else None, last_metrics=record)
