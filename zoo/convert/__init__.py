"""Hugging Face <-> zoo conversion, streamed one tensor at a time.

Loading builds the model with shape-only parameters and fills them tensor by tensor from the
memory-mapped safetensors files (with a mesh, each straight into its sharding); saving converts one
shard's worth of tensors at a time. Neither ever holds two copies of the model.
"""
from __future__ import annotations

import json
import logging
import os
import shutil

import jax
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils
from tqdm import tqdm

from zoo import distributed, dtypes, families, sharding
from zoo.checkpoints import staged
from zoo.convert.safetensors_io import SafetensorsDir, read_json, write_shards
from zoo.convert.tokenizer import write_byte_tokenizer
from zoo.models import build_abstract

PREFIXES = ("model.language_model.", "model.")
log = logging.getLogger(__name__)


def read_hf_config(path: str) -> dict:
    """The `config.json` of a Hugging Face checkpoint directory, with errors naming the file."""
    file = os.path.join(path, "config.json")
    if not os.path.isdir(path):
        raise FileNotFoundError(f"no such checkpoint directory: {path}")
    if not os.path.exists(file):
        raise FileNotFoundError(f"{path} has no config.json; is it a Hugging Face checkpoint?")
    return read_json(file)


def family_for_hf(hf: dict) -> families.Family:
    return families.for_hf_model_type(hf.get("model_type"))


def _prefix(names) -> str:
    for prefix in PREFIXES:
        if any(n.startswith(prefix) for n in names):
            return prefix
    return ""


def _flat_params(model) -> dict[tuple, nnx.Variable]:
    return {tuple(path): var for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def from_hf(path: str, *, dtype="float32", attention_impl: str = "xla", mesh=None,
            rules=sharding.DEFAULT_RULES, progress: bool = False):
    """A zoo model from a Hugging Face checkpoint directory (single-file or sharded safetensors): onto
    one device, or with `mesh` each tensor placed straight into its sharding under `rules`
    (`zoo.sharding.state_shardings`) as it is converted, so the model is never whole on one device.
    `dtype`: a name ("bfloat16") or a JAX/numpy dtype; `progress`: a progress bar on stderr."""
    dtype = dtypes.resolve(dtype)
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
    target = dtypes.to_jnp(dtype)
    rules_list = list(family.hf_rules(cfg))
    for rule in tqdm(rules_list, desc=f"reading {len(tensors.files)} shard(s)", unit="tensor",
                     disable=not progress, leave=False):
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


def to_hf(model, path: str, *, max_shard_bytes: int = 2 << 30, overwrite: bool = False,
          tokenizer: str | None = None, progress: bool = False) -> str:
    """Writes `model` as a Hugging Face checkpoint directory that transformers loads: safetensors shards,
    `config.json`, `generation_config.json` and, with `tokenizer="bytes"` (a byte-level model) a
    tokenizer that `transformers.AutoTokenizer` loads, or with the path of a `tokenizer.json` a copy of
    it. The files go to `PATH.partial` and are renamed into place when complete; an existing `path` (not
    an empty directory) is refused unless `overwrite`. Parameters are fetched to the host one rule's
    tensors at a time, so a sharded model is fine (never gathered whole). In a multi-process run every
    process must call this (the tensors are gathered across processes); process 0 alone writes."""
    cfg = model.config
    family = families.get(cfg.family)
    hf = family.to_hf_config(cfg)
    slots = _flat_params(model)
    stored = {str(v.get_value().dtype) for v in slots.values()}
    hf["dtype"] = "bfloat16" if stored == {"bfloat16"} else "float32"
    if tokenizer not in (None, "bytes") and not os.path.isfile(tokenizer):
        raise FileNotFoundError(f"no such tokenizer file {tokenizer!r}")
    rules_list = list(family.hf_rules(cfg))

    def tensors():
        for rule in tqdm(rules_list, desc="writing", unit="tensor", disable=not progress, leave=False):
            ours = [_to_host(slots[p].get_value()) for p in rule.ours]
            for name, value in zip(rule.hf, rule.to_hf(*ours)):
                full = ("model." if rule.hf_prefix is None else rule.hf_prefix) + name.split("|")[0]
                yield full, np.asarray(value)

    if not distributed.is_primary():
        for _ in tensors():   # take part in the gathers; process 0 writes
            pass
        return path
    with staged(path, overwrite, all_processes=False) as partial:   # process 0 alone writes
        write_shards(tensors(), partial, max_shard_bytes=max_shard_bytes)
        with open(os.path.join(partial, "config.json"), "w") as f:
            json.dump(hf, f, indent=2)
        with open(os.path.join(partial, "generation_config.json"), "w") as f:
            json.dump(generation_config(hf), f, indent=2)
        if tokenizer == "bytes":
            write_byte_tokenizer(partial, vocab_size=cfg.vocab_size, max_length=cfg.get("max_positions"))
        elif tokenizer is not None:
            shutil.copy(tokenizer, os.path.join(partial, "tokenizer.json"))
            with open(os.path.join(partial, "tokenizer_config.json"), "w") as f:
                json.dump({"tokenizer_class": "PreTrainedTokenizerFast"}, f, indent=2)
    return path


def generation_config(hf: dict) -> dict:
    """`generation_config.json` from the HF config's special token ids (those it sets)."""
    out = {"_from_model_config": True}
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if hf.get(key) is not None:
            out[key] = hf[key]
    return out
