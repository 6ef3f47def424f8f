"""zoo.sweeps on a randomly initialised micro model: the files and their columns, the plots, reruns that
skip finished cells, the generation hook, and eval.py's one-line errors."""
from __future__ import annotations

import csv
import json
import os

import numpy as np
import pytest

import zoo
from tests.conftest import get_config, run_script
from zoo import checkpoints, data, sweeps, tasks

TASKS, LENGTHS, DEPTHS, EXAMPLES = ["passkey", "mqar"], [256, 384], [0.0, 1.0], 2


@pytest.fixture(scope="module")
def micro():
    """The micro model, its jitted logits (shared, so each input shape compiles once per module), the byte
    tokenizer and a haystack of Python source (this package's, instead of reading the whole stdlib)."""
    config = get_config()
    model = zoo.build(config.model, seed=0)
    tok = data.tokenizer("bytes")
    with open(sweeps.__file__, "rb") as f:
        haystack_N = np.frombuffer(f.read(), np.uint8).astype(np.int32)
    return config, model, tok, haystack_N, sweeps.model_logits_fn(model)


def sweep_model(micro, name="micro", generate_fn=None, calls=None):
    config, model, tok, haystack_N, logits_fn = micro

    def counted(tokens_BT):
        if calls is not None:
            calls.append(tokens_BT.shape)
        return logits_fn(tokens_BT)

    return sweeps.SweepModel(name, counted, tok, haystack_N, config.model.max_positions, generate_fn)


def test_sweep_files_columns_plots_and_rerun(micro, tmp_path):
    out = str(tmp_path / "longctx")
    calls = []
    rows = sweeps.run_sweep([sweep_model(micro, calls=calls)], tasks=TASKS, lengths=LENGTHS, depths=DEPTHS,
                            examples=EXAMPLES, out_dir=out, batch_size=2, progress=False)
    assert len(rows) == len(calls) == len(TASKS) * len(LENGTHS) * len(DEPTHS)   # one batch of 2 per cell
    with open(os.path.join(out, "results.csv")) as f:
        table = list(csv.DictReader(f))
    assert tuple(table[0]) == sweeps.COLUMNS and len(table) == len(rows)
    assert {(r["task"], int(r["length"]), float(r["depth"])) for r in table} == {
        (t, n, d) for t in TASKS for n in LENGTHS for d in DEPTHS}
    for r in table:
        assert r["model"] == "micro" and int(r["examples"]) == EXAMPLES and r["string_match_all"] == ""
        assert float(r["answer_logprob"]) < 0 and 0.0 <= float(r["exact_match"]) <= 1.0
        # A random model spreads probability thinly: about ln(256) nats per answer token.
        assert 3.0 < -float(r["answer_logprob_per_token"]) < 9.0
    with open(os.path.join(out, "results.json")) as f:
        report = json.load(f)
    assert report["tasks"] == TASKS and report["lengths"] == LENGTHS and report["models"] == ["micro"]
    assert report["columns"] == list(sweeps.COLUMNS) and report["cells"] == rows
    for task in TASKS:
        for kind in ("heatmap", "accuracy_vs_length"):
            with open(os.path.join(out, f"{kind}_{task}.png"), "rb") as f:
                assert f.read(8) == b"\x89PNG\r\n\x1a\n"

    # The teacher-forced score agrees with scoring the cell's examples directly.
    e = [tasks.generate("passkey", seed=i, length=256, depth=0.0, tokenizer=micro[2], haystack_N=micro[3])
         for i in range(EXAMPLES)]
    direct = tasks.answer_loglik(micro[4], e)
    first = next(r for r in rows if r["task"] == "passkey" and r["length"] == 256 and r["depth"] == 0.0)
    assert first["answer_logprob"] == pytest.approx(np.mean([s["logprob"] for s in direct]), rel=1e-5)

    # Interrupted: a torn last line. The rerun, with one more depth, scores only the new cells.
    with open(os.path.join(out, sweeps.CELLS_FILE), "a") as f:
        f.write('{"model": "micro", "task": "pas')
    calls.clear()
    rows2 = sweeps.run_sweep([sweep_model(micro, calls=calls)], tasks=TASKS, lengths=LENGTHS,
                             depths=DEPTHS + [0.5], examples=EXAMPLES, out_dir=out, batch_size=2, progress=False)
    assert len(calls) == len(TASKS) * len(LENGTHS) and len(rows2) == len(rows) + len(calls)
    assert [r for r in rows2 if r["depth"] != 0.5] == rows
    assert len(sweeps.read_cells(os.path.join(out, sweeps.CELLS_FILE))) == len(rows2)


def test_two_models_and_generation_hook(micro, tmp_path):
    """Two models on the same plots; a model with a generate_fn also gets string_match_all. The generate_fn
    here is a plain greedy loop over full forward passes (no cache), standing in for zoo.generate."""
    config, _, tok, haystack_N, logits_fn = micro
    other = sweeps.SweepModel("other", sweeps.model_logits_fn(zoo.build(config.model, seed=1)), tok, haystack_N,
                              config.model.max_positions)
    def greedy(prompt_BT, max_new_tokens):
        B, T = prompt_BT.shape
        buffer_BS = np.zeros((B, T + max_new_tokens), np.int32)
        buffer_BS[:, :T] = prompt_BT
        for t in range(T, T + max_new_tokens):
            buffer_BS[:, t] = np.asarray(logits_fn(buffer_BS)[:, t - 1]).argmax(-1)
        return buffer_BS[:, T:]

    out = str(tmp_path / "two")
    rows = sweeps.run_sweep([sweep_model(micro, generate_fn=greedy), other], tasks=["passkey"], lengths=[256],
                            depths=[0.5], examples=1, out_dir=out, progress=False)
    assert [r["model"] for r in rows] == ["micro", "other"]
    assert 0.0 <= rows[0]["string_match_all"] <= 100.0 and rows[1]["string_match_all"] is None
    assert os.path.exists(os.path.join(out, "accuracy_vs_length_passkey.png"))


@pytest.mark.parametrize("kw, message", [
    (dict(tasks=["passkey", "needle"]), "unknown task 'needle'; expected one of passkey, niah_single"),
    (dict(depths=[0.5, 1.5]), r"depth 1.5 is outside \[0, 1\]"),
    (dict(depths=[-0.1]), r"depth -0.1 is outside \[0, 1\]"),
    (dict(lengths=[256, 1024]), "length 1024 is beyond model.max_positions 512 of model micro"),
    (dict(lengths=[510]), "length 510 plus task passkey's answer needs 541 positions, beyond model.max_positions "
                          "512"),
    (dict(lengths=[100]), "task passkey: length 100 is too short"),
])
def test_bad_sweeps_fail_before_running(micro, tmp_path, kw, message):
    calls = []
    args = dict(tasks=["passkey"], lengths=[256], depths=[0.5], examples=1, out_dir=str(tmp_path), progress=False)
    with pytest.raises(ValueError, match=message):
        sweeps.run_sweep([sweep_model(micro, calls=calls)], **{**args, **kw})
    assert not calls


def test_eval_py_bad_input_is_one_line(tmp_path):
    """eval.py --tasks: a bad task name, or a length beyond the model's positions (read from config.json
    alone, before any parameters), is one line on stderr."""
    checkpoints.write_config(get_config(), str(tmp_path / "micro"))
    for args, message in [(["--tasks=passkey,needle"], "error: unknown task 'needle'; expected one of passkey"),
                          (["--tasks=passkey", "--lengths=256,4096"],
                           "error: length 4096 is beyond model.max_positions 512 of model micro")]:
        res = run_script("eval.py", f"--workdir={tmp_path / 'micro'}", *args)
        lines = [line for line in res.stderr.splitlines() if line.strip()]
        assert res.returncode == 1 and len(lines) == 1 and lines[0].startswith(message), res.stderr


def test_eval_py_sweep_two_models(tmp_path):
    """eval.py --tasks on two checkpoints: DIR/longctx of the first holds the JSON, the CSV (a row per model
    and cell) and the plots; a rerun finds every cell done."""
    for name, seed in (("a", 0), ("b", 1)):
        checkpoints.save_model(zoo.build(get_config().model, seed=seed), str(tmp_path / name), config=get_config())
    args = (f"--workdir={tmp_path / 'a'}", f"--workdirs={tmp_path / 'b'}", "--tasks=passkey", "--lengths=256,300",
            "--depths=0,1", "--examples=1")
    res = run_script("eval.py", *args, timeout=600)
    assert res.returncode == 0, res.stderr
    out = tmp_path / "a" / "longctx"
    with open(out / "results.csv") as f:
        table = list(csv.DictReader(f))
    assert tuple(table[0]) == sweeps.COLUMNS
    assert [(r["model"], int(r["length"]), float(r["depth"])) for r in table] == [
        (m, n, d) for m in "ab" for n in (256, 300) for d in (0.0, 1.0)]
    assert json.loads((out / "results.json").read_text())["models"] == ["a", "b"]
    assert (out / "heatmap_passkey.png").exists() and (out / "accuracy_vs_length_passkey.png").exists()
    res = run_script("eval.py", *args, timeout=600)
    assert res.returncode == 0 and "8/8" in res.stderr and len((out / "cells.jsonl").read_text().splitlines()) == 8
