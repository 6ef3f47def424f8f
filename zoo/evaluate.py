"""Validation loss, bits per byte and perplexity on the fixed validation batches, and sequence-length
sweeps. Used by the training loop (eval steps) and by `eval.py`."""
from __future__ import annotations

import csv
import math
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from zoo import data
from zoo.decoder import cross_entropy
from zoo.models import DTYPES

COLUMNS = ("seq_len", "val_loss", "val_bits_per_byte", "val_perplexity", "tokens")


def make_loss_fn(graphdef: nnx.GraphDef, compute_dtype: str | None = None, *, training: bool = False
                 ) -> Callable:
    """`(params, inputs_BT, targets_BT) -> mean nats` (to be jitted), the parameters (a pure dict) cast
    to `compute_dtype` first (None: used as stored); gradients taken through it reach the uncast ones.
    `training=True` gives the model's training objective (`Decoder.train_loss`: next-token cross-entropy
    plus any multi-token-prediction loss); otherwise next-token cross-entropy alone."""
    dtype = DTYPES[compute_dtype] if compute_dtype else None

    def loss(params, inputs_BT, targets_BT):
        if dtype is not None:
            params = jax.tree.map(lambda p: p.astype(dtype) if jnp.issubdtype(p.dtype, jnp.floating) else p,
                                  params)
        model = nnx.merge(graphdef, params)
        if training:
            return model.train_loss(inputs_BT, targets_BT)[0]
        return cross_entropy(model(inputs_BT), targets_BT)[0]

    return loss


def bits_per_byte(nats: float, bytes_per_token: float) -> float:
    """Nats per token as bits per byte of the original text."""
    return nats / math.log(2.0) / bytes_per_token


def validation_loss(loss_fn: Callable, params, corpus: data.Corpus, *, num_batches: int, batch_size: int,
                    seq_len: int) -> float:
    """Mean nats per token over validation batches 0..num_batches-1 (equal-sized, so a plain mean)."""
    losses = [loss_fn(params, *data.val_batch(corpus, index=i, batch_size=batch_size, seq_len=seq_len))
              for i in range(num_batches)]
    return float(np.mean(jax.device_get(losses)))


def evaluate(model, corpus: data.Corpus, *, seq_lens: Sequence[int], num_batches: int, batch_size: int
             ) -> list[dict]:
    """One row of COLUMNS per sequence length, for `model` in its own parameter dtype."""
    graphdef, params = nnx.split(model, nnx.Param)
    params = nnx.to_pure_dict(params)
    loss_fn = jax.jit(make_loss_fn(graphdef))
    rows = []
    for seq_len in seq_lens:
        data.check_fits(corpus, model.config.vocab_size, seq_len)
        nats = validation_loss(loss_fn, params, corpus, num_batches=num_batches, batch_size=batch_size,
                               seq_len=seq_len)
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
