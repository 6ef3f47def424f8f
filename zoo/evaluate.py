"""Validation loss, bits per byte and perplexity on the fixed validation batches, and sequence-length
sweeps, on a device mesh (parameters and batches sharded as in training). Used by the training loop
(eval steps) and by `eval.py`."""
from __future__ import annotations

import csv
import math
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from zoo import data, sharding
from zoo.decoder import cross_entropy
from zoo.models import DTYPES

COLUMNS = ("seq_len", "val_loss", "val_bits_per_byte", "val_perplexity", "tokens")


def make_loss_fn(graphdef: nnx.GraphDef, compute_dtype: str | None = None, *, training: bool = False,
                 mesh: Mesh | None = None, rules=None) -> Callable:
    """`(params, inputs_BT, targets_BT) -> mean nats` (to be jitted), the parameters (a pure dict) cast
    to `compute_dtype` first (None: used as stored); gradients taken through it reach the uncast ones.
    `training=True` gives the model's training objective (`Decoder.train_loss`: next-token cross-entropy
    plus any multi-token-prediction loss); otherwise next-token cross-entropy alone. With the `mesh` and
    `rules` the parameters are laid out by, MoE layers run expert-parallel where the rules put the
    experts on a mesh axis `expert` of size > 1, and fused kernels per shard
    (`zoo.sharding.partitioning`)."""
    dtype = DTYPES[compute_dtype] if compute_dtype else None
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
    losses = []
    for i in range(num_batches):
        inputs_BT, targets_BT = data.val_batch(corpus, index=i, batch_size=batch_size, seq_len=seq_len)
        losses.append(loss_fn(params, sharding.shard_batch(inputs_BT, batch_sharding),
                              sharding.shard_batch(targets_BT, batch_sharding)))
    return float(np.mean(jax.device_get(losses)))


def evaluate(model, corpus: data.Corpus, *, seq_lens: Sequence[int], num_batches: int, batch_size: int,
             mesh: Mesh | None = None, rules="fsdp_tensor_expert") -> list[dict]:
    """One row of COLUMNS per sequence length, for `model` in its own parameter dtype, on `mesh` (default:
    the first device alone): parameters laid out by `rules` as `zoo.sharding.state_shardings` places them
    (load them that way, `checkpoints.load(..., mesh=, rules=)`, and they never move), each batch split
    over the batch axes."""
    mesh = mesh if mesh is not None else sharding.make_mesh({}, jax.devices()[:1])
    rules = sharding.resolve_rules(rules)
    batch = sharding.batch_sharding(mesh, rules)
    sharding.check_batch_splits(batch_size, batch, "batch_size")
    graphdef, state = nnx.split(model, nnx.Param)
    params = nnx.to_pure_dict(state)
    params_sharding = nnx.to_pure_dict(sharding.state_shardings(state, mesh, rules))
    loss_fn = jax.jit(make_loss_fn(graphdef, mesh=mesh, rules=rules), in_shardings=(params_sharding, batch, batch),
                      out_shardings=NamedSharding(mesh, PartitionSpec()))
    rows = []
    for seq_len in seq_lens:
        data.check_fits(corpus, model.config.vocab_size, seq_len)
        nats = validation_loss(loss_fn, params, corpus, num_batches=num_batches, batch_size=batch_size,
                               seq_len=seq_len, batch_sharding=batch)
        rows.append({"seq_len": seq_len, "val_loss": nats,
                     "val_bits_per_byte": bits_per_byte(nats, corpus.bytes_per_token),
                     "val_perplexity": math.exp(nats), "tokens": num_batches * batch_size * seq_len})
    return rows


def format_table(rows: Sequence[dict]) -> str:
    """The rows as an aligned text table."""
    cells = [list(COLUMNS)] + [[f"{r[c]:.4f}" if isinstance(r[c], float) else str(r[c]) for c in COLUMNS]
                               for r in rows]
    widths = [max(len(line[i]) for line in cells) for i in range(len(COLUMNS))]
    return "\n".join("  ".join(cell.rjust(w) for cell, w in zip(line, widths)) for line in cells)


def write_csv(rows: Sequence[dict], path: str) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
