"""Training: the optimizer pieces, bf16 compute, and the loop's files, resumption, signals and failures."""
from __future__ import annotations

import json
import math
import os
import re
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from flax import nnx, traverse_util

import zoo
from tests.conftest import (MICRO_CONFIG, ROOT, SUBPROCESS_ENV, checkpoint_steps, get_config, read_metrics,
                            run_script)
from tests.sharding_runs import micro_config
from zoo import checkpoints, distributed
from zoo.train.loss import make_loss_fn
from zoo.train import decay_mask, learning_rate_schedule, make_optimizer, train
from zoo.train.trainer import make_train_step


@pytest.fixture(scope="module")
def model():
    return zoo.build(get_config().model, seed=0)


def micro_args(workdir, *overrides: str) -> list[str]:
    return [f"--config={MICRO_CONFIG}", f"--workdir={workdir}", *overrides]


def test_schedule_warms_up_linearly_then_decays_by_cosine():
    opt = ml_collections.ConfigDict(dict(learning_rate=1.0, warmup_steps=4, final_lr_fraction=0.1))
    schedule = learning_rate_schedule(opt, total_steps=20)
    lrs = [float(schedule(count)) for count in range(20)]   # count = updates done before this one
    np.testing.assert_allclose(lrs[:4], [0.25, 0.5, 0.75, 1.0], rtol=1e-6)
    assert lrs[11] == pytest.approx(0.55)       # step 12: halfway through the decay
    assert lrs[-1] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(lrs[3:], lrs[4:]))


def test_weight_decay_skips_norms_scalars_and_embedding_tables(model):
    mask = traverse_util.flatten_dict(decay_mask(model))
    for path in [("embed", "table"), ("per_layer_embed", "token_table"), ("final_norm", "scale"),
                 ("blocks", 0, "layer_scalar"), ("blocks", 0, "attn", "q_norm", "scale"),
                 ("per_layer_embed", "context_norm", "scale")]:
        assert mask[path] is False, path
    for path in [("blocks", 0, "attn", "q_proj"), ("blocks", 1, "mlp", "down_proj"), ("blocks", 0, "ple_gate"),
                 ("per_layer_embed", "context_proj")]:
        assert mask[path] is True, path
    # With zero gradients AdamW's update is exactly -lr * weight_decay * param where decay applies.
    config = get_config()
    config.optimizer.update(learning_rate=0.1, weight_decay=0.5, warmup_steps=1)
    tx, _ = make_optimizer(config, model)
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    updates, _ = jax.jit(tx.update)(jax.tree.map(jnp.zeros_like, params), tx.init(params), params)
    flat_params, flat_updates = traverse_util.flatten_dict(params), traverse_util.flatten_dict(updates)
    for path, decays in mask.items():
        expected = -0.1 * 0.5 * flat_params[path] if decays else jnp.zeros_like(flat_params[path])
        np.testing.assert_allclose(flat_updates[path], expected, rtol=1e-5, atol=1e-8, err_msg=str(path))


def test_gradients_are_clipped_by_global_norm(model):
    config = get_config()
    config.optimizer.grad_clip = 0.5
    tx, _ = make_optimizer(config, model)
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    grads = jax.tree.map(lambda p: jnp.full_like(p, 3.0), params)
    _, state = jax.jit(tx.update)(grads, tx.init(params), params)
    scale = 0.5 / float(optax.tree.norm(grads))
    mu = optax.tree_utils.tree_get(state, "mu")     # Adam's first moment: (1 - b1) * clipped gradient
    np.testing.assert_allclose(mu["embed"]["table"], (1 - config.optimizer.b1) * 3.0 * scale, rtol=1e-5)


def test_bf16_compute_keeps_float32_master_weights(model):
    config = get_config()
    graphdef, state = nnx.split(model, nnx.Param)
    params = nnx.to_pure_dict(state)
    tx, _ = make_optimizer(config, model)
    tokens_BT = jnp.asarray(np.random.default_rng(0).integers(0, 256, (2, 17)), jnp.int32)
    inputs_BT, targets_BT = tokens_BT[:, :-1], tokens_BT[:, 1:]
    loss32 = float(jax.jit(make_loss_fn(graphdef, "float32"))(params, inputs_BT, targets_BT))
    step = make_train_step(graphdef, tx, "bfloat16")
    jaxpr = str(jax.make_jaxpr(step)(params, tx.init(params), inputs_BT, targets_BT))
    assert re.search(r"bf16\[[\d,]+\] = dot_general", jaxpr)        # the matmuls run in bf16
    new_params, _, out = step(jax.tree.map(jnp.copy, params), tx.init(params), inputs_BT, targets_BT)
    assert float(out["loss"]) != loss32 and float(out["loss"]) == pytest.approx(loss32, rel=0.05)
    assert {x.dtype for x in jax.tree.leaves(new_params)} == {jnp.dtype(jnp.float32)}
    changed = jax.tree.map(lambda a, b: bool(jnp.any(a != b)), new_params, params)
    assert all(jax.tree.leaves(changed))          # every parameter got a gradient through the cast


@pytest.mark.parametrize("family", ["laguna", "zaya1", "deepseek_v4"])
def test_bf16_compute_step_for_every_family(family):
    """A bf16-compute training step runs on CPU (XLA:CPU lacks some bf16 x bf16 -> f32 dot layouts) and
    gives the float32 loss to bf16 precision, keeping float32 master weights."""
    config = micro_config(family)
    model = zoo.build(config.model)
    graphdef, state = nnx.split(model, nnx.Param)
    params = nnx.to_pure_dict(state)
    tx, _ = make_optimizer(config, model)
    tokens_BT = jnp.asarray(np.random.default_rng(0).integers(3, 256, (2, 25)), jnp.int32)
    inputs_BT, targets_BT = tokens_BT[:, :-1], tokens_BT[:, 1:]
    loss32 = float(jax.jit(make_loss_fn(graphdef, "float32", training=True))(params, inputs_BT, targets_BT))
    new_params, _, out = make_train_step(graphdef, tx, "bfloat16")(params, tx.init(params), inputs_BT, targets_BT)
    assert float(out["loss"]) == pytest.approx(loss32, rel=0.05)
    assert {x.dtype for x in jax.tree.leaves(new_params)} == {jnp.dtype(jnp.float32)}


def test_train_writes_metrics_config_checkpoints_and_resumes(tmp_path, capsys):
    workdir = str(tmp_path)
    config = get_config()
    result = train(config, workdir)
    assert result.step == 6 and result.interrupted_by is None
    out = capsys.readouterr().out                        # not a terminal: plain lines, no progress bar
    assert out.splitlines()[0] == "step 1: compiling the train step..."
    assert out.splitlines()[-1].startswith("step 6/6: loss ") and "val_bits_per_byte" in out and "\r" not in out
    lines = read_metrics(workdir)
    assert [m["step"] for m in lines] == [1, 2, 3, 4, 5, 6]
    assert all({"step", "loss", "learning_rate", "tokens_per_second"} <= set(m) for m in lines)
    evals = [m for m in lines if "val_loss" in m]
    assert [m["step"] for m in evals] == [3, 6]
    for m in evals:
        assert m["val_bits_per_byte"] == pytest.approx(m["val_loss"] / math.log(2))
    schedule = learning_rate_schedule(config.optimizer, config.train.steps)
    assert [m["learning_rate"] for m in lines] == [float(schedule(s - 1)) for s in range(1, 7)]
    assert checkpoint_steps(workdir) == [4, 6]           # keep_checkpoints=2
    with open(os.path.join(workdir, "config.json")) as f:
        assert json.load(f) == json.loads(config.to_json_best_effort())

    assert tensorboard_scalars(workdir)["loss"] == [(m["step"], pytest.approx(m["loss"])) for m in lines]

    config.train.steps = 8                              # the same command with more steps resumes
    assert train(config, workdir).step == 8
    assert [m["step"] for m in read_metrics(workdir)] == list(range(1, 9))
    files = {name: (tmp_path / name).read_bytes() for name in os.listdir(tmp_path) if name != "checkpoints"}
    for steps in (8, 5):                                # finished (even with fewer steps): nothing changes
        config.train.steps = steps
        result = train(config, workdir)
        assert result.step == 8 and result.already_done
        assert {name: (tmp_path / name).read_bytes() for name in os.listdir(tmp_path) if name != "checkpoints"} \
            == files
    assert checkpoint_steps(workdir) == [6, 8]


def tensorboard_scalars(workdir) -> dict[str, list[tuple[int, float]]]:
    """The scalars of every TensorBoard event file in `workdir`, read with the TFRecord framing and the
    Event protocol buffer (tensorboardX's copy of TensorBoard's event.proto), by tag: [(step, value)]."""
    import struct

    from tensorboardX.proto.event_pb2 import Event
    scalars: dict[str, list] = {}
    for name in sorted(n for n in os.listdir(workdir) if n.startswith("events.out.tfevents")):
        data = open(os.path.join(workdir, name), "rb").read()
        pos = 0
        while pos < len(data):
            (length,) = struct.unpack("<Q", data[pos:pos + 8])
            event = Event.FromString(data[pos + 12:pos + 12 + length])
            pos += 12 + length + 4
            for value in event.summary.value:
                scalars.setdefault(value.tag, []).append((event.step, value.simple_value))
    return scalars


def test_other_processes_save_checkpoints_but_write_no_metrics_config_or_bar(tmp_path, monkeypatch, capsys):
    """In a multi-process run only process 0 writes metrics.jsonl and config.json and shows the bar;
    every process takes part in saving checkpoints."""
    monkeypatch.setattr(distributed, "is_primary", lambda: False)
    config = get_config()
    config.train.steps = 2
    assert train(config, str(tmp_path)).step == 2
    assert checkpoint_steps(str(tmp_path)) == [2]
    assert sorted(os.listdir(tmp_path)) == ["checkpoints"]
    assert "train:" not in capsys.readouterr().err


def test_sigkill_then_rerun_reproduces_the_uninterrupted_run(tmp_path):
    overrides = ("--config.train.steps=150", "--config.train.checkpoint_every=10", "--config.train.eval_every=50",
                 "--config.train.keep_checkpoints=20")
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    assert run_script("train.py", *micro_args(straight, *overrides)).returncode == 0

    proc = subprocess.Popen([sys.executable, "train.py", *micro_args(killed, *overrides)], cwd=ROOT,
                            env=SUBPROCESS_ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 150
    while not checkpoint_steps(str(killed)) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.005)
    proc.kill()
    assert proc.wait() == -signal.SIGKILL               # killed mid-run, not finished
    restored = max(checkpoint_steps(str(killed)))
    assert restored < 150

    assert run_script("train.py", *micro_args(killed, *overrides)).returncode == 0
    expected, resumed = read_metrics(str(straight)), read_metrics(str(killed))
    assert [m["step"] for m in resumed] == list(range(1, 151))   # every step once: no gaps, no duplicates
    for a, b in zip(expected, resumed):
        assert {k: v for k, v in a.items() if k != "tokens_per_second"} == \
               {k: v for k, v in b.items() if k != "tokens_per_second"}, f"step {a['step']}"


def test_sigterm_saves_and_exits_cleanly(tmp_path):
    workdir = str(tmp_path)
    proc = subprocess.Popen([sys.executable, "train.py", *micro_args(
        workdir, "--config.train.steps=100000", "--config.train.checkpoint_every=100000",
        "--config.train.eval_every=100000")], cwd=ROOT, env=SUBPROCESS_ENV, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True)
    metrics = os.path.join(workdir, "metrics.jsonl")

    def whole_lines() -> int:
        if not os.path.exists(metrics):
            return 0
        with open(metrics) as f:
            return f.read().count("\n")

    deadline = time.time() + 150
    while proc.poll() is None and time.time() < deadline and whole_lines() < 3:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    last = read_metrics(workdir)[-1]["step"]
    assert f"stopped by SIGTERM at step {last}" in out
    assert checkpoint_steps(workdir) == [last] and 3 <= last < 100000


def test_nan_loss_stops_with_one_line_and_keeps_the_last_good_checkpoint(tmp_path):
    workdir = str(tmp_path)
    config = get_config()
    config.train.steps = 2
    train(config, workdir)
    assert checkpoint_steps(workdir) == [2]
    res = run_script("train.py", *micro_args(workdir, "--config.train.steps=50", "--config.train.checkpoint_every=1000",
                                             "--config.optimizer.learning_rate=1e30"))
    assert res.returncode == 1
    assert res.stderr.strip().splitlines()[-1].startswith("error: loss nan")
    assert "Traceback" not in res.stderr
    assert "the last good checkpoint is step 2" in res.stderr
    assert checkpoint_steps(workdir) == [2]
    params = nnx.state(checkpoints.load(workdir), nnx.Param)
    assert all(bool(jnp.isfinite(x).all()) for x in jax.tree.leaves(params))


@pytest.mark.parametrize("args, message", [
    (["--config=configs/gemma4.py:nope"], "unknown gemma4 preset 'nope'"),
    (["--config.train.stepz=3"], "unknown config key 'stepz' in --config.train.stepz=3 (did you mean 'steps'?)"),
    ([f"--config={MICRO_CONFIG}", "--config.data.source=text", "--config.data.paths=/nonexistent/dir/*.txt"],
     "data.paths: no files match '/nonexistent/dir/*.txt'"),
    ([f"--config={MICRO_CONFIG}", "--distributed"], "jax.distributed.initialize() failed: "),   # no cluster here
    ([f"--config={MICRO_CONFIG}", "--config.train.seq_len=1000"], "train.seq_len 1000 exceeds model.max_positions 512"),
])
def test_bad_input_gives_one_line_and_loses_nothing(tmp_path, args, message):
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 5.0}\n')
    (tmp_path / "config.json").write_text("{}\n")
    res = run_script("train.py", f"--workdir={tmp_path}", *args)
    assert res.returncode == 1
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], res.stderr
    assert sorted(os.listdir(tmp_path)) == ["config.json", "metrics.jsonl"]
    assert (tmp_path / "metrics.jsonl").read_text() == '{"step": 1, "loss": 5.0}\n'
    assert (tmp_path / "config.json").read_text() == "{}\n"
