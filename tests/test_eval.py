"""eval.py and zoo.evaluate: the reported fields, their consistency with training, sweeps and errors."""
from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys

import pytest

import zoo
from tests.conftest import ROOT, SUBPROCESS_ENV, get_config, read_metrics, run_script
from tests.test_distributed import run_processes
from zoo import checkpoints, data
from zoo.evaluate import COLUMNS, evaluate, format_table
from zoo.train import train

FIELDS = {"checkpoint", "step", "family", "dtype", "data", "bytes_per_token", "batch_size", "eval_batches",
          "seq_len", "val_loss", "val_bits_per_byte", "val_perplexity", "tokens", "sweep"}


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A micro run of 3 steps whose last step is an eval step."""
    path = str(tmp_path_factory.mktemp("run"))
    config = get_config()
    config.train.steps = 3
    train(config, path)
    return path


def test_eval_workdir_with_sweep(workdir):
    res = run_script("eval.py", f"--workdir={workdir}", "--seq_lens=32,16")
    assert res.returncode == 0, res.stderr
    with open(os.path.join(workdir, "eval.json")) as f:
        report = json.load(f)
    assert FIELDS <= set(report)
    assert report["step"] == 3 and report["seq_len"] == 32 and [r["seq_len"] for r in report["sweep"]] == [32, 16]
    for row in report["sweep"]:
        assert row["val_bits_per_byte"] == pytest.approx(row["val_loss"] / math.log(2))
        assert row["val_perplexity"] == pytest.approx(math.exp(row["val_loss"]))
        assert row["tokens"] == 2 * 4 * row["seq_len"]    # eval_batches x batch_size x seq_len
    # The same batches and parameters as the training run's last eval step give the same loss.
    assert report["val_loss"] == pytest.approx(read_metrics(workdir)[-1]["val_loss"], rel=1e-5)
    with open(os.path.join(workdir, "eval.csv")) as f:
        rows = list(csv.DictReader(f))
    assert [int(r["seq_len"]) for r in rows] == [32, 16] and set(rows[0]) == set(COLUMNS)
    assert "val_bits_per_byte" in res.stdout and "wrote" in res.stdout


def test_eval_converted_checkpoint(tmp_path):
    """Its config's mesh (fsdp=2) needs two devices; `--mesh` gives another."""
    model = zoo.build(get_config().model, seed=1)
    config = get_config()
    config.mesh.update(data=1, fsdp=2)
    path = checkpoints.save_model(model, str(tmp_path / "ckpt"), config=config)
    output = str(tmp_path / "out" / "report.json")
    args = (f"--checkpoint={path}", f"--output={output}", "--eval_batches=1", "--batch_size=2")
    res = run_script("eval.py", *args)
    assert res.returncode == 1 and res.stderr.strip() == (
        "error: the checkpoint's config.mesh: mesh {'data': 1, 'fsdp': 2, 'tensor': 1, 'expert': 1} needs 2 "
        "devices, 1 are available; choose a mesh with --mesh (e.g. --mesh=data=-1)"), res.stderr
    res = run_script("eval.py", *args, "--mesh=fsdp=-1")
    assert res.returncode == 0, res.stderr
    with open(output) as f:
        report = json.load(f)
    assert report["step"] == 0 and report["tokens"] == 2 * 32 and len(report["sweep"]) == 1
    assert not os.path.exists(str(tmp_path / "out" / "report.csv"))    # CSV only for sweeps


@pytest.mark.parametrize("args, message", [
    ([], "give exactly one of --workdir or --checkpoint"),
    (["--checkpoint=/nonexistent/ckpt"], "no such checkpoint directory: /nonexistent/ckpt"),
    (["--checkpoint=/tmp", "--seq_lens=8,x"], "--seq_lens must be comma-separated integers"),
    (["--checkpoint=/tmp", "--mesh=data=2,model=4"], "--mesh: unknown mesh axis 'model' in 'data=2,model=4'"),
    (["--checkpoint=/tmp", "--mesh=fsdp"], "--mesh: a mesh must look like data=2,fsdp=4"),
    (["--checkpoint=/tmp", "--distributed"], "jax.distributed.initialize() failed: "),   # no cluster here
    (["--checkpoint=/tmp", "--batch_size=0"], "--batch_size must be at least 1, got 0"),
    (["--checkpoint=/tmp", "--eval_batches=-1"], "--eval_batches must be at least 1, got -1"),
    (["--checkpoint=/tmp", "--dtype=float8"], "unknown --dtype 'float8'"),
])
def test_eval_errors_are_one_line(args, message):
    res = run_script("eval.py", *args)
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert res.returncode == 1 and len(lines) == 1 and message in lines[0], res.stderr


def test_sequence_length_past_max_positions_is_refused(workdir):
    res = run_script("eval.py", f"--workdir={workdir}", "--seq_lens=32,1000")
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert res.returncode == 1 and lines == ["error: --seq_lens: sequence length 1000 exceeds model.max_positions "
                                             "512"], res.stderr


# eval.py as a process other than process 0: zoo.distributed.is_primary() False, evaluate() counted.
NOT_PRIMARY = """
import runpy, sys
import zoo.distributed, zoo.evaluate
zoo.distributed.is_primary = lambda: False
evaluate = zoo.evaluate.evaluate
def counted(*args, **kwargs):
    rows = evaluate(*args, **kwargs)
    print("evaluated", len(rows), "rows")
    return rows
zoo.evaluate.evaluate = counted
sys.argv = ["eval.py", *sys.argv[1:]]
runpy.run_path("eval.py", run_name="__main__")
"""


def test_other_processes_evaluate_but_write_and_print_nothing(workdir, tmp_path):
    output = tmp_path / "eval.json"
    res = subprocess.run([sys.executable, "-c", NOT_PRIMARY, f"--workdir={workdir}", f"--output={output}",
                          "--seq_lens=32,16"], cwd=ROOT, env=SUBPROCESS_ENV, capture_output=True, text=True,
                         timeout=180)
    assert res.returncode == 0, res.stderr
    assert res.stdout == "evaluated 2 rows\n"      # computed (collectives need every process); no table
    assert os.listdir(tmp_path) == []


def test_two_processes_evaluate_together_and_process_zero_writes(workdir, tmp_path):
    """A real two-process CPU job (one device each; the checkpoint's mesh data=-1 spans both)."""
    results = run_processes(["eval.py", f"--workdir={workdir}", f"--output={tmp_path}/p{{i}}.json"])
    for returncode, _, stderr in results:
        assert returncode == 0, stderr
    assert os.listdir(tmp_path) == ["p0.json"]
    printed = [[line for line in out.splitlines() if not line.startswith("[Gloo]")] for _, out, _ in results]
    assert printed[0][-1] == f"wrote {tmp_path}/p0.json" and printed[1] == []
    with open(tmp_path / "p0.json") as f:
        report = json.load(f)
    assert report["val_loss"] == pytest.approx(read_metrics(workdir)[-1]["val_loss"], rel=1e-5)


def test_evaluate_rows_and_table(workdir):
    model = zoo.load(workdir)
    corpus = data.load_corpus(get_config().data)
    rows = evaluate(model, corpus, seq_lens=[8], num_batches=1, batch_size=2)
    assert list(rows[0]) == list(COLUMNS) and rows[0]["tokens"] == 16
    table = format_table(rows).splitlines()
    assert table[0].split() == list(COLUMNS) and table[1].split()[0] == "8"
    with pytest.raises(ValueError, match="fewer than seq_len"):
        evaluate(model, corpus, seq_lens=[len(corpus.val_N)], num_batches=1, batch_size=1)
