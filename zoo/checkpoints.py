"""The zoo checkpoint layout, shared by training workdirs and converted checkpoints:

    DIR/config.json               the full config (`model`, `train`, `optimizer`, `data`)
    DIR/checkpoints/<step>/       Orbax items: `params` (always), `opt_state` (training runs)

A training workdir is therefore a zoo checkpoint. Parameters are stored as the model's pure dict
(`nnx.to_pure_dict(nnx.state(model, nnx.Param))`). All restoring goes through `restore`, which fills
abstract targets (shape, dtype and sharding), so loading never materialises a model twice and a sharded
target can be passed later.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import sys
import threading
import traceback
from collections.abc import Iterator

import jax
import ml_collections
import orbax.checkpoint as ocp
from etils import epath
from flax import nnx
from jax.experimental import multihost_utils

from zoo import distributed, dtypes, sharding
from zoo.defaults import default_config
from zoo.models import build_abstract

CONFIG_FILE = "config.json"
CHECKPOINT_DIR = "checkpoints"
ITEMS = ("params", "opt_state")
log = logging.getLogger(__name__)


def write_config(config, directory: str) -> None:
    """Writes `directory/config.json` atomically (a crash never leaves half a file)."""
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, CONFIG_FILE)
    with open(path + ".tmp", "w") as f:
        f.write(config.to_json_best_effort(indent=2, sort_keys=True) + "\n")
    os.replace(path + ".tmp", path)


def read_config(directory: str) -> ml_collections.ConfigDict:
    """The full config of a zoo checkpoint, with clear errors for a missing directory or file."""
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"no such checkpoint directory: {directory}")
    path = os.path.join(directory, CONFIG_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{directory} has no {CONFIG_FILE}; is it a zoo checkpoint or training workdir?")
    try:
        with open(path) as f:
            raw = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{path} does not hold a JSON object")
    config = ml_collections.ConfigDict(raw)
    if "model" not in config:
        raise ValueError(f"{path} has no `model` section")
    return config


def manager(directory: str, *, keep: int | None = None, create: bool = True) -> ocp.CheckpointManager:
    """The Orbax manager of `directory/checkpoints`, keeping the newest `keep` steps (None: all)."""
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=create)
    return ocp.CheckpointManager(os.path.abspath(os.path.join(directory, CHECKPOINT_DIR)),
                                 item_names=ITEMS, options=options)


def _existing_manager(path: str) -> tuple[ocp.CheckpointManager, int]:
    """The manager of an existing checkpoint directory and its latest step, or a clear error."""
    if not os.path.isdir(os.path.join(path, CHECKPOINT_DIR)):
        read_config(path)   # names a missing directory or config.json first
        raise FileNotFoundError(f"{path} has no {CHECKPOINT_DIR}/ folder")
    mngr = manager(path, create=False)
    step = mngr.latest_step()
    if step is None:
        mngr.close()
        raise FileNotFoundError(f"{os.path.join(path, CHECKPOINT_DIR)} holds no finished checkpoint")
    return mngr, step


def latest_step(path: str) -> int:
    """The newest finished checkpoint step of a zoo checkpoint or workdir."""
    mngr, step = _existing_manager(path)
    mngr.close()
    return step


def save(mngr: ocp.CheckpointManager, step: int, items: dict) -> None:
    """Saves pytrees `items` (a subset of ITEMS) as checkpoint `step` (asynchronously: `finish` waits).
    Orbax writes into a temporary folder and renames it when complete, so a crash or a failed write
    never leaves a checkpoint that looks finished. A failed write raises CheckpointWriteError."""
    args = {name: ocp.args.StandardSave(tree) for name, tree in items.items()}
    try:
        mngr.save(step, args=ocp.args.Composite(**args), force=True)
    except Exception as e:  # noqa: BLE001 - Orbax reports an earlier async write's failure here too
        raise CheckpointWriteError(f"could not write checkpoint step {step} in {mngr.directory}: "
                                   f"{_first_line(e)}") from None


def finish(mngr: ocp.CheckpointManager) -> None:
    """Waits for the checkpoint writes in flight; a failed one raises CheckpointWriteError."""
    try:
        mngr.wait_until_finished()
    except Exception as e:  # noqa: BLE001 - the async writer's error, whatever its type
        raise CheckpointWriteError(f"could not write a checkpoint in {mngr.directory}: {_first_line(e)}"
                                   ) from None


def save_cache(path: str, cache) -> None:
    """Writes a decoding cache (`zoo.init_cache` after prefill/decode; sharded or not) to `path` with
    Orbax, so a long prompt is prefilled once and decoding resumes from it later or elsewhere."""
    path = os.path.abspath(path)
    if os.path.exists(path):
        raise FileExistsError(f"{path} exists; give a new directory for the cache")
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(path, cache)


def load_cache(path: str, like):
    """The cache saved at `path`, read into the shapes, dtypes and shardings of `like` (a cache or
    `jax.eval_shape(zoo.init_cache, ...)` whose leaves may carry `sharding=`: each device reads only its
    slice, whatever mesh saved it). A cache of another model, batch or length fails naming the leaf."""
    path = os.path.abspath(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"no saved cache at {path}")
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)
                                                         or jax.sharding.SingleDeviceSharding(jax.devices()[0])),
                          like)
    with ocp.StandardCheckpointer() as ckptr:
        stored = ckptr.metadata(path)
        stored = getattr(stored, "item_metadata", stored)
        got = {jax.tree_util.keystr(k): tuple(v.shape) for k, v in jax.tree_util.tree_flatten_with_path(stored)[0]}
        for key, leaf in jax.tree_util.tree_flatten_with_path(target)[0]:
            name = jax.tree_util.keystr(key)
            if got.get(name) != tuple(leaf.shape):
                raise ValueError(f"the cache at {path} does not match: {name} is "
                                 f"{got.get(name, 'missing')} there, {tuple(leaf.shape)} here")
        return ckptr.restore(path, target)


class CheckpointWriteError(OSError):
    """Writing a checkpoint failed (e.g. the disk is full); the checkpoints written before are intact."""


def abstract(tree, sharding=None, dtype=None):
    """`tree` (arrays or shape structs) as restore targets: one device unless `sharding` is given,
    either one sharding for every leaf or a pytree of shardings shaped like `tree` (e.g. the current
    mesh's parameter shardings: Orbax then reads each device's slice, whatever mesh saved it)."""
    if sharding is None or isinstance(sharding, jax.sharding.Sharding):
        one = sharding or jax.sharding.SingleDeviceSharding(jax.devices()[0])
        return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, dtype or x.dtype, sharding=one), tree)
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, dtype or x.dtype, sharding=s), tree, sharding)


def restore(mngr: ocp.CheckpointManager, step: int, targets: dict) -> dict:
    """Checkpoint `step`'s items named in `targets`, restored into those abstract pytrees (their dtype
    and sharding), so nothing is materialised twice. Raises `MismatchedCheckpoint` when the stored tree
    differs from a target's (a config problem) and `UnreadableCheckpoint` when Orbax cannot read it
    (a missing or damaged file)."""
    where = os.path.join(str(mngr.directory), str(step))
    for name, target in targets.items():
        _check_item(os.path.join(where, name), target)
    args = {name: ocp.args.StandardRestore(target) for name, target in targets.items()}
    try:
        restored = mngr.restore(step, args=ocp.args.Composite(**args))
    except Exception as e:  # noqa: BLE001 - TensorStore reports damaged files as a bare Exception
        _silence_abandoned_reads()
        raise UnreadableCheckpoint(where, _first_line(e)) from None
    return {name: restored[name] for name in targets}


def _silence_abandoned_reads() -> None:
    """After a failed restore, Orbax's unfinished reads of the other arrays still complete on TensorStore's
    threads and fail again: a coroutine collected later ('Exception ignored in <coroutine ...>' with
    TensorStore's spec dump), a read done after Orbax closed its event loop ('Event loop is closed' from
    call_soon_threadsafe). The failure is already reported once (`UnreadableCheckpoint`), so from here on
    these leftovers are dropped, whichever hook reports them; every other error still prints."""
    if getattr(sys.unraisablehook, "drops_abandoned_reads", False):
        return
    unraisable_hook, except_hook, thread_hook = sys.unraisablehook, sys.excepthook, threading.excepthook

    def late_callback(exc_type, exc, tb) -> bool:
        return (exc_type is RuntimeError and str(exc) == "Event loop is closed"
                and any(frame.name == "call_soon_threadsafe" for frame in traceback.extract_tb(tb)))

    def on_unraisable(unraisable):
        code = getattr(unraisable.object, "cr_code", None)
        if not ((code is not None and f"orbax{os.sep}checkpoint" in code.co_filename)
                or late_callback(unraisable.exc_type, unraisable.exc_value, unraisable.exc_traceback)):
            unraisable_hook(unraisable)

    def on_exception(exc_type, exc, tb):
        if not late_callback(exc_type, exc, tb):
            except_hook(exc_type, exc, tb)

    def on_thread_exception(args):
        if not late_callback(args.exc_type, args.exc_value, args.exc_traceback):
            thread_hook(args)

    on_unraisable.drops_abandoned_reads = True
    sys.unraisablehook, sys.excepthook, threading.excepthook = on_unraisable, on_exception, on_thread_exception


class UnreadableCheckpoint(ValueError):
    """A finished checkpoint that Orbax cannot read: a file missing, truncated or damaged."""

    def __init__(self, where: str, reason: str):
        super().__init__(f"checkpoint {where} cannot be read: {reason}")
        self.where, self.reason = where, reason


class MismatchedCheckpoint(ValueError):
    """A readable checkpoint whose parameters differ in name or shape from the config's model."""


def _first_line(error: Exception) -> str:
    """The gist of an Orbax/TensorStore error: its first line, without TensorStore's spec dump."""
    text = str(error).split("See full TensorStore details")[0]
    line = " ".join(text.split()).rstrip(".")
    return f"{line[:120]} ... {line[-180:]}" if len(line) > 320 else (line or type(error).__name__)


def _check_item(directory: str, target) -> None:
    """Reads an item's Orbax tree metadata (`_METADATA`) and compares names and shapes with `target`."""
    if not os.path.isdir(directory):
        raise MismatchedCheckpoint(f"checkpoint {os.path.dirname(directory)} has no item "
                                   f"{os.path.basename(directory)!r}")
    try:
        metadata = ocp.StandardCheckpointHandler().metadata(epath.Path(directory))
    except Exception as e:  # noqa: BLE001 - a missing or unparsable metadata file
        raise UnreadableCheckpoint(os.path.dirname(directory), _first_line(e)) from None
    tree = getattr(metadata, "tree", metadata)
    stored = {_keystr(path): tuple(leaf.shape) for path, leaf in jax.tree_util.tree_leaves_with_path(tree)
              if hasattr(leaf, "shape")}
    wanted = {_keystr(path): tuple(leaf.shape) for path, leaf in jax.tree_util.tree_leaves_with_path(target)}
    if stored == wanted:
        return
    where = f"checkpoint {os.path.dirname(directory)} does not match the config's model"
    missing, extra = sorted(set(wanted) - set(stored)), sorted(set(stored) - set(wanted))
    if missing or extra:
        raise MismatchedCheckpoint(f"{where}: {len(missing)} parameters missing (e.g. {missing[:2]}), "
                                   f"{len(extra)} unexpected (e.g. {extra[:2]})")
    name = next(k for k in wanted if wanted[k] != stored[k])
    raise MismatchedCheckpoint(f"{where}: {name} has shape {stored[name]}, the config expects {wanted[name]}")


def _keystr(path) -> str:
    return ".".join(str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in path)


def restore_newest_readable(mngr: ocp.CheckpointManager, targets: dict, *, before: int | None = None
                            ) -> tuple[int, dict, list[UnreadableCheckpoint]]:
    """(step, items, unreadable): the newest finished checkpoint (below `before`, if given) that Orbax can
    read, restored into `targets`, and the newer ones it could not read (each names its folder and the
    reason; nothing is deleted). A checkpoint that does not match the model stops the search
    (`MismatchedCheckpoint`: older ones would not match either); none readable: `UnreadableCheckpoint`."""
    unreadable = []
    for step in sorted(mngr.all_steps(), reverse=True):
        if before is not None and step >= before:
            continue
        try:
            return step, restore(mngr, step, targets), unreadable
        except UnreadableCheckpoint as e:
            unreadable.append(e)
    if not unreadable:
        raise FileNotFoundError(f"{mngr.directory} holds no finished checkpoint")
    raise UnreadableCheckpoint(str(mngr.directory), "none of its checkpoints can be read ("
                               + "; ".join(f"{os.path.basename(e.where)}: {e.reason}" for e in unreadable) + ")")


def check_destination(path: str, overwrite: bool = False, flag: str = "--overwrite") -> None:
    """Refuses a destination that exists and is not an empty directory, unless `overwrite`."""
    if os.path.exists(path) and not overwrite and not (os.path.isdir(path) and not os.listdir(path)):
        raise FileExistsError(f"{path} already exists; refusing to overwrite it (pass {flag} to replace it)")


@contextlib.contextmanager
def staged(path: str, overwrite: bool = False, *, all_processes: bool = True) -> Iterator[str]:
    """Yields `PATH.partial`, a fresh directory beside `path`, to write into; when the body completes it
    replaces `path` (renamed into place), so an interrupted write never leaves a destination that looks
    complete (a failed one removes `PATH.partial`; a killed one leaves it, and the next write clears it).
    An existing `path` is refused unless `overwrite` (`check_destination`). In a multi-process run with
    `all_processes` every process enters it (the staging name is the same everywhere; they meet at
    barriers) and process 0 renames; otherwise only the process that writes enters it."""
    path = os.path.abspath(path)
    check_destination(path, overwrite)
    partial = path + ".partial"
    owner = jax.process_index() == 0   # process 0 keeps the staging directory, whoever writes config files
    if owner:
        if os.path.exists(partial):   # left by an interrupted write; never a finished destination
            shutil.rmtree(partial)
        os.makedirs(partial)
    meet = barrier if all_processes else (lambda name: None)
    meet("staged-start:" + path)
    try:
        yield partial
    except BaseException:   # an incomplete output is removed; `path` was never touched
        if owner:
            shutil.rmtree(partial, ignore_errors=True)
        raise
    meet("staged-written:" + path)
    if owner:
        old = path + ".replaced"
        if os.path.exists(path) and not (os.path.isdir(path) and not os.listdir(path)):
            os.rename(path, old)
        else:
            old = None
            if os.path.isdir(path):
                os.rmdir(path)
        os.rename(partial, path)
        if old is not None:
            shutil.rmtree(old) if os.path.isdir(old) else os.remove(old)
    meet("staged-done:" + path)


def barrier(name: str) -> None:
    """Waits for every process of a multi-process run (a no-op with one process)."""
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


def save_model(model, path: str, config=None, *, overwrite: bool = False) -> str:
    """Writes `model` as a zoo checkpoint (step 0, parameters only); `config` defaults to the shared
    training defaults around the model's own config. The files are written beside `path` and renamed
    into place when complete (`staged`); an existing `path` is refused unless `overwrite`. In a
    multi-process run every process calls it."""
    model_cfg = ml_collections.ConfigDict(model.config.as_configdict())
    config = default_config(model_cfg) if config is None else ml_collections.ConfigDict(config)
    config.model = model_cfg
    with staged(path, overwrite) as partial:
        if distributed.is_primary():   # every process saves its shards below; one writes config.json
            write_config(config, partial)
        mngr = manager(partial)
        try:
            save(mngr, 0, {"params": nnx.to_pure_dict(nnx.state(model, nnx.Param))})
            finish(mngr)
        finally:
            mngr.close()
    return path


def load_with_step(path: str, *, dtype="float32", attention_impl: str | None = None,
                   mesh: jax.sharding.Mesh | None = None, rules=sharding.DEFAULT_RULES):
    """(model, step, unreadable): the model of the newest readable checkpoint of a zoo checkpoint or
    training workdir, the step it comes from, and the newer checkpoints that could not be read (see
    `restore_newest_readable`). Parameters are cast to `dtype` (a name or a JAX/numpy dtype) as they are
    read: onto one device, or with `mesh` each read straight into its sharding under `rules`
    (`zoo.sharding.state_shardings`), never passing through one device."""
    dtype = dtypes.resolve(dtype)
    model_cfg = read_config(path).model
    model_cfg.dtype = dtype
    if attention_impl is not None:
        model_cfg.attention_impl = attention_impl
    graphdef, params, rest = nnx.split(build_abstract(model_cfg), nnx.Param, ...)
    shardings = None if mesh is None else nnx.to_pure_dict(
        sharding.state_shardings(params, mesh, sharding.resolve_rules(rules)))
    target = abstract(nnx.to_pure_dict(params), sharding=shardings, dtype=dtypes.to_jnp(dtype))
    mngr, _ = _existing_manager(path)
    try:
        step, restored, unreadable = restore_newest_readable(mngr, {"params": target})
    finally:
        mngr.close()
    return nnx.merge(graphdef, restored["params"], rest), step, unreadable


def load(path: str, *, dtype="float32", attention_impl: str | None = None,
         mesh: jax.sharding.Mesh | None = None, rules=sharding.DEFAULT_RULES):
    """The model of a zoo checkpoint or training workdir: its newest readable checkpoint (a newer one that
    cannot be read is skipped with a logged warning naming it), parameters cast to `dtype` (a name or a
    JAX/numpy dtype) as they are read, onto one device or with `mesh` straight into their shardings."""
    model, step, unreadable = load_with_step(path, dtype=dtype, attention_impl=attention_impl, mesh=mesh,
                                             rules=rules)
    for e in unreadable:
        log.warning("%s; loaded step %d instead", e, step)
    return model
