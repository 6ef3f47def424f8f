"""Long-context task sweeps: tasks x lengths x depths x examples per cell, for one or more models, with
results kept per cell (a rerun skips finished cells), a JSON and CSV summary, and PNG plots.

Example i of every cell is `zoo.tasks.generate(task, seed=seed + i, ...)`, so for a given task and
example the needles and their values are the same in every cell: cells differ only in length and depth.
Each cell is scored by teacher forcing (`zoo.tasks.answer_loglik`): mean answer log-probability and
exact match (greedy argmax gives every answer token). A model with a `generate_fn` is also scored as
RULER scores generations (`string_match_all` of the greedy continuation); the plots then show that.

Files in `out_dir`: `cells.jsonl` (one JSON object per finished cell, appended as it finishes),
`results.json` and `results.csv` (the cells of this sweep, COLUMNS), `heatmap_<task>.png` (depth x length,
one panel per model) and `accuracy_vs_length_<task>.png` (mean over depths, one line per model; beside it the answer's
log-probability per token).
"""
from __future__ import annotations

import csv
import dataclasses
import importlib.util
import json
import os
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm import tqdm

from zoo import checkpoints, data, inference
from zoo import tasks as task_lib

COLUMNS = ("model", "task", "length", "depth", "examples", "seed", "answer_logprob", "answer_logprob_per_token",
           "exact_match", "string_match_all")
CELLS_FILE = "cells.jsonl"
EXTRA_NEW_TOKENS = 16     # greedy generation runs for the answer's tokens plus this many


@dataclasses.dataclass
class SweepModel:
    """A model as the sweep sees it. `logits_fn(tokens_BT) -> logits_BTV`; `generate_fn(prompt_ids_BT,
    max_new_tokens) -> new ids [B, N]` (greedy), or None to score by teacher forcing alone; `haystack_N`: token ids of
    the text needles hide in (the validation split); `max_positions`: the longest sequence it may read."""
    name: str
    logits_fn: Callable
    tokenizer: object
    haystack_N: np.ndarray
    max_positions: int | None = None
    generate_fn: Callable | None = None


def model_logits_fn(model) -> Callable:
    """`tokens_BT -> logits_BTV` for a zoo Decoder, jitted (one compilation per input shape)."""
    graphdef, state = nnx.split(model)
    forward = jax.jit(lambda state, tokens_BT: nnx.merge(graphdef, state)(tokens_BT))
    return lambda tokens_BT: forward(state, jnp.asarray(tokens_BT, jnp.int32))


def load_model(path: str, *, name: str | None = None, dtype: str = "float32", attention_impl: str | None = None,
               data_overrides: dict | None = None) -> SweepModel:
    """A training workdir or zoo checkpoint as a SweepModel: its tokenizer, its corpus' validation split
    as haystack and `model.max_positions`. Named by its folder unless `name` is given."""
    config = checkpoints.read_config(path)
    for key, value in (data_overrides or {}).items():
        if value is not None:
            config.data[key] = value
    corpus = data.load_corpus(config.data)
    model = checkpoints.load(path, dtype=dtype, attention_impl=attention_impl)
    return SweepModel(name or os.path.basename(os.path.normpath(os.path.abspath(path))), model_logits_fn(model),
                      data.tokenizer(config.data.get("tokenizer", "bytes")), corpus.val_N,
                      config.model.get("max_positions"), model_generate_fn(model))


def model_generate_fn(model) -> Callable:
    """`(prompt_ids_BT, max_new_tokens) -> new ids [B, N]`: greedy `zoo.inference.generate` with the
    model's own caches."""
    return lambda prompt_ids_BT, max_new_tokens: inference.generate(model, prompt_ids_BT,
                                                                    max_new_tokens=max_new_tokens)


def check_lengths(lengths: Sequence[int], max_positions: int | None, model: str) -> list[int]:
    """The lengths as ints, failing on one that is not positive or beyond the model's positions."""
    out = []
    for n in lengths:
        if int(n) != n or n < 1:
            raise ValueError(f"length {n} is not a positive integer")
        if max_positions is not None and n > max_positions:
            raise ValueError(f"length {n} is beyond model.max_positions {max_positions} of model {model}")
        out.append(int(n))
    if not out:
        raise ValueError("no lengths given")
    return out


def _check(models, task_names, lengths, depths, examples, seed) -> tuple[list[str], list[int], list[float]]:
    """Everything a sweep can get wrong, found before any model runs: names, depths, lengths (also with
    each task's answer appended, which teacher forcing reads), lengths too short for a task."""
    if not models:
        raise ValueError("no models to sweep")
    # the plots come last; a missing matplotlib should stop the sweep before it starts
    if importlib.util.find_spec("matplotlib") is None:
        raise ImportError("the sweep's plots need matplotlib: pip install matplotlib")
    names = [m.name for m in models]
    if len(set(names)) != len(names):
        raise ValueError(f"model names must differ, got {names}")
    task_names = task_lib.check_task_names(task_names)
    depths = [task_lib.check_depth(d) for d in depths]
    if not depths:
        raise ValueError("no depths given")
    if int(examples) != examples or examples < 1:
        raise ValueError(f"examples per cell must be a positive integer, got {examples}")
    for m in models:
        lengths = check_lengths(lengths, m.max_positions, m.name)
        for task in task_names:
            for n in (min(lengths), max(lengths)):
                e = task_lib.generate(task, seed=seed, length=n, depth=depths[0], tokenizer=m.tokenizer,
                                      haystack_N=m.haystack_N)
                answer = len(e.answer_ids_A)
                extra = max(task_lib.bucket(answer) - 1,
                            0 if m.generate_fn is None else task_lib.bucket(answer + EXTRA_NEW_TOKENS))
                if m.max_positions is not None and n + extra > m.max_positions:
                    raise ValueError(f"length {n} plus task {task}'s answer needs {n + extra} positions, beyond "
                                     f"model.max_positions {m.max_positions} of model {m.name}")
    return task_names, lengths, depths


def _key(row: dict) -> tuple:
    return (row["model"], row["task"], row["length"], float(row["depth"]), row["examples"], row["seed"],
            row["string_match_all"] is not None)


def read_cells(path: str) -> list[dict]:
    """The finished cells in `path` (a torn last line, from a killed run, is dropped)."""
    if not os.path.exists(path):
        return []
    rows = []
    with open(path) as f:
        for line in f:
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                break
    return rows


def score_cell(model: SweepModel, task: str, length: int, depth: float, examples: int, seed: int,
               batch_size: int) -> dict:
    """One row of COLUMNS: the cell's examples scored in batches of `batch_size`."""
    batch = [task_lib.generate(task, seed=seed + i, length=length, depth=depth, tokenizer=model.tokenizer,
                               haystack_N=model.haystack_N) for i in range(examples)]
    scores, generations = [], []
    for start in range(0, examples, batch_size):
        chunk = batch[start:start + batch_size]
        scores += task_lib.answer_loglik(model.logits_fn, chunk)
        if model.generate_fn is not None:
            new_tokens = task_lib.bucket(max(len(e.answer_ids_A) for e in chunk) + EXTRA_NEW_TOKENS)
            new_ids_BN = np.asarray(model.generate_fn(np.stack([e.prompt_ids_T for e in chunk]), new_tokens))
            generations += [model.tokenizer.decode(ids) for ids in new_ids_BN]
    return {"model": model.name, "task": task, "length": length, "depth": depth, "examples": examples, "seed": seed,
            "answer_logprob": float(np.mean([s["logprob"] for s in scores])),
            "answer_logprob_per_token": float(np.mean([s["logprob"] / s["tokens"] for s in scores])),
            "exact_match": float(np.mean([s["exact"] for s in scores])),
            "string_match_all": (task_lib.string_match_all(generations, [e.gold for e in batch])
                                 if model.generate_fn is not None else None)}


def run_sweep(models: Sequence[SweepModel], *, tasks: Sequence[str], lengths: Sequence[int],
              depths: Sequence[float], examples: int, out_dir: str, seed: int = 0, batch_size: int = 1,
              progress: bool = True) -> list[dict]:
    """Scores every (model, task, length, depth) cell not already in `out_dir/cells.jsonl`, appending each
    as it finishes, then writes the summary and plots; returns the sweep's rows (COLUMNS)."""
    task_names, lengths, depths = _check(models, tasks, lengths, depths, examples, seed)
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    os.makedirs(out_dir, exist_ok=True)
    cells_path = os.path.join(out_dir, CELLS_FILE)
    done = {_key(r): r for r in read_cells(cells_path)}
    with open(cells_path, "w") as f:     # rewritten without a torn last line, if any
        f.writelines(json.dumps(r) + "\n" for r in done.values())
    grid = [(m, t, n, d) for m in models for t in task_names for n in lengths for d in depths]
    key = lambda m, t, n, d: (m.name, t, n, d, examples, seed, m.generate_fn is not None)
    todo = [cell for cell in grid if key(*cell) not in done]
    with open(cells_path, "a") as f, tqdm(total=len(grid), initial=len(grid) - len(todo), desc="longctx",
                                          unit="cell", disable=not progress, dynamic_ncols=True) as bar:
        for m, t, n, d in todo:
            bar.set_postfix(model=m.name, task=t, length=n, depth=d)
            row = score_cell(m, t, n, d, examples, seed, min(batch_size, examples))
            f.write(json.dumps(row) + "\n")
            f.flush()
            done[key(m, t, n, d)] = row
            bar.update(1)
    rows = [done[key(*cell)] for cell in grid]
    write_summary(rows, out_dir, {"tasks": task_names, "lengths": lengths, "depths": depths,
                                  "examples": examples, "seed": seed, "models": [m.name for m in models]})
    plot(rows, out_dir)
    return rows


def write_summary(rows: Sequence[dict], out_dir: str, settings: dict) -> None:
    """`results.json` (the settings and the rows) and `results.csv` (the rows, COLUMNS)."""
    with open(os.path.join(out_dir, "results.json"), "w") as f:
        json.dump({**settings, "columns": list(COLUMNS), "cells": list(rows)}, f, indent=1)
    with open(os.path.join(out_dir, "results.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows({c: ("" if r[c] is None else r[c]) for c in COLUMNS} for r in rows)


def accuracy(row: dict) -> float:
    """The cell's accuracy in [0, 1]: RULER's string_match_all when generation scored it, else the
    teacher-forced exact match."""
    return row["string_match_all"] / 100.0 if row["string_match_all"] is not None else row["exact_match"]


def _metric_name(rows) -> str:
    if all(r["string_match_all"] is not None for r in rows):
        return "accuracy (string_match_all of greedy generation)"
    return "accuracy (teacher-forced exact match)"


def plot(rows: Sequence[dict], out_dir: str) -> list[str]:
    """Per task, `heatmap_<task>.png` (depth x length, a panel per model) and `accuracy_vs_length_<task>.png`
    (a line per model, the length axis logarithmic); one colour per model throughout. Returns the paths."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(dict.fromkeys(r["model"] for r in rows))
    colours = {m: plt.get_cmap("tab10")(i % 10) for i, m in enumerate(models)}
    written = []
    for task in dict.fromkeys(r["task"] for r in rows):
        task_rows = [r for r in rows if r["task"] == task]
        lengths = sorted({r["length"] for r in task_rows})
        depths = sorted({float(r["depth"]) for r in task_rows})
        metric = _metric_name(task_rows)

        fig, axes = plt.subplots(1, len(models), figsize=(1.2 + 1.1 * len(lengths) * len(models) + 1.5, 4.2),
                                 squeeze=False)
        for ax, m in zip(axes[0], models):
            acc_DL = np.full((len(depths), len(lengths)), np.nan)
            for r in task_rows:
                if r["model"] == m:
                    acc_DL[depths.index(float(r["depth"])), lengths.index(r["length"])] = accuracy(r)
            image = ax.imshow(acc_DL, vmin=0.0, vmax=1.0, cmap="RdYlGn", aspect="auto")
            for (i, j), v in np.ndenumerate(acc_DL):
                if np.isfinite(v):
                    ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=8)
            ax.set_xticks(range(len(lengths)), [str(n) for n in lengths])
            ax.set_yticks(range(len(depths)), [f"{d:g}" for d in depths])
            ax.set_xlabel("context length (tokens)")
            ax.set_ylabel("needle depth (0 = start, 1 = end)")
            ax.set_title(f"{task}: {m}", color=colours[m])
        fig.colorbar(image, ax=list(axes[0]), label=metric)
        written.append(os.path.join(out_dir, f"heatmap_{task}.png"))
        fig.savefig(written[-1], dpi=100)
        plt.close(fig)

        # Left: accuracy; right: the answer's mean log-probability per token, which still separates
        # models (and lengths) where none gets answers right yet.
        fig, (ax, ax_lp) = plt.subplots(1, 2, figsize=(11, 4))
        for m in models:
            xs = [n for n in lengths if any(r["model"] == m and r["length"] == n for r in task_rows)]
            cells = [[r for r in task_rows if r["model"] == m and r["length"] == n] for n in xs]
            ax.plot(xs, [np.mean([accuracy(r) for r in c]) for c in cells], marker="o", color=colours[m], label=m)
            ax_lp.plot(xs, [np.mean([r["answer_logprob_per_token"] for r in c]) for c in cells], marker="o",
                       color=colours[m], label=m)
        for a in (ax, ax_lp):
            a.set_xscale("log", base=2)
            a.set_xticks(lengths, [str(n) for n in lengths])
            a.set_xlabel("context length (tokens, log scale)")
            a.grid(True, alpha=0.3)
            a.legend(title="model")
        ax.set_ylim(-0.02, 1.02)
        ax.set_ylabel(f"{metric}\nmean over depths")
        ax.set_title(f"{task}: accuracy vs context length")
        ax_lp.set_ylabel("answer log-probability per token (nats)\nmean over depths")
        ax_lp.set_title(f"{task}: answer log-probability vs context length")
        fig.tight_layout()
        written.append(os.path.join(out_dir, f"accuracy_vs_length_{task}.png"))
        fig.savefig(written[-1], dpi=100)
        plt.close(fig)
    return written
