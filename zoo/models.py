"""Building a decoder from a model config."""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from zoo import families
from zoo.decoder import Decoder, DecoderOptions

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def validate(cfg) -> None:
    """Fails with a message naming the first bad setting of a model config: the decoder's options, the
    dtype, then the family's own checks (which check every layer's kinds)."""
    if cfg.dtype not in DTYPES:
        raise ValueError(f"unknown model.dtype {cfg.dtype!r}; expected one of {sorted(DTYPES)}")
    DecoderOptions.from_config(cfg)
    families.get(cfg.family).validate(cfg)


def build(cfg, *, seed: int = 0) -> Decoder:
    """A randomly initialised decoder (float32 parameters) for the model config `cfg`."""
    validate(cfg)
    return Decoder(cfg, families.get(cfg.family).block, rngs=nnx.Rngs(params=seed))


def build_abstract(cfg) -> Decoder:
    """The decoder with shape-only parameters (no memory), for counting and for streaming loads."""
    validate(cfg)
    block_cls = families.get(cfg.family).block
    return nnx.eval_shape(lambda: Decoder(cfg, block_cls, rngs=nnx.Rngs(params=0)))


def cast(model: Decoder, dtype) -> Decoder:
    """The same model with floating-point parameters cast to `dtype` (in place)."""
    dtype = DTYPES.get(dtype, dtype)
    graphdef, state = nnx.split(model)
    state = jax.tree.map(lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, state)
    return nnx.merge(graphdef, state)
