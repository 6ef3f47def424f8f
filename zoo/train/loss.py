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

from zoo import data, dtypes, memory, sharding
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


# ---- Memory Sparse Attention (configs with a `memory` section; zoo.memory) -------------------------------

def make_memory_loss_fn(graphdef: nnx.GraphDef, compute_dtype, memory_cfg, *, training: bool = False,
                        mesh: Mesh | None = None, rules=None) -> Callable:
    """`(params, batch) -> (loss, parts)` (to be jitted) for memory-bank batches (zoo.memory.BATCH_KEYS):
    the answer's cross-entropy plus `memory_cfg.routing_loss_weight` x the InfoNCE routing loss at
    temperature `memory_cfg.temperature` (with `memory_cfg.reinject_docs` documents' raw text re-injected
    before the query, zoo.memory.memory_forward; when `training` and `memory_cfg.reinject_gold_in_training`,
    the gold documents, i.e. teacher-forced retrieval; plus `memory_cfg.question_loss_weight` x the
    question tokens' cross-entropy); parts are the two losses, `routing_recall` and `answer_accuracy`."""
    dtype = dtypes.to_jnp(compute_dtype, "compute_dtype") if compute_dtype else None
    parts = sharding.partitioning(mesh, rules)

    def loss(params, batch):
        if dtype is not None:
            params = jax.tree.map(lambda p: p.astype(dtype) if jnp.issubdtype(p.dtype, jnp.floating) else p,
                                  params)
        return memory.memory_loss(nnx.merge(graphdef, params), batch, routing_weight=memory_cfg.routing_loss_weight,
                                  temperature=memory_cfg.temperature,
                                  reinject_docs=memory_cfg.get("reinject_docs", 0),
                                  reinject_gold=training and memory_cfg.get("reinject_gold_in_training", False),
                                  question_weight=memory_cfg.get("question_loss_weight", 0.0),
                                  partitioning=parts)

    return loss


def memory_validation(loss_fn: Callable, params, task: memory.MemoryTask, corpus: data.Corpus, *, seed: int,
                      num_batches: int, batch_size: int, batch_sharding: NamedSharding) -> dict[str, float]:
    """The mean loss parts and metrics over validation examples 0..num_batches*batch_size-1 (drawn from the
    validation split with `seed`): val_loss (answer nats/token), val_loss_routing, routing_recall,
    answer_accuracy."""
    if num_batches < 1:
        raise ValueError(f"num_batches must be at least 1, got {num_batches}")
    sums: dict[str, float] = {}
    for i in range(num_batches):
        b = memory.batch(task, corpus.val_N, seed=seed, start=i * batch_size, size=batch_size)
        _, parts = loss_fn(params, {k: sharding.shard_batch(v, batch_sharding) for k, v in b.items()})
        for k, v in jax.device_get(parts).items():
            sums[k] = sums.get(k, 0.0) + float(v) / num_batches
    return {"val_loss": sums["loss_answer"], "val_loss_routing": sums["loss_routing"],
            "routing_recall": sums["routing_recall"], "answer_accuracy": sums["answer_accuracy"]}
