"""Validation loss, bits per byte and perplexity on the fixed validation batches, and sequence-length
sweeps, on a device mesh (parameters and batches sharded as in training), for `eval.py`. The loss
itself, shared with training, is `zoo.train.loss`."""
from __future__ import annotations

import csv
import math
from collections.abc import Sequence

import jax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from zoo import data, sharding
from zoo.train.loss import bits_per_byte, make_loss_fn, validation_loss

__all__ = ["COLUMNS", "evaluate", "format_table", "write_csv", "make_loss_fn", "bits_per_byte",
           "validation_loss"]
COLUMNS = ("seq_len", "val_loss", "val_bits_per_byte", "val_perplexity", "tokens")


def evaluate(model, corpus: data.Corpus, *, seq_lens: Sequence[int], num_batches: int, batch_size: int,
             mesh: Mesh | None = None, rules=sharding.DEFAULT_RULES) -> list[dict]:
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
