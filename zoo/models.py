"""Building a decoder from a model config."""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from layers.attention import IMPLS
from zoo import families
from zoo.decoder import Decoder

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def validate(cfg) -> None:
    if cfg.attention_impl not in IMPLS:
        raise ValueError(f"unknown model.attention_impl {cfg.attention_impl!r}; expected one of {IMPLS}")
    if cfg.dtype not in DTYPES:
        raise ValueError(f"unknown model.dtype {cfg.dtype!r}; expected one of {sorted(DTYPES)}")
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
    dtype = DTYPES.get(dtype, dtype)
    graphdef, state = nnx.split(model)
    state = jax.tree.map(lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, state)
    return nnx.merge(graphdef, state)
