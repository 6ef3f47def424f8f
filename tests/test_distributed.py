"""zoo.distributed: when and how jax.distributed.initialize is called, the flags of both parsers, and
which process writes files."""
from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys

import jax
import pytest
from absl import flags

import zoo
from tests.conftest import ROOT, SUBPROCESS_ENV, get_config
from zoo import checkpoints, distributed


@pytest.fixture
def calls(monkeypatch):
    """The keyword arguments of each jax.distributed.initialize call (none made for real)."""
    made = []
    monkeypatch.setattr(jax.distributed, "initialize", lambda **kwargs: made.append(kwargs))
    monkeypatch.delenv(distributed.ENV_COORDINATOR, raising=False)
    return made


def test_not_initialized_without_a_flag_or_the_environment(calls):
    assert distributed.maybe_initialize_distributed() is False
    assert distributed.maybe_initialize_distributed(distributed=False, coordinator_address=None) is False
    assert calls == []


@pytest.mark.parametrize("values, kwargs", [
    (dict(distributed=True), {}),
    (dict(coordinator_address="host0:1234", num_processes=4, process_id=3),
     dict(coordinator_address="host0:1234", num_processes=4, process_id=3)),
    (dict(num_processes=2, process_id=0), dict(num_processes=2, process_id=0)),   # any flag implies it
])
def test_flags_are_passed_through(calls, values, kwargs):
    assert distributed.maybe_initialize_distributed(**values) is True
    assert calls == [kwargs]


def test_the_environment_alone_initializes(calls, monkeypatch):
    """JAX_COORDINATOR_ADDRESS set: initialize() with no arguments, JAX reads the environment itself."""
    monkeypatch.setenv(distributed.ENV_COORDINATOR, "host0:1234")
    assert distributed.maybe_initialize_distributed() is True
    assert calls == [{}]


def test_a_failure_is_one_line(monkeypatch):
    def fail(**kwargs):
        raise RuntimeError("DEADLINE_EXCEEDED: barrier timed out\n  waiting for 3 tasks")
    monkeypatch.setattr(jax.distributed, "initialize", fail)
    with pytest.raises(distributed.InitializationError) as info:
        distributed.maybe_initialize_distributed(coordinator_address="host0:1234", process_id=1)
    assert str(info.value) == ("jax.distributed.initialize(coordinator_address='host0:1234', process_id=1) "
                               "failed: DEADLINE_EXCEEDED: barrier timed out waiting for 3 tasks")


def test_absl_and_argparse_flags_give_the_same_values(calls):
    fv = flags.FlagValues()
    values = distributed.define_flags(fv)
    parser = argparse.ArgumentParser()
    distributed.add_arguments(parser)
    argv = ["--coordinator_address=h:1", "--num_processes=2", "--process_id=1"]
    fv(["prog", *argv])
    expected = dict(distributed=False, coordinator_address="h:1", num_processes=2, process_id=1)
    assert values() == distributed.arguments(parser.parse_args(argv)) == expected
    fv(["prog", "--distributed"])
    assert values()["distributed"] and distributed.arguments(parser.parse_args(["--distributed"]))["distributed"]
    unset = dict(distributed=False, coordinator_address=None, num_processes=None, process_id=None)
    assert distributed.arguments(parser.parse_args([])) == unset


def test_is_primary_is_process_zero(monkeypatch):
    assert distributed.is_primary()
    monkeypatch.setattr(jax, "process_index", lambda: 1)
    assert not distributed.is_primary()


def test_save_model_on_other_processes_saves_shards_but_no_config(tmp_path, monkeypatch):
    monkeypatch.setattr(distributed, "is_primary", lambda: False)
    checkpoints.save_model(zoo.build(get_config().model, seed=0), str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == ["checkpoints"] and os.listdir(tmp_path / "checkpoints") == ["0"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def run_processes(command: list[str], num_processes: int = 2, timeout: float = 240) -> list[tuple]:
    """`command` (argv after the interpreter) as `num_processes` processes of one CPU job (one device
    each), each with its own --process_id (and '{i}' in an argument replaced by it); (returncode,
    stdout, stderr) per process."""
    port = free_port()
    env = {k: v for k, v in SUBPROCESS_ENV.items() if k not in ("XLA_FLAGS", distributed.ENV_COORDINATOR)}
    procs = [subprocess.Popen(
        [sys.executable, *[a.replace("{i}", str(i)) for a in command], f"--coordinator_address=localhost:{port}",
         f"--num_processes={num_processes}", f"--process_id={i}"], cwd=ROOT, env=env, text=True,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE) for i in range(num_processes)]
    results = []
    try:
        for p in procs:
            out, err = p.communicate(timeout=timeout)
            results.append((p.returncode, out, err))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    return results
