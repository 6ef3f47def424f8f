"""Evaluates a training workdir or a converted zoo checkpoint on the validation split.

    python eval.py --workdir=runs/default                      # writes runs/default/eval.json
    python eval.py --checkpoint=ckpt/gemma4 --seq_lens=128,256,512 --output=sweep.json   # + sweep.csv

Reports validation loss (nats/token), bits per byte and perplexity as JSON and as a table; with
`--seq_lens`, one row per sequence length, also written as CSV next to the JSON. Data, sizes and the
device mesh default to the checkpoint's own config.json; parameters are read straight into their
shardings on that mesh (or `--mesh=data=2,fsdp=4`), and each batch is split over its batch axes.
Multi-host: one eval.py per host with `--distributed` (or `--coordinator_address=...`, README
"Sharding"); every process evaluates, process 0 alone prints and writes the files.
"""
from __future__ import annotations

import os
import signal
import sys


def _interrupted(signum, frame):
    """Ctrl-C during start-up (imports, flag parsing): one line, status 130."""
    print("error: interrupted; no report was written", file=sys.stderr, flush=True)
    os._exit(130)


signal.signal(signal.SIGINT, _interrupted)   # first thing: the imports below take seconds

import json  # noqa: E402

from absl import app, flags, logging

from zoo import distributed

_WORKDIR = flags.DEFINE_string("workdir", None, "training workdir to evaluate (its latest checkpoint)")
_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "zoo checkpoint directory (e.g. from hf-to-zoo)")
_OUTPUT = flags.DEFINE_string("output", None, "JSON output file (default: DIR/eval.json)")
_SEQ_LENS = flags.DEFINE_string("seq_lens", "", "comma-separated sequence lengths to sweep (default: "
                                "train.seq_len)")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", None, "windows per batch (default: train.batch_size)")
_EVAL_BATCHES = flags.DEFINE_integer("eval_batches", None, "validation batches (default: train.eval_batches)")
_DTYPE = flags.DEFINE_string("dtype", "float32", "parameter dtype: float32, bfloat16 or float16")
_ATTENTION_IMPL = flags.DEFINE_string("attention_impl", None, "override model.attention_impl")
_DATA_SOURCE = flags.DEFINE_string("data_source", None, "override data.source (stdlib, text, tokens)")
_DATA_PATHS = flags.DEFINE_string("data_paths", None, "override data.paths")
_TOKENIZER = flags.DEFINE_string("tokenizer", None, "override data.tokenizer (bytes or a tokenizer.json)")
_MESH = flags.DEFINE_string("mesh", "", "device mesh axis sizes, e.g. data=2,fsdp=4 (one may be -1: the "
                            "remaining devices; axes not named: 1) instead of the checkpoint's config.mesh")
# Multi-host (README "Sharding"): --distributed, --coordinator_address, --num_processes, --process_id.
_DISTRIBUTED_FLAGS = distributed.define_flags()

# --- Long-context task sweeps (zoo.tasks, zoo.sweeps; README "Long-context evaluation") ---------------
_TASKS = flags.DEFINE_string("tasks", None, "comma-separated long-context tasks to sweep instead of the "
                             "perplexity evaluation: passkey, niah_single, niah_multikey, niah_multivalue, "
                             "niah_multiquery, variable_tracking, mqar")
_LENGTHS = flags.DEFINE_string("lengths", "1024,4096,16384", "--tasks: comma-separated prompt lengths (tokens)")
_DEPTHS = flags.DEFINE_string("depths", "0,0.25,0.5,0.75,1", "--tasks: comma-separated needle depths in [0, 1]")
_EXAMPLES = flags.DEFINE_integer("examples", 4, "--tasks: examples per (task, length, depth) cell")
_WORKDIRS = flags.DEFINE_string("workdirs", "", "--tasks: more comma-separated workdirs/checkpoints, one line "
                                "per model on the same plots")
_LONGCTX_DIR = flags.DEFINE_string("longctx_dir", None, "--tasks: output folder (default: DIR/longctx of the "
                                   "first model)")
_LONGCTX_SEED = flags.DEFINE_integer("longctx_seed", 0, "--tasks: example i of each cell uses seed this + i")


def run_longctx() -> None:
    """The `--tasks` sweep: every model (--workdir/--checkpoint, then --workdirs) over tasks x lengths x
    depths, on one device, scored by teacher forcing and by greedy generation (RULER string_match_all);
    bad input ends with one line on stderr before any model runs."""
    from zoo import checkpoints, sweeps, tasks
    from zoo.train import enable_compilation_cache

    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)
    enable_compilation_cache()
    paths = [p for p in (_WORKDIR.value, _CHECKPOINT.value) if p] + [
        p.strip() for p in _WORKDIRS.value.split(",") if p.strip()]
    try:
        task_names = tasks.check_task_names(_TASKS.value.split(","))
        try:
            lengths = [int(n) for n in _LENGTHS.value.split(",") if n.strip()]
            depths = [float(d) for d in _DEPTHS.value.split(",") if d.strip()]
        except ValueError:
            raise ValueError(f"--lengths must be integers and --depths numbers, got {_LENGTHS.value!r} and "
                             f"{_DEPTHS.value!r}") from None
        depths = [tasks.check_depth(d) for d in depths]
        if not paths:
            raise ValueError("give --workdir, --checkpoint or --workdirs")
        names = [os.path.basename(os.path.normpath(os.path.abspath(p))) for p in paths]
        names = [n if names.count(n) == 1 else f"{n}_{i}" for i, n in enumerate(names)]
        for path, name in zip(paths, names):   # lengths against positions before any parameters are read
            sweeps.check_lengths(lengths, checkpoints.read_config(path).model.get("max_positions"), name)
        overrides = {"source": _DATA_SOURCE.value, "paths": _DATA_PATHS.value, "tokenizer": _TOKENIZER.value}
        models = [sweeps.load_model(path, name=name, dtype=_DTYPE.value, attention_impl=_ATTENTION_IMPL.value,
                                    data_overrides=overrides) for path, name in zip(paths, names)]
        out_dir = _LONGCTX_DIR.value or os.path.join(paths[0], "longctx")
        rows = sweeps.run_sweep(models, tasks=task_names, lengths=lengths, depths=depths,
                                examples=_EXAMPLES.value, out_dir=out_dir, seed=_LONGCTX_SEED.value,
                                batch_size=_BATCH_SIZE.value or 1)
    except (ValueError, FileNotFoundError, ImportError) as e:
        fail(e)
    for row in rows:
        print(f"{row['model']:>12} {row['task']:>18} {row['length']:>7} depth {row['depth']:<5g} "
              f"exact {row['exact_match']:.2f}  answer log-prob {row['answer_logprob']:.2f}")
    print(f"wrote {out_dir}/results.json, results.csv and plots")
# --- end of long-context task sweeps ----------------------------------------------------------------

# --- Memory Sparse Attention: retrieval against bank size (zoo.memory; README "Memory Sparse Attention") ---
_MEMORY = flags.DEFINE_bool("memory", False, "sweep the memory bank size of an MSA model (a config with a "
                            "`memory` section) instead of the perplexity evaluation")
_MEMORY_SIZES = flags.DEFINE_string("memory_sizes", "16384,65536,262144,1048576", "--memory: comma-separated "
                                    "bank sizes (tokens)")
_MEMORY_QUERIES = flags.DEFINE_integer("memory_queries", 64, "--memory: queries (distinct keys) per bank size")
_MEMORY_DIR = flags.DEFINE_string("memory_dir", None, "--memory: output folder (default: DIR/memory_sweep)")


def run_memory_sweep() -> None:
    """The `--memory` sweep: the model of --workdir/--checkpoint against banks of growing size on one
    device (router keys on it, content K/V in host memory); writes results.json/.csv/.png."""
    from zoo import checkpoints, data, memory
    from zoo.train import enable_compilation_cache

    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)
    enable_compilation_cache()
    path = _WORKDIR.value or _CHECKPOINT.value
    try:
        if path is None:
            raise ValueError("--memory needs --workdir or --checkpoint")
        try:
            sizes = sorted(int(n) for n in _MEMORY_SIZES.value.split(",") if n.strip())
        except ValueError:
            raise ValueError(f"--memory_sizes must be integers, got {_MEMORY_SIZES.value!r}") from None
        if not sizes or sizes[0] < 1:
            raise ValueError(f"--memory_sizes must be positive token counts, got {_MEMORY_SIZES.value!r}")
        config = checkpoints.read_config(path)
        if "memory" not in config:
            raise ValueError(f"{path}/config.json has no memory section (train with configs/msa.py)")
        task = memory.MemoryTask.from_config(config)
        corpus = data.load_corpus(config.data)
        model = checkpoints.load(path, dtype=_DTYPE.value, attention_impl=_ATTENTION_IMPL.value)
        rows = memory.bank_sweep(model, task, corpus.val_N, sizes=sizes, num_queries=_MEMORY_QUERIES.value,
                                 seed=_LONGCTX_SEED.value, batch_size=_BATCH_SIZE.value or 8,
                                 reinject_docs=config.memory.get("reinject_docs", 0))
        written = memory.write_sweep(rows, _MEMORY_DIR.value or os.path.join(path, "memory_sweep"))
    except (ValueError, FileNotFoundError, ImportError) as e:
        fail(e)
    for r in rows:
        print(f"bank {r['bank_tokens']:>10} tokens ({r['bank_docs']} docs): recall {r['routing_recall']:.3f}, "
              f"answer accuracy {r['answer_accuracy']:.3f}, routing {r['route_ms_per_query']:.3f} ms/query, "
              f"device {r['device_bytes']} B, host {r['host_bytes']} B")
    print("wrote " + ", ".join(written))
# --- end of the memory sweep ------------------------------------------------------------------------


def fail(message) -> None:
    """Ends the program with one line on stderr."""
    print(f"error: {' '.join(str(message).split())}", file=sys.stderr)
    sys.exit(1)


def parse_flags(argv):
    try:
        return flags.FLAGS(argv)
    except flags.Error as e:
        fail(e)


def parse_seq_lens(text: str) -> list[int]:
    """`--seq_lens` as a list (empty: the checkpoint's train.seq_len)."""
    try:
        seq_lens = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise ValueError(f"--seq_lens must be comma-separated integers, got {text!r}") from None
    if any(n < 1 for n in seq_lens):
        raise ValueError(f"--seq_lens must be positive, got {text!r}")
    return seq_lens


def parse_mesh(text: str) -> dict | None:
    """`--mesh` as axis sizes (`zoo.sharding.parse_mesh`); empty: None, the checkpoint's config.mesh."""
    from zoo.sharding import parse_mesh as parse   # lazily, as in run()

    return parse(text) or None


def positive_flag(flag) -> int | None:
    """The value of an integer flag that must be at least 1 when given (None: not given)."""
    if flag.value is not None and flag.value < 1:
        raise ValueError(f"--{flag.name} must be at least 1, got {flag.value}")
    return flag.value


def evaluate_checkpoint(path: str, seq_lens: list[int], mesh_sizes: dict | None = None) -> dict:
    """The evaluation report of the newest readable checkpoint at `path` (JSON-ready), on a mesh of
    `mesh_sizes` (None: the checkpoint's config.mesh); the top-level numbers are those of the first
    sequence length. A newer checkpoint that cannot be read is named in a warning on stderr."""
    from zoo import checkpoints, data, dtypes, sharding
    from zoo.evaluate import evaluate

    dtype = dtypes.resolve(_DTYPE.value, "--dtype")
    batch_size = positive_flag(_BATCH_SIZE)
    num_batches = positive_flag(_EVAL_BATCHES)
    config = checkpoints.read_config(path)
    for key, flag in (("source", _DATA_SOURCE), ("paths", _DATA_PATHS), ("tokenizer", _TOKENIZER)):
        if flag.value is not None:
            config.data[key] = flag.value
    seq_lens = seq_lens or [config.train.seq_len]
    max_positions = config.model.get("max_positions")
    if max_positions is not None and max(seq_lens) > max_positions:
        culprit = "--seq_lens" if _SEQ_LENS.value else f"train.seq_len in {path}/config.json"
        raise ValueError(f"{culprit}: sequence length {max(seq_lens)} exceeds model.max_positions {max_positions}")
    batch_size = batch_size or config.train.batch_size
    num_batches = num_batches or config.train.eval_batches
    try:
        mesh = sharding.make_mesh(mesh_sizes if mesh_sizes is not None else config.get("mesh", {}))
    except ValueError as e:
        if mesh_sizes is not None:
            raise
        raise ValueError(f"the checkpoint's config.mesh: {e}; choose a mesh with --mesh (e.g. --mesh=data=-1)"
                         ) from None
    rules = sharding.resolve_rules(config.get("sharding_rules", sharding.DEFAULT_RULES))
    sharding.check_batch_splits(batch_size, sharding.batch_sharding(mesh, rules),   # before the (slow) restore
                       "--batch_size" if _BATCH_SIZE.value else "train.batch_size")
    corpus = data.load_corpus(config.data)
    model, step, unreadable = checkpoints.load_with_step(path, dtype=dtype, attention_impl=_ATTENTION_IMPL.value,
                                                         mesh=mesh, rules=rules)
    for e in unreadable:
        if distributed.is_primary():
            print(f"warning: {e}; evaluating step {step} instead", file=sys.stderr)
    rows = evaluate(model, corpus, seq_lens=seq_lens, num_batches=num_batches, batch_size=batch_size,
                    mesh=mesh, rules=rules)
    return {"checkpoint": os.path.abspath(path), "step": step,
            "family": config.model.family, "dtype": dtype, "data": config.data.to_dict(),
            "bytes_per_token": corpus.bytes_per_token, "batch_size": batch_size, "eval_batches": num_batches,
            **rows[0], "sweep": rows}


def main(argv) -> None:
    if len(argv) > 1:
        fail(f"unexpected arguments {argv[1:]}")
    if _TASKS.value is not None:   # long-context task sweeps (run_longctx above)
        return run_longctx()
    if _MEMORY.value:              # memory bank sweep (run_memory_sweep above)
        return run_memory_sweep()
    if (_WORKDIR.value is None) == (_CHECKPOINT.value is None):
        fail("give exactly one of --workdir or --checkpoint")
    if not flags.FLAGS["verbosity"].present:
        # Orbax logs every checkpoint step at INFO, and a failed write at ERROR with tracebacks from each of
        # its threads; the failure reaches us as an exception and is reported in one line.
        logging.set_verbosity(logging.FATAL)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        run()
    except KeyboardInterrupt:
        print("error: interrupted; no report was written", file=sys.stderr)
        sys.exit(130)


def run() -> None:
    try:
        distributed.maybe_initialize_distributed(**_DISTRIBUTED_FLAGS())
    except distributed.InitializationError as e:
        fail(e)
    # Imported after flag parsing so `--help` and flag errors answer without loading Flax, Orbax and the
    # model code (seconds); there is no import cycle to avoid.
    from zoo.evaluate import format_table, write_csv
    from zoo.train import enable_compilation_cache

    enable_compilation_cache()
    path = _WORKDIR.value or _CHECKPOINT.value
    try:
        report = evaluate_checkpoint(path, parse_seq_lens(_SEQ_LENS.value), parse_mesh(_MESH.value))
    except (ValueError, OSError, ImportError, KeyError) as e:
        fail(e)
    if not distributed.is_primary():   # every process computed the report (collectives); one writes it
        return
    output = _OUTPUT.value or os.path.join(path, "eval.json")
    try:
        os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
        with open(output + ".tmp", "w") as f:
            json.dump(report, f, indent=2)
        os.replace(output + ".tmp", output)
    except OSError as e:
        fail(f"--output {output}: {e}")
    print(f"{report['family']} checkpoint {report['checkpoint']} (step {report['step']}), "
          f"{report['eval_batches']} batches of {report['batch_size']}:")
    print(format_table(report["sweep"]))
    print(f"wrote {output}")
    if _SEQ_LENS.value:
        csv_path = os.path.splitext(output)[0] + ".csv"
        write_csv(report["sweep"], csv_path)
        print(f"wrote {csv_path}")


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
