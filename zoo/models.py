"""Building a decoder from a model config."""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from layers.attention import IMPLS
from zoo import dtypes, families
from zoo.decoder import REMAT, Decoder

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def check_layers(cfg, per_layer_keys, attention_types) -> None:
    """The checks every family's per-layer config needs: each list in `per_layer_keys` has one entry per
    layer, each layer's attention type is one of `attention_types` and has RoPE settings in `model.rope`,
    and where heads are listed per layer, the query heads split evenly over the kv heads."""
    L = cfg.num_layers
    for key in per_layer_keys:
        if len(cfg[key]) != L:
            raise ValueError(f"model.{key} has {len(cfg[key])} entries but model.num_layers is {L}")
    for i, kind in enumerate(cfg.attention_types):
        if kind not in attention_types:
            raise ValueError(f"model.attention_types[{i}] = {kind!r}: unknown layer kind; expected one of "
                             f"{attention_types}")
        if kind not in cfg.rope:
            raise ValueError(f"model.rope has no entry for attention type {kind!r}")
        if "num_kv_heads" in per_layer_keys and cfg.num_heads[i] % cfg.num_kv_heads[i]:
            raise ValueError(f"layer {i}: num_heads={cfg.num_heads[i]} is not divisible by "
                             f"num_kv_heads={cfg.num_kv_heads[i]}")


def validate(cfg) -> None:
    if cfg.attention_impl not in IMPLS:
        raise ValueError(f"unknown model.attention_impl {cfg.attention_impl!r}; expected one of {IMPLS}")
    dtypes.resolve(cfg.dtype, "model.dtype")
    if cfg.get("remat", "none") not in REMAT:
        raise ValueError(f"unknown model.remat {cfg.remat!r}; expected one of {REMAT}")
    families.get(cfg.family).validate(cfg)


def build(cfg, *, seed: int = 0) -> Decoder:
    """A randomly initialised decoder (float32 parameters) for the model config `cfg`."""
    validate(cfg)
    block_cls = families.get(cfg.family).Block
    return Decoder(cfg, block_cls, rngs=nnx.Rngs(params=seed))


def build_abstract(cfg) -> Decoder:
    """The decoder with shape-only parameters (no memory), for counting and for streaming loads."""
    validate(cfg)
    block_cls = families.get(cfg.family).Block
    return nnx.eval_shape(lambda: Decoder(cfg, block_cls, rngs=nnx.Rngs(params=0)))


def cast(model: Decoder, dtype) -> Decoder:
    """The same model with floating-point parameters cast to `dtype` (in place)."""
    dtype = dtypes.to_jnp(dtype)
    graphdef, state = nnx.split(model)
    state = jax.tree.map(lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, state)
    return nnx.merge(graphdef, state)
