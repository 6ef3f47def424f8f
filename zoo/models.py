"""Building a decoder from a model config."""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from layers.params import SeededRngs
from zoo import dtypes, families
from zoo.decoder import Decoder, DecoderOptions


def validate(cfg) -> None:
    """Fails with a message naming the first bad setting of a model config: the decoder's options, the
    dtype, then the family's own checks (which check every layer's kinds)."""
    DecoderOptions.from_config(cfg)
    dtypes.resolve(cfg.dtype, "model.dtype")
    families.get(cfg.family).validate(cfg)


def build(cfg, *, seed: int = 0) -> Decoder:
    """A randomly initialised decoder (float32 parameters) for the model config `cfg`."""
    validate(cfg)
    return Decoder(cfg, families.get(cfg.family).block, rngs=SeededRngs(seed))


def build_abstract(cfg) -> Decoder:
    """The decoder with shape-only parameters (no memory), for counting and for streaming loads."""
    validate(cfg)
    block_cls = families.get(cfg.family).block
    return nnx.eval_shape(lambda: Decoder(cfg, block_cls, rngs=SeededRngs()))


def cast(model: Decoder, dtype) -> Decoder:
    """The same model with floating-point parameters cast to `dtype` (in place)."""
    dtype = dtypes.to_jnp(dtype)
    graphdef, state = nnx.split(model)
    state = jax.tree.map(lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, state)
    return nnx.merge(graphdef, state)
