"""Memory Sparse Attention at the model level: memory-bank examples, the two-pass forward (encode the
documents, then run the query against their pooled chunks), the routing loss and metrics, and a memory
bank that keeps routing keys on the device and content K/V in host memory.

Examples (`MemoryTask`): N documents of corpus text (document lengths vary, so chunks end partial), each
with one planted fact `<key>=<value>;` at a chunk boundary, distinct keys per example; the query is
`?<key>=` and the answer `<value>` then a newline. With probability `multi_positive_rate` the gold fact
sits in a second document too (two positives). Everything comes from `np.random.default_rng([seed,
index])`, so an example depends on nothing else.

The forward (`memory_forward`): pass 1 runs the decoder over the documents as a batch, each at local
positions 0..len-1 (`LayerContext.msa_doc_lengths_B`), and collects every router layer's pooled chunks;
pass 2 runs the query with them as `LayerContext.msa_memory`. Both passes are one differentiable
function, so the LM loss trains the pooled content and the routing loss the router projections.

The routing loss is the multi-positive InfoNCE of the MSA code: for each router layer and row,
-sum_{d gold} log softmax(score / temperature)_d / |gold|, averaged over layers and rows.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from layers import kinds
from layers.partitioning import UNPARTITIONED, Partitioning
from layers.msa import PooledMemory, Routing, memory_from_encoded, num_chunks, route_scores, select_documents
from zoo.decoder import Decoder, cross_entropy
from zoo.tasks import ADJECTIVES, NOUNS

PAD = 0
BATCH_KEYS = ("docs_BML", "doc_lengths_BM", "inputs_BT", "targets_BT", "answer_mask_BT", "route_mask_BT",
              "gold_BM")


# ---- examples ------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class MemoryTask:
    """How memory-bank examples are drawn (the config's `memory` section plus the model's chunk size)."""
    num_docs: int
    doc_len: int
    query_len: int
    chunk_size: int
    multi_positive_rate: float = 0.25

    @classmethod
    def from_config(cls, config) -> "MemoryTask":
        m, model = config.memory, config.model
        router = router_layers(model)
        if not router:
            raise ValueError("the memory section needs a model with at least one 'msa' layer")
        limit = kinds.option(model, "msa_max_doc_len", router[0])
        if m.doc_len > limit:
            raise ValueError(f"memory.doc_len {m.doc_len} exceeds model.msa_max_doc_len {limit}")
        return cls(m.num_docs, m.doc_len, m.query_len, kinds.option(model, "msa_chunk_size", router[0]),
                   m.multi_positive_rate)

    def keys(self) -> list[str]:
        return [f"{a} {n}" for a in ADJECTIVES[:6] for n in NOUNS]


def router_layers(model_cfg) -> list[int]:
    """The indices of the model's MSA (router) layers."""
    return [i for i, kind in enumerate(model_cfg.attention_types) if kind == "msa"]


def _encode(text: str) -> np.ndarray:
    return np.frombuffer(text.encode(), np.uint8).astype(np.int32)


def make_example(task: MemoryTask, tokens_N: np.ndarray, *, seed: int, index: int) -> dict[str, np.ndarray]:
    """One example as numpy arrays: docs [M, L], doc_lengths [M], query inputs/targets [T], the answer's
    target positions, the routing (question) positions, and gold documents [M] (1.0 = holds the answer)."""
    rng = np.random.default_rng([seed, index])
    M, L, P = task.num_docs, task.doc_len, task.chunk_size
    keys = task.keys()
    picked = rng.choice(len(keys), size=M, replace=False)
    values = [f"{v:03d}" for v in rng.integers(0, 1000, size=M)]
    gold = int(rng.integers(M))
    holders = {m: m for m in range(M)}   # document -> whose fact it holds
    gold_M = np.zeros(M, np.float32)
    gold_M[gold] = 1.0
    if rng.random() < task.multi_positive_rate:
        other = int(rng.choice([m for m in range(M) if m != gold]))
        holders[other] = gold
        gold_M[other] = 1.0
    docs_ML = np.full((M, L), PAD, np.int32)
    lengths_M = rng.integers(L - L // 4, L + 1, size=M)
    for m in range(M):
        fact = _encode(f"{keys[picked[holders[m]]]}={values[holders[m]]};")
        n = int(lengths_M[m])
        start = int(rng.integers(0, len(tokens_N) - n))
        docs_ML[m, :n] = tokens_N[start:start + n]
        at = P * int(rng.integers(0, max((n - len(fact)) // P, 0) + 1))
        docs_ML[m, at:at + len(fact)] = fact[:n - at]
    question, answer = _encode(f"?{keys[picked[gold]]}="), _encode(f"{values[gold]}\n")
    seq = np.concatenate([question, answer])
    T = task.query_len
    if len(seq) > T + 1:
        raise ValueError(f"memory.query_len {T} is too short for a {len(seq)}-token query and answer")
    row = np.full(T + 1, PAD, np.int32)
    row[:len(seq)] = seq
    answer_T = np.zeros(T, bool)
    answer_T[len(question) - 1:len(seq) - 1] = True   # targets[t] = row[t + 1] is an answer token
    return dict(docs_BML=docs_ML, doc_lengths_BM=lengths_M.astype(np.int32), inputs_BT=row[:-1],
                targets_BT=row[1:], answer_mask_BT=answer_T, route_mask_BT=np.arange(T) < len(question),
                gold_BM=gold_M)


def batch(task: MemoryTask, tokens_N: np.ndarray, *, seed: int, start: int, size: int) -> dict[str, np.ndarray]:
    """Examples start..start+size-1 stacked into a batch (keys BATCH_KEYS)."""
    rows = [make_example(task, tokens_N, seed=seed, index=start + i) for i in range(size)]
    return {k: np.stack([r[k] for r in rows]) for k in BATCH_KEYS}


# ---- the two-pass forward, the loss and the metrics ------------------------------------------------------

def encode_documents(model: Decoder, docs_BL: jax.Array, lengths_B: jax.Array, *,
                     partitioning: Partitioning = UNPARTITIONED) -> dict:
    """Pass 1: every router layer's pooled chunks (`layers.msa.EncodedDocs`) of the documents, one per row,
    each at local positions 0..len-1."""
    _, ctx, _ = model._trunk(docs_BL, None, None, partitioning, {"msa_doc_lengths_B": lengths_B})
    return ctx.msa_encoded


def query_forward(model: Decoder, tokens_BT: jax.Array, memory: dict[int, PooledMemory], *,
                  route_mask_BT: jax.Array | None = None, prefix_len_B: jax.Array | None = None,
                  partitioning: Partitioning = UNPARTITIONED) -> tuple[jax.Array, dict[int, Routing]]:
    """Pass 2: float32 logits [B, T, V] of the query against `memory` (router layer -> PooledMemory) and
    each router layer's `Routing`."""
    fields = {"msa_memory": memory, "msa_route_mask_BT": route_mask_BT, "msa_prefix_len_B": prefix_len_B}
    x, ctx, dtype = model._trunk(tokens_BT, None, None, partitioning, fields)
    return model._logits(x, dtype, model.hyper_head, model.final_norm), ctx.msa_routing


def memory_forward(model: Decoder, b: dict, *, partitioning: Partitioning = UNPARTITIONED
                   ) -> tuple[jax.Array, dict[int, Routing]]:
    """Both passes over a batch (BATCH_KEYS): each row's own M documents are its memory."""
    B, M, L = b["docs_BML"].shape
    encoded = encode_documents(model, b["docs_BML"].reshape(B * M, L), b["doc_lengths_BM"].reshape(B * M),
                               partitioning=partitioning)
    memory = {i: memory_from_encoded(e, M) for i, e in encoded.items()}
    return query_forward(model, b["inputs_BT"], memory, route_mask_BT=b["route_mask_BT"],
                         partitioning=partitioning)


def routing_loss(doc_scores_BM: jax.Array, gold_BM: jax.Array, temperature: float = 0.1) -> jax.Array:
    """Multi-positive InfoNCE: mean over rows of -sum_{gold d} log softmax(scores / t)_d / |gold|."""
    logp_BM = jax.nn.log_softmax(doc_scores_BM.astype(jnp.float32) / temperature, axis=-1)
    gold_BM = gold_BM.astype(jnp.float32)
    return jnp.mean(-(logp_BM * gold_BM).sum(-1) / jnp.maximum(gold_BM.sum(-1), 1.0))


def memory_loss(model: Decoder, b: dict, *, routing_weight: float, temperature: float,
                partitioning: Partitioning = UNPARTITIONED) -> tuple[jax.Array, dict[str, jax.Array]]:
    """LM cross-entropy on the answer tokens + routing_weight x the routing loss (mean over router
    layers); returns it and its parts, with the metrics of `memory_metrics`."""
    logits_BTV, routing = memory_forward(model, b, partitioning=partitioning)
    lm, _ = cross_entropy(logits_BTV, b["targets_BT"], b["answer_mask_BT"])
    route = sum(routing_loss(r.doc_scores_BM, b["gold_BM"], temperature) for r in routing.values()) / len(routing)
    parts = {"loss_answer": lm, "loss_routing": route, **memory_metrics(logits_BTV, routing, b)}
    return lm + routing_weight * route, parts


def recall_at_k(selected_Bk: jax.Array, gold_BM: jax.Array) -> jax.Array:
    """Per row: gold documents among the selected / min(gold documents, k)."""
    hits_B = jnp.take_along_axis(gold_BM, selected_Bk, axis=1).sum(-1)
    return hits_B / jnp.maximum(jnp.minimum(gold_BM.sum(-1), selected_Bk.shape[1]), 1.0)


def memory_metrics(logits_BTV: jax.Array, routing: dict[int, Routing], b: dict) -> dict[str, jax.Array]:
    """`routing_recall`: recall@k of the gold documents, mean over router layers and rows;
    `answer_accuracy`: the fraction of rows whose every answer token is the argmax."""
    recall = sum(recall_at_k(r.selected_Bk, b["gold_BM"]).mean() for r in routing.values()) / len(routing)
    right_BT = (jnp.argmax(logits_BTV, -1) == b["targets_BT"]) | ~b["answer_mask_BT"]
    return {"routing_recall": recall, "answer_accuracy": jnp.all(right_BT, axis=-1).mean()}
