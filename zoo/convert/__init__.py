"""Hugging Face <-> zoo conversion, streamed one tensor at a time.

Loading builds the model with shape-only parameters and fills them tensor by tensor from the
memory-mapped safetensors files (with a mesh, each straight into its sharding); saving converts one
shard's worth of tensors at a time. Neither ever holds two copies of the model.
"""
from __future__ import annotations

import json
import logging
import os

import jax
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils

from zoo import distributed, families, sharding
from zoo.convert.safetensors_io import SafetensorsDir, write_shards
from zoo.models import DTYPES, build_abstract

PREFIXES = ("model.language_model.", "model.")
log = logging.getLogger(__name__)


def read_hf_config(path: str) -> dict:
    file = os.path.join(path, "config.json")
    if not os.path.isdir(path):
        raise FileNotFoundError(f"no such checkpoint directory: {path}")
    if not os.path.exists(file):
        raise FileNotFoundError(f"{path} has no config.json; is it a Hugging Face checkpoint?")
    with open(file) as f:
        return json.load(f)


def family_for_hf(hf: dict) -> families.Family:
    return families.for_hf_model_type(hf.get("model_type"))


def _prefix(names) -> str:
    for prefix in PREFIXES:
        if any(n.startswith(prefix) for n in names):
            return prefix
    return ""


def _flat_params(model) -> dict[tuple, nnx.Variable]:
    return {tuple(path): var for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def from_hf(path: str, *, dtype: str = "float32", attention_impl: str = "xla", mesh=None,
            rules="fsdp_tensor_expert"):
    """A zoo model from a Hugging Face checkpoint directory (single-file or sharded safetensors): onto
    one device, or with `mesh` each tensor placed straight into its sharding under `rules`
    (`zoo.sharding.state_shardings`) as it is converted, so the model is never whole on one device."""
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; expected one of {sorted(DTYPES)}")
    hf = read_hf_config(path)
    family = family_for_hf(hf)
    cfg = family.from_hf_config(hf)
    cfg.attention_impl = attention_impl
    cfg.dtype = dtype
    tensors = SafetensorsDir(path)
    if family.hf_update_config is not None:   # settings only the checkpoint's tensor names tell
        family.hf_update_config(cfg, tensors.names())
    model = build_abstract(cfg)
    prefix = _prefix(tensors.names())
    slots = _flat_params(model)
    placements = {} if mesh is None else {
        tuple(p): s.get_value() for p, s in nnx.to_flat_state(
            sharding.state_shardings(nnx.state(model, nnx.Param), mesh, sharding.resolve_rules(rules)))}
    filled: set[tuple] = set()
    used: set[str] = set()
    target = DTYPES[dtype]
    for rule in family.hf_rules(cfg):
        pfx = prefix if rule.hf_prefix is None else rule.hf_prefix
        names = [next((pfx + s for s in n.split("|") if pfx + s in tensors), pfx + n.split("|")[0])
                 for n in rule.hf]
        abstract = [slots[p].get_value() for p in rule.ours]
        expected = jax.eval_shape(rule.to_hf, *abstract)
        arrays = []
        for name, want in zip(names, expected):
            if name not in tensors:
                raise ValueError(f"checkpoint {path} lacks tensor {name!r}")
            if tensors.logical_shape(name) != tuple(want.shape):
                raise ValueError(f"tensor {name!r} has shape {tensors.logical_shape(name)}; the config expects "
                                 f"{tuple(want.shape)}")
            arrays.append(tensors.get_float32(name))
            used.update({name, tensors.scale_of(name)} - {None})
        for p, value in zip(rule.ours, rule.to_ours(*arrays)):
            slots[p].set_value(jax.device_put(np.asarray(value, dtype=target), placements.get(p)))
            filled.add(p)
        del arrays
    missing = [p for p in slots if p not in filled]
    if missing:
        raise ValueError(f"no checkpoint tensor maps to parameters {missing[:5]} (family {cfg.family})")
    extra = [n for n in tensors.names()
             if n not in used and not (n.startswith(prefix) and family.hf_ignored(cfg, n[len(prefix):]))]
    if extra:
        log.warning("ignored %d checkpoint tensors not used by the text decoder, e.g. %s", len(extra), extra[:3])
    return model


def _to_host(array: jax.Array) -> np.ndarray:
    """The whole of `array` on this host; one that spans other processes' devices is gathered from them
    (a collective: every process must call this for the same arrays in the same order)."""
    if array.is_fully_addressable:
        return np.asarray(jax.device_get(array))
    return np.asarray(multihost_utils.process_allgather(array, tiled=True))


def to_hf(model, path: str, *, max_shard_bytes: int = 2 << 30) -> str:
    """Writes `model` as a Hugging Face checkpoint directory that transformers loads. Parameters are
    fetched to the host one rule's tensors at a time, so a sharded model is fine (never gathered whole).
    In a multi-process run every process must call this (the tensors are gathered across processes);
    process 0 alone writes the files."""
    cfg = model.config
    family = families.get(cfg.family)
    hf = family.to_hf_config(cfg)
    slots = _flat_params(model)
    dtypes = {str(v.get_value().dtype) for v in slots.values()}
    hf["dtype"] = "bfloat16" if dtypes == {"bfloat16"} else "float32"

    def tensors():
        for rule in family.hf_rules(cfg):
            ours = [_to_host(slots[p].get_value()) for p in rule.ours]
            for name, value in zip(rule.hf, rule.to_hf(*ours)):
                full = ("model." if rule.hf_prefix is None else rule.hf_prefix) + name.split("|")[0]
                yield full, np.asarray(value)

    if not distributed.is_primary():
        for _ in tensors():   # take part in the gathers; process 0 writes
            pass
        return path
    os.makedirs(path, exist_ok=True)
    write_shards(tensors(), path, max_shard_bytes=max_shard_bytes)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(hf, f, indent=2)
    return path
