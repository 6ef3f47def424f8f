"""Faults a user meets: checkpoints that cannot be read (truncated data file, missing metadata), SIGKILL
while a checkpoint is being written, a full disk, bad values and Ctrl-C at start-up. Each ends with one
line on stderr naming the culprit and the right exit status, and the newest good checkpoint still
restores bit-exactly (compared with the parameters of an uninterrupted run)."""
from __future__ import annotations

import glob
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from flax import nnx

import zoo
from tests.conftest import (MICRO_CONFIG, ROOT, SUBPROCESS_ENV, checkpoint_steps, get_config, read_metrics,
                            run_script)
from zoo import checkpoints
from zoo.train import train

STEPS = ("--config.train.steps=4", "--config.train.eval_every=100")   # checkpoints at 2 and 4, eval at 4


def stderr_lines(res) -> list[str]:
    return [line for line in res.stderr.splitlines() if line.strip()]


def restore_params(workdir: str, step: int) -> dict:
    """Checkpoint `step`'s parameters as numpy arrays (flat dict)."""
    model = zoo.build_abstract(get_config().model)
    target = checkpoints.abstract(nnx.to_pure_dict(nnx.state(model, nnx.Param)))
    mngr = checkpoints.manager(workdir, create=False)
    try:
        params = checkpoints.restore(mngr, step, {"params": target})["params"]
    finally:
        mngr.close()
    return {jax.tree_util.keystr(k): np.asarray(v) for k, v in jax.tree_util.tree_leaves_with_path(params)}


def assert_bit_exact(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def without_speed(metrics: list[dict]) -> list[dict]:
    return [{k: v for k, v in m.items() if k != "tokens_per_second"} for m in metrics]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """An uninterrupted micro run of 4 steps (checkpoints 2 and 4) and its parameters at both steps."""
    path = str(tmp_path_factory.mktemp("base"))
    config = get_config()
    config.train.update(steps=4, eval_every=100)
    train(config, path)
    assert checkpoint_steps(path) == [2, 4]
    return path, {step: restore_params(path, step) for step in (2, 4)}


def test_unreadable_checkpoints_are_named_skipped_and_kept(base, tmp_path):
    """A truncated data file (eval.py) and a deleted params/_METADATA (train.py) in checkpoint 4: both
    name it in one line and use step 2; training moves it aside (nothing deleted) and redoes steps 3-4
    exactly as the uninterrupted run did."""
    path, ref = base
    truncated, no_metadata = str(tmp_path / "truncated"), str(tmp_path / "no_metadata")
    shutil.copytree(path, truncated)
    shutil.copytree(path, no_metadata)
    data_file = max(glob.glob(f"{truncated}/checkpoints/4/params/ocdbt.process_0/d/*"), key=os.path.getsize)
    with open(data_file, "r+b") as f:
        f.truncate(os.path.getsize(data_file) // 2)
    os.remove(f"{no_metadata}/checkpoints/4/params/_METADATA")
    files_before = sorted(os.path.relpath(f, f"{no_metadata}/checkpoints/4")
                          for f in glob.glob(f"{no_metadata}/checkpoints/4/**", recursive=True))

    res = run_script("eval.py", f"--workdir={truncated}", f"--output={tmp_path}/eval.json")
    assert res.returncode == 0, res.stderr
    assert stderr_lines(res) == [stderr_lines(res)[0]] and stderr_lines(res)[0].startswith(
        f"warning: checkpoint {truncated}/checkpoints/4 cannot be read: ")
    assert stderr_lines(res)[0].endswith("; evaluating step 2 instead"), res.stderr
    assert json.loads((tmp_path / "eval.json").read_text())["step"] == 2
    assert checkpoint_steps(truncated) == [2, 4]                     # eval moves nothing

    res = run_script("train.py", f"--config={MICRO_CONFIG}", f"--workdir={no_metadata}", *STEPS)
    assert res.returncode == 0, res.stderr
    assert len(stderr_lines(res)) == 1, res.stderr
    line = stderr_lines(res)[0]
    assert line.startswith("warning: checkpoint step 4 cannot be read (Metadata file (named _METADATA) does "
                           f"not exist at {no_metadata}/checkpoints/4/params")
    assert line.endswith(f"moved it to {no_metadata}/unreadable_checkpoints/4 and resumed from step 2")
    kept = f"{no_metadata}/unreadable_checkpoints/4"
    assert sorted(os.path.relpath(f, kept) for f in glob.glob(f"{kept}/**", recursive=True)) == files_before
    assert without_speed(read_metrics(no_metadata)) == without_speed(read_metrics(path))
    assert checkpoint_steps(no_metadata) == [2, 4]
    for step in (2, 4):
        assert_bit_exact(restore_params(no_metadata, step), ref[step])



LEFTOVERS = """
import asyncio, threading
from zoo import checkpoints
checkpoints._silence_abandoned_reads()
loop = asyncio.new_event_loop()
loop.close()
t = threading.Thread(target=lambda: loop.call_soon_threadsafe(print))   # a read done after the loop closed
t.start(); t.join()
t = threading.Thread(target=lambda: 1 / 0)                               # anything else still prints
t.start(); t.join()
"""


def test_after_an_unreadable_checkpoint_only_orbax_leftovers_are_silenced():
    """Once a checkpoint failed to read, a callback of one of Orbax's abandoned reads that finds its event
    loop closed prints nothing (the failure is reported once already); another thread's error still does."""
    res = subprocess.run([sys.executable, "-c", LEFTOVERS], cwd=ROOT, env=SUBPROCESS_ENV, capture_output=True,
                         text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert "Event loop is closed" not in res.stderr and "ZeroDivisionError" in res.stderr, res.stderr


# train.py whose Orbax writes of checkpoint 4 stop before they are committed (renamed into place): the
# process then signals the test (a marker file) and waits to be killed.
BLOCK_WRITE_OF_STEP_4 = """
import asyncio, os, runpy, sys
from orbax.checkpoint._src.path import atomicity
marker = sys.argv.pop(1)
original = atomicity.AtomicRenameTemporaryPath.finalize
async def finalize(self):
    if "/checkpoints/4." in str(self.get()):
        open(marker, "w").close()
        await asyncio.sleep(3600)
    return await original(self)
atomicity.AtomicRenameTemporaryPath.finalize = finalize
sys.argv = ["train.py", *sys.argv[1:]]
runpy.run_path("train.py", run_name="__main__")
"""


def test_sigkill_during_a_checkpoint_write(base, tmp_path):
    path, ref = base
    workdir, marker = str(tmp_path / "run"), str(tmp_path / "writing")
    proc = subprocess.Popen([sys.executable, "-c", BLOCK_WRITE_OF_STEP_4, marker, f"--config={MICRO_CONFIG}",
                             f"--workdir={workdir}", *STEPS], cwd=ROOT, env=SUBPROCESS_ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 170
    while not os.path.exists(marker) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.kill()
    assert proc.wait() == -signal.SIGKILL and os.path.exists(marker), proc.stderr.read()
    assert checkpoint_steps(workdir) == [2]                             # the half-written 4 is not a step
    assert glob.glob(f"{workdir}/checkpoints/4.orbax-checkpoint-tmp*")
    assert_bit_exact(restore_params(workdir, 2), ref[2])

    res = run_script("train.py", f"--config={MICRO_CONFIG}", f"--workdir={workdir}", *STEPS)
    assert res.returncode == 0 and stderr_lines(res) == [], res.stderr
    assert without_speed(read_metrics(workdir)) == without_speed(read_metrics(path))
    assert checkpoint_steps(workdir) == [2, 4]
    assert_bit_exact(restore_params(workdir, 4), ref[4])


# Sets the file-size limit, then becomes `python ARGS...` (exec, so no fork from a process running JAX).
LIMIT_FILE_SIZE = """
import os, resource, sys
resource.setrlimit(resource.RLIMIT_FSIZE, (60 << 10, 60 << 10))
os.execv(sys.executable, [sys.executable, *sys.argv[1:]])
"""


def test_full_disk_during_a_checkpoint_write(base, tmp_path):
    """A file-size limit (RLIMIT_FSIZE, 60 KB: the checkpoints' data files are larger) makes Orbax's writes
    of checkpoint 6 fail with EFBIG, as a full disk would."""
    path, ref = base
    workdir = str(tmp_path / "run")
    shutil.copytree(path, workdir)

    env = {**SUBPROCESS_ENV, "JAX_ENABLE_COMPILATION_CACHE": "false"}   # cache entries would hit the limit
    res = subprocess.run([sys.executable, "-c", LIMIT_FILE_SIZE, "train.py", f"--config={MICRO_CONFIG}",
                          f"--workdir={workdir}", "--config.train.steps=6", "--config.train.eval_every=100"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 1, res.stderr
    assert len(stderr_lines(res)) == 1, res.stderr
    line = stderr_lines(res)[0]
    assert line.startswith(f"error: could not write a checkpoint in {workdir}/checkpoints: ")
    assert "File too large" in line
    assert checkpoint_steps(workdir) == [2, 4]
    assert_bit_exact(restore_params(workdir, 4), ref[4])


def test_ctrl_c_during_start_up_is_one_line():
    for args, message in ((["train.py", f"--config={MICRO_CONFIG}"],
                           "error: interrupted before training started; nothing was saved"),
                          (["eval.py", "--checkpoint=/nonexistent"], "error: interrupted; no report was written")):
        proc = subprocess.Popen([sys.executable, *args], cwd=ROOT, env=SUBPROCESS_ENV, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        time.sleep(0.5)                                   # still importing absl / JAX
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == 130 and err == message + "\n", err


@pytest.mark.parametrize("args, message", [
    (["--config=configs/gemma4.py:nope"], "error: unknown gemma4 preset 'nope'"),
    (["--config=configs/gemma4.py:tiny", "--context=-5"], "error: --context must be at least 1, got -5"),
    (["--config=configs/gemma4.py:tiny", "--config.model.nokey=3"],
     "error: unknown config key 'nokey' in --config.model.nokey=3"),
])
def test_analysis_errors_are_one_line(args, message):
    res = subprocess.run([sys.executable, "-m", "zoo.analysis", *args], cwd=ROOT, env=SUBPROCESS_ENV,
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 1 and len(stderr_lines(res)) == 1, res.stderr
    assert stderr_lines(res)[0].startswith(message), res.stderr
