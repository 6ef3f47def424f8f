"""The training objective and the validation loss: `make_loss_fn` (what the train step differentiates
and eval steps average), nats -> bits per byte, and the mean loss over the fixed validation batches.
Used by the training loop and by `zoo.evaluate`."""
from __future__ import annotations

import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding

from zoo import data, dtypes, sharding
from zoo.decoder import cross_entropy


def make_loss_fn(graphdef: nnx.GraphDef, compute_dtype=None, *, training: bool = False,
                 mesh: Mesh | None = None, rules=None) -> Callable:
    """`(params, inputs_BT, targets_BT) -> mean nats` (to be jitted), the parameters (a pure dict) cast
    to `compute_dtype` first (None: used as stored); gradients taken through it reach the uncast ones.
    `training=True` gives the model's training objective (`Decoder.train_loss`: next-token cross-entropy
    plus any multi-token-prediction loss); otherwise next-token cross-entropy alone. With the `mesh` and
    `rules` the parameters are laid out by, MoE layers run expert-parallel where the rules put the
    experts on a mesh axis `expert` of size > 1, and fused kernels per shard
    (`zoo.sharding.partitioning`, passed to the model)."""
    dtype = dtypes.to_jnp(compute_dtype, "compute_dtype") if compute_dtype else None
    parts = sharding.partitioning(mesh, rules)

    def loss(params, inputs_BT, targets_BT):
        if dtype is not None:
            params = jax.tree.map(lambda p: p.astype(dtype) if jnp.issubdtype(p.dtype, jnp.floating) else p,
                                  params)
        model = nnx.merge(graphdef, params)
        if training:
            return model.train_loss(inputs_BT, targets_BT, partitioning=parts)[0]
        return cross_entropy(model(inputs_BT, partitioning=parts), targets_BT)[0]

    return loss


def bits_per_byte(nats: float, bytes_per_token: float) -> float:
    """Nats per token as bits per byte of the original text."""
    return nats / math.log(2.0) / bytes_per_token


def validation_loss(loss_fn: Callable, params, corpus: data.Corpus, *, num_batches: int, batch_size: int,
                    seq_len: int, batch_sharding: NamedSharding) -> float:
    """Mean nats per token over validation batches 0..num_batches-1 (equal-sized, so a plain mean), each
    batch placed by `batch_sharding`."""
    if num_batches < 1:
        raise ValueError(f"num_batches must be at least 1, got {num_batches}")
    losses = []
    for i in range(num_batches):
        inputs_BT, targets_BT = data.val_batch(corpus, index=i, batch_size=batch_size, seq_len=seq_len)
        losses.append(loss_fn(params, sharding.shard_batch(inputs_BT, batch_sharding),
                              sharding.shard_batch(targets_BT, batch_sharding)))
    return float(np.mean(jax.device_get(losses)))
