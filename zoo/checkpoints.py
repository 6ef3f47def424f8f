"""The zoo checkpoint layout, shared by training workdirs and converted checkpoints:

    DIR/config.json               the full config (`model`, `train`, `optimizer`, `data`)
    DIR/checkpoints/<step>/       Orbax items: `params` (always), `opt_state` (training runs)

A training workdir is therefore a zoo checkpoint. Parameters are stored as the model's pure dict
(`nnx.to_pure_dict(nnx.state(model, nnx.Param))`). All restoring goes through `restore`, which fills
abstract targets (shape, dtype and sharding), so loading never materialises a model twice and a sharded
target can be passed later.
"""
from __future__ import annotations

import json
import os

import jax
import ml_collections
import orbax.checkpoint as ocp
from flax import nnx

from zoo import distributed, sharding
from zoo.models import DTYPES, build_abstract

CONFIG_FILE = "config.json"
CHECKPOINT_DIR = "checkpoints"
ITEMS = ("params", "opt_state")


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
    with open(path) as f:
        config = ml_collections.ConfigDict(json.load(f))
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
    """Saves pytrees `items` (a subset of ITEMS) as checkpoint `step`."""
    args = {name: ocp.args.StandardSave(tree) for name, tree in items.items()}
    mngr.save(step, args=ocp.args.Composite(**args), force=True)


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
    and sharding), so nothing is materialised twice."""
    args = {name: ocp.args.StandardRestore(target) for name, target in targets.items()}
    try:
        restored = mngr.restore(step, args=ocp.args.Composite(**args))
    except (ValueError, KeyError) as e:
        where = os.path.join(str(mngr.directory), str(step))
        raise ValueError(f"checkpoint {where} does not match the config's model: {e}") from None
    return {name: restored[name] for name in targets}


def save_model(model, path: str, config=None) -> str:
    """Writes `model` as a zoo checkpoint (step 0, parameters only); `config` defaults to the shared
    training defaults around the model's own config. In a multi-process run every process calls it."""
    from configs.common import base_config

    model_cfg = ml_collections.ConfigDict(model.config.as_configdict())
    config = base_config(model_cfg) if config is None else ml_collections.ConfigDict(config)
    config.model = model_cfg
    mngr = manager(path)
    if mngr.latest_step() is not None:
        raise FileExistsError(f"{path} already holds checkpoints; refusing to overwrite them")
    if distributed.is_primary():   # every process saves its shards below; one writes config.json
        write_config(config, path)
    save(mngr, 0, {"params": nnx.to_pure_dict(nnx.state(model, nnx.Param))})
    mngr.wait_until_finished()
    mngr.close()
    return path


def load(path: str, *, dtype: str = "float32", attention_impl: str | None = None,
         mesh: jax.sharding.Mesh | None = None, rules="fsdp_tensor_expert"):
    """The model of a zoo checkpoint or training workdir (its latest step), parameters cast to `dtype`
    as they are read: onto one device, or with `mesh` each read straight into its sharding under `rules`
    (`zoo.sharding.state_shardings`), never passing through one device."""
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; expected one of {sorted(DTYPES)}")
    model_cfg = read_config(path).model
    model_cfg.dtype = dtype
    if attention_impl is not None:
        model_cfg.attention_impl = attention_impl
    graphdef, params, rest = nnx.split(build_abstract(model_cfg), nnx.Param, ...)
    shardings = None if mesh is None else nnx.to_pure_dict(
        sharding.state_shardings(params, mesh, sharding.resolve_rules(rules)))
    target = abstract(nnx.to_pure_dict(params), sharding=shardings, dtype=DTYPES[dtype])
    mngr, step = _existing_manager(path)
    try:
        restored = restore(mngr, step, {"params": target})["params"]
    finally:
        mngr.close()
    return nnx.merge(graphdef, restored, rest)
