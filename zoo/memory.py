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
import re
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from layers import kinds
from layers.partitioning import UNPARTITIONED, Partitioning
from layers.msa import PooledMemory, Routing, memory_from_encoded, num_chunks, route_scores, select_documents
from zoo import inference
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


def make_document(rng: np.random.Generator, tokens_N: np.ndarray, fact: str, length: int, chunk_size: int
                  ) -> np.ndarray:
    """`length` tokens of corpus text with `fact` written over it from a chunk boundary."""
    fact_F = _encode(fact)
    start = int(rng.integers(0, len(tokens_N) - length))
    doc_L = tokens_N[start:start + length].astype(np.int32)
    at = chunk_size * int(rng.integers(0, max((length - len(fact_F)) // chunk_size, 0) + 1))
    doc_L[at:at + len(fact_F)] = fact_F[:length - at]
    return doc_L


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
        n = int(lengths_M[m])
        docs_ML[m, :n] = make_document(rng, tokens_N, f"{keys[picked[holders[m]]]}={values[holders[m]]};", n, P)
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
                gold_BM=gold_M, key=keys[picked[gold]])


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


def reinjected_context(docs_BML: jax.Array, doc_lengths_BM: jax.Array, selected_Bn: jax.Array,
                       query_BT: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Re-injection of the original text: each row's selected documents' real tokens, in the order given,
    then its query; padded at the end to n * L + T tokens. Returns (tokens [B, n*L+T], the query's start
    in each row int32 [B])."""
    B, M, L = docs_BML.shape
    n, T = selected_Bn.shape[1], query_BT.shape[1]
    lengths_Bn = jnp.take_along_axis(doc_lengths_BM, selected_Bn, axis=1).astype(jnp.int32)
    ends_Bn = jnp.cumsum(lengths_Bn, axis=1)
    start_B = ends_Bn[:, -1]
    p_X = jnp.arange(n * L + T)
    slot_BX = jnp.sum(p_X[None, :, None] >= ends_Bn[:, None, :], axis=-1)            # which document, n = query
    slot_c_BX = jnp.minimum(slot_BX, n - 1)
    within_BX = p_X[None] - (jnp.take_along_axis(ends_Bn - lengths_Bn, slot_c_BX, axis=1))
    doc_BX = jnp.take_along_axis(selected_Bn, slot_c_BX, axis=1)
    from_doc_BX = docs_BML[jnp.arange(B)[:, None], doc_BX, jnp.clip(within_BX, 0, L - 1)]
    return jnp.where(slot_BX < n, from_doc_BX, place(query_BT, start_B, n * L + T, PAD)), start_B


def place(x_BT: jax.Array, start_B: jax.Array, length: int, fill) -> jax.Array:
    """x's rows written from column start_B[b] of a [B, length] array filled with `fill`."""
    T = x_BT.shape[1]
    at_BX = jnp.arange(length)[None] - start_B[:, None]
    inside_BX = (at_BX >= 0) & (at_BX < T)
    return jnp.where(inside_BX, jnp.take_along_axis(x_BT, jnp.clip(at_BX, 0, T - 1), axis=1), fill)


def reinjected_documents(routing: dict[int, Routing], count: int, gold_BM: jax.Array | None = None) -> jax.Array:
    """The `count` documents to re-inject [B, count], best first: top of the router layers' mean document
    scores (a choice, not differentiated); with `gold_BM` (teacher forcing) the gold documents first."""
    scores_BM = jax.lax.stop_gradient(sum(r.doc_scores_BM for r in routing.values()) / len(routing))
    if gold_BM is not None:
        scores_BM = jnp.where(gold_BM > 0, 1e6, 0.0) + scores_BM
    return select_documents(scores_BM, count)


def memory_forward(model: Decoder, b: dict, *, reinject_docs: int = 0, reinject_gold: bool = False,
                   partitioning: Partitioning = UNPARTITIONED) -> tuple[jax.Array, dict[int, Routing]]:
    """Both passes over a batch (BATCH_KEYS): each row's own M documents are its memory. With
    `reinject_docs` = n > 0, as MSA does after retrieval, the query pass routes, then the raw text of the n
    best documents is put before the query and the query runs again (against the same memory) to give
    the logits; the routing returned is the first pass's (the choice of documents). `reinject_gold`
    (teacher forcing, for training): the gold documents are re-injected first whatever the routing chose.
    Logits [B, T, V] are aligned with b["inputs_BT"] either way."""
    B, M, L = b["docs_BML"].shape
    encoded = encode_documents(model, b["docs_BML"].reshape(B * M, L), b["doc_lengths_BM"].reshape(B * M),
                               partitioning=partitioning)
    memory = {i: memory_from_encoded(e, M) for i, e in encoded.items()}
    logits_BTV, routing = query_forward(model, b["inputs_BT"], memory, route_mask_BT=b["route_mask_BT"],
                                        partitioning=partitioning)
    if reinject_docs == 0:
        return logits_BTV, routing
    selected_Bn = reinjected_documents(routing, reinject_docs, b["gold_BM"] if reinject_gold else None)
    tokens_BX, start_B = reinjected_context(b["docs_BML"], b["doc_lengths_BM"], selected_Bn, b["inputs_BT"])
    X, T = tokens_BX.shape[1], b["inputs_BT"].shape[1]
    logits_BXV, _ = query_forward(model, tokens_BX, memory, partitioning=partitioning,
                                  route_mask_BT=place(b["route_mask_BT"], start_B, X, False))
    at_BT = start_B[:, None] + jnp.arange(T)[None]
    return jnp.take_along_axis(logits_BXV, at_BT[:, :, None], axis=1), routing


def routing_loss(doc_scores_BM: jax.Array, gold_BM: jax.Array, temperature: float = 0.1) -> jax.Array:
    """Multi-positive InfoNCE: mean over rows of -sum_{gold d} log softmax(scores / t)_d / |gold|."""
    logp_BM = jax.nn.log_softmax(doc_scores_BM.astype(jnp.float32) / temperature, axis=-1)
    gold_BM = gold_BM.astype(jnp.float32)
    return jnp.mean(-(logp_BM * gold_BM).sum(-1) / jnp.maximum(gold_BM.sum(-1), 1.0))


def memory_loss(model: Decoder, b: dict, *, routing_weight: float, temperature: float, reinject_docs: int = 0,
                reinject_gold: bool = False, question_weight: float = 0.0,
                partitioning: Partitioning = UNPARTITIONED) -> tuple[jax.Array, dict[str, jax.Array]]:
    """LM cross-entropy on the answer tokens + routing_weight x the routing loss (mean over router
    layers) + question_weight x the cross-entropy of the question's own next tokens (with re-injection
    the key's bytes can be copied from the document: a denser copying signal than the answer alone);
    returns it and its parts, with the metrics of `memory_metrics`. `reinject_docs`, `reinject_gold`:
    see `memory_forward`."""
    logits_BTV, routing = memory_forward(model, b, reinject_docs=reinject_docs, reinject_gold=reinject_gold,
                                         partitioning=partitioning)
    lm, _ = cross_entropy(logits_BTV, b["targets_BT"], b["answer_mask_BT"])
    route = sum(routing_loss(r.doc_scores_BM, b["gold_BM"], temperature) for r in routing.values()) / len(routing)
    parts = {"loss_answer": lm, "loss_routing": route, **memory_metrics(logits_BTV, routing, b)}
    total = lm + routing_weight * route
    if question_weight:
        question_BT = b["route_mask_BT"] & ~b["answer_mask_BT"]
        parts["loss_question"] = cross_entropy(logits_BTV, b["targets_BT"], question_BT)[0]
        total = total + question_weight * parts["loss_question"]
    return total, parts


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


# ---- the memory bank ---------------------------------------------------------------------------------------

def config_fingerprint(model_cfg) -> str:
    """A short hash of the model config: a bank is only valid for the config that encoded it."""
    cfg = model_cfg.to_dict() if hasattr(model_cfg, "to_dict") else dict(model_cfg)
    return hashlib.sha256(json.dumps(cfg, sort_keys=True, default=str).encode()).hexdigest()[:16]


class MemoryBank:
    """Documents encoded once (each at its own local positions 0..len-1): per router layer the pooled
    routing keys on the device ([1, M, C, K, H], with the chunk mask [1, M, C]) and the pooled content K/V in
    host memory (numpy [M, C, K, H]); a query fetches the selected documents' chunks only.

    `MemoryBank.build(model, docs)` encodes; `query(model, tokens_BT)` runs a query batch against it;
    `save(path)` / `MemoryBank.load(path, model_cfg)` keep it as one .npz with the config's fingerprint."""

    def __init__(self, fingerprint: str, doc_lengths_M: np.ndarray, router_k: dict, valid_MC: np.ndarray,
                 content_k: dict, content_v: dict):
        if len(doc_lengths_M) == 0:
            raise ValueError("the memory bank is empty: give it at least one document")
        self.fingerprint, self.doc_lengths_M = fingerprint, np.asarray(doc_lengths_M)
        self.layers = sorted(router_k)
        self.router_k = {i: jnp.asarray(router_k[i])[None] for i in self.layers}   # device
        self.valid = jnp.asarray(valid_MC)[None]
        self.content_k = {i: np.asarray(content_k[i]) for i in self.layers}        # host
        self.content_v = {i: np.asarray(content_v[i]) for i in self.layers}
        self._fetch = {i: self._fetcher(i) for i in self.layers}
        self._query_fn = {}

    @property
    def num_docs(self) -> int:
        return len(self.doc_lengths_M)

    def _fetcher(self, layer: int):
        k_MCKH, v_MCKH = self.content_k[layer], self.content_v[layer]
        dtype = np.dtype(self.router_k[layer].dtype)

        def fetch(selected_Bk):
            selected_Bk = np.asarray(selected_Bk)
            return k_MCKH[selected_Bk].astype(dtype), v_MCKH[selected_Bk].astype(dtype)
        return fetch

    def memory(self) -> dict[int, PooledMemory]:
        """Router layer -> PooledMemory whose content comes from host memory through `fetch`."""
        return {i: PooledMemory(self.router_k[i], self.valid, fetch=self._fetch[i]) for i in self.layers}

    def device_bytes(self) -> int:
        return sum(int(x.nbytes) for x in self.router_k.values()) + int(self.valid.nbytes)

    def host_bytes(self) -> int:
        return sum(int(self.content_k[i].nbytes + self.content_v[i].nbytes) for i in self.layers)

    @classmethod
    def build(cls, model: Decoder, docs: list[np.ndarray], *, batch_size: int = 64) -> "MemoryBank":
        """Encodes `docs` (token id arrays) `batch_size` at a time; fails naming a document longer than the
        model's `msa_max_doc_len` or an empty list."""
        if len(docs) == 0:
            raise ValueError("the memory bank is empty: give it at least one document")
        cfg = model.config
        layers = router_layers(cfg)
        if not layers:
            raise ValueError("a memory bank needs a model with at least one 'msa' layer")
        limit, P = kinds.option(cfg, "msa_max_doc_len", layers[0]), kinds.option(cfg, "msa_chunk_size", layers[0])
        lengths_M = np.array([len(d) for d in docs], np.int32)
        for m, n in enumerate(lengths_M):
            if not 0 < n <= limit:
                raise ValueError(f"document {m} has {n} tokens; documents need 1..{limit} (model.msa_max_doc_len)")
        L = num_chunks(int(lengths_M.max()), P) * P
        graphdef, state = nnx.split(model)
        encode = jax.jit(lambda state, docs_BL, lengths_B: encode_documents(nnx.merge(graphdef, state), docs_BL,
                                                                              lengths_B))
        parts: dict[int, list] = {i: [] for i in layers}
        for start in range(0, len(docs), batch_size):
            chunk = docs[start:start + batch_size]
            docs_BL = np.full((batch_size, L), PAD, np.int32)
            lengths_B = np.ones(batch_size, np.int32)
            for r, d in enumerate(chunk):
                docs_BL[r, :len(d)], lengths_B[r] = d, len(d)
            encoded = jax.device_get(encode(state, docs_BL, lengths_B))
            for i in layers:
                parts[i].append(jax.tree.map(lambda x: x[:len(chunk)], encoded[i]))
        cat = lambda i, field: np.concatenate([getattr(e, field) for e in parts[i]])
        return cls(config_fingerprint(cfg), lengths_M, {i: cat(i, "router_k_BCKH") for i in layers},
                   cat(layers[0], "valid_BC"), {i: cat(i, "k_BCKH") for i in layers},
                   {i: cat(i, "v_BCKH") for i in layers})

    def check_top_k(self, model: Decoder) -> None:
        for i in self.layers:
            k = kinds.option(model.config, "msa_top_k", i)
            if k > self.num_docs:
                raise ValueError(f"top-k {k} (model.msa_top_k of layer {i}) exceeds the {self.num_docs} documents "
                                 "in the memory bank")

    def query(self, model: Decoder, tokens_BT, route_mask_BT=None) -> tuple[jax.Array, dict[int, Routing]]:
        """Logits [B, T, V] of a query batch against the bank and each router layer's Routing."""
        if config_fingerprint(model.config) != self.fingerprint:
            raise ValueError(f"the memory bank was encoded by another model config (fingerprint {self.fingerprint}, "
                             f"this model's {config_fingerprint(model.config)})")
        self.check_top_k(model)
        graphdef, state = nnx.split(model)
        key = id(model)
        if key not in self._query_fn:
            self._query_fn = {key: jax.jit(lambda state, tokens, mask, memory: query_forward(
                nnx.merge(graphdef, state), tokens, memory, route_mask_BT=mask))}
        return self._query_fn[key](state, jnp.asarray(tokens_BT), None if route_mask_BT is None
                                   else jnp.asarray(route_mask_BT), self.memory())

    def save(self, path: str) -> None:
        """One .npz: the fingerprint, document lengths, chunk mask and every layer's pooled arrays."""
        arrays = {"fingerprint": np.array(self.fingerprint), "doc_lengths_M": self.doc_lengths_M,
                  "valid_MC": np.asarray(self.valid[0])}
        for i in self.layers:
            arrays[f"router_k_{i}"] = np.asarray(self.router_k[i][0])
            arrays[f"k_{i}"], arrays[f"v_{i}"] = self.content_k[i], self.content_v[i]
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "wb") as f:
            np.savez(f, **arrays)

    @classmethod
    def load(cls, path: str, model_cfg) -> "MemoryBank":
        """The bank saved at `path`; fails if it was saved for another model config."""
        if not os.path.exists(path):
            raise FileNotFoundError(f"no memory bank at {path}")
        with np.load(path) as z:
            saved, ours = str(z["fingerprint"]), config_fingerprint(model_cfg)
            if saved != ours:
                raise ValueError(f"the memory bank {path} was saved by another model config (fingerprint {saved}, "
                                 f"this config's {ours})")
            layers = sorted(int(k.split("_")[-1]) for k in z.files if k.startswith("router_k_"))
            return cls(saved, z["doc_lengths_M"], {i: z[f"router_k_{i}"] for i in layers}, z["valid_MC"],
                       {i: z[f"k_{i}"] for i in layers}, {i: z[f"v_{i}"] for i in layers})


def reinjected_query(model: Decoder, bank: MemoryBank, docs: list[np.ndarray], tokens_BT, route_mask_BT, count: int
                     ) -> tuple[jax.Array, dict[int, Routing]]:
    """`bank.query` with re-injection (as `memory_forward` does in training): the query routes, the raw text
    of its `count` best documents (docs[m] is bank document m) goes before it, and the query runs again;
    logits [B, T, V] aligned with tokens_BT, and the routing pass's Routing. count 0: `bank.query`."""
    logits_BTV, routing = bank.query(model, tokens_BT, route_mask_BT)
    if count == 0:
        return logits_BTV, routing
    if len(docs) != bank.num_docs:
        raise ValueError(f"docs has {len(docs)} texts for a bank of {bank.num_docs} documents")
    tokens_BT, route_mask_BT = np.asarray(tokens_BT), np.asarray(route_mask_BT)
    B, T = tokens_BT.shape
    selected_Bn = np.asarray(reinjected_documents(routing, count))
    X = count * int(bank.doc_lengths_M.max()) + T
    context_BX, mask_BX, start_B = np.full((B, X), PAD, np.int32), np.zeros((B, X), bool), np.zeros(B, np.int32)
    for b in range(B):
        text = np.concatenate([np.asarray(docs[m], np.int32) for m in selected_Bn[b]])
        n = start_B[b] = len(text)
        context_BX[b, :n], context_BX[b, n:n + T], mask_BX[b, n:n + T] = text, tokens_BT[b], route_mask_BT[b]
    logits_BXV, _ = bank.query(model, context_BX, mask_BX)
    at_BT = start_B[:, None] + np.arange(T)[None]
    return jnp.take_along_axis(logits_BXV, jnp.asarray(at_BT)[:, :, None], axis=1), routing


# ---- memory interleave (multi-hop retrieval) ---------------------------------------------------------------

END_OF_IDS = ord("\n")        # a hop's list of document ids ends with a newline


@dataclasses.dataclass
class Interleave:
    """What `memory_interleave` did: the final context (question + appended document texts), the
    document ids each hop asked for, the documents each hop's routing selected (router layer -> [k]),
    and why it stopped ("end", "max_hops" or "no_new_docs")."""
    context: np.ndarray
    hop_ids: list[list[int]]
    hop_routing: list[dict[int, np.ndarray]]
    stop: str


def parse_doc_ids(tokens: np.ndarray, num_docs: int) -> list[int]:
    """The document ids written in a hop's generated bytes (decimal numbers, any separators), in order,
    without repeats and ids outside 0..num_docs-1."""
    text = bytes(int(t) for t in tokens if 0 < int(t) < 256).decode("latin-1")
    out = []
    for d in (int(m) for m in re.findall(r"\d+", text)):
        if d < num_docs and d not in out:
            out.append(d)
    return out


def memory_interleave(model: Decoder, bank: MemoryBank, docs: list[np.ndarray], question: np.ndarray, *,
                      end_token: int, max_hops: int = 3, max_id_tokens: int = 16) -> Interleave:
    """MSA's memory interleave: each hop routes the current context against the bank (the query pass,
    whose MSA layers attend over the selected documents' pooled chunks) and takes its next-token argmax;
    unless that is `end_token`, greedy decoding (zoo.generate) continues it into a list of document ids
    ending with a newline (or `end_token`); the raw text of the ids not yet in the context is appended,
    and the next hop routes the grown context. Stops at `end_token` (after appending the ids written
    before it), after `max_hops` hops, or when a hop names no new document. Byte vocabulary: ids are decimal digits. docs[m] is bank document m."""
    if len(docs) != bank.num_docs:
        raise ValueError(f"docs has {len(docs)} texts for a bank of {bank.num_docs} documents")
    if max_hops < 1 or max_id_tokens < 1:
        raise ValueError(f"max_hops and max_id_tokens must be >= 1, got {max_hops} and {max_id_tokens}")
    context = np.asarray(question, np.int32).reshape(-1)
    added: set[int] = set()
    hop_ids, hop_routing = [], []
    for hop in range(max_hops):
        logits_BTV, routing = bank.query(model, context[None])
        hop_routing.append({i: np.asarray(r.selected_Bk[0]) for i, r in routing.items()})
        first = int(jnp.argmax(logits_BTV[0, -1]))
        if first == end_token:
            return Interleave(context, hop_ids, hop_routing, "end")
        written = [first]
        if first != END_OF_IDS and max_id_tokens > 1:
            more = inference.generate(model, np.concatenate([context, [first]]), max_new_tokens=max_id_tokens - 1,
                                      stop_tokens=(END_OF_IDS, end_token))
            written += [int(t) for t in np.asarray(more[0])]
        ended = end_token in written
        if ended:
            written = written[:written.index(end_token)]
        ids = [d for d in parse_doc_ids(np.asarray(written), bank.num_docs) if d not in added]
        hop_ids.append(ids)
        added.update(ids)
        context = np.concatenate([context, *(np.asarray(docs[d], np.int32) for d in ids)])
        if ended or not ids:
            return Interleave(context, hop_ids, hop_routing, "end" if ended else "no_new_docs")
    return Interleave(context, hop_ids, hop_routing, "max_hops")


# ---- retrieval against bank size (eval.py --memory) -------------------------------------------------------

SWEEP_FIELDS = ("bank_tokens", "bank_docs", "routing_recall", "answer_accuracy", "route_ms_per_query",
                "query_ms_per_query", "device_bytes", "host_bytes")


def sweep_queries(task: MemoryTask, tokens_N: np.ndarray, *, num_queries: int, seed: int) -> list[dict]:
    """`num_queries` examples with distinct gold keys (examples whose key repeats an earlier one are skipped)."""
    if num_queries > len(task.keys()):
        raise ValueError(f"at most {len(task.keys())} queries have distinct keys, asked for {num_queries}")
    out, seen, index = [], set(), 0
    while len(out) < num_queries:
        ex = make_example(task, tokens_N, seed=seed, index=index)
        index += 1
        if ex["key"] not in seen:
            seen.add(ex["key"])
            out.append(ex)
    return out


def distractor_docs(task: MemoryTask, tokens_N: np.ndarray, n: int, *, seed: int) -> list[np.ndarray]:
    """`n` documents whose facts use keys no query asks about (adjectives outside the task's)."""
    rng = np.random.default_rng([seed, 1 << 20])
    keys = [f"{a} {w}" for a in ADJECTIVES[6:] for w in NOUNS]
    docs = []
    for _ in range(n):
        length = int(rng.integers(task.doc_len - task.doc_len // 4, task.doc_len + 1))
        fact = f"{keys[int(rng.integers(len(keys)))]}={int(rng.integers(1000)):03d};"
        docs.append(make_document(rng, tokens_N, fact, length, task.chunk_size))
    return docs


def _timed(fn, *args, repeats: int = 3) -> float:
    """Best wall time of `fn(*args)` (compiled first) in seconds."""
    jax.block_until_ready(fn(*args))
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        best = min(best, time.perf_counter() - start)
    return best


def bank_sweep(model: Decoder, task: MemoryTask, tokens_N: np.ndarray, *, sizes: list[int], num_queries: int,
               seed: int = 0, batch_size: int = 8, reinject_docs: int = 0) -> list[dict]:
    """For each bank size (tokens, ascending): a bank of the queries' gold documents plus distractors (each
    bank holds the smaller ones' documents), the queries run against it; one row of SWEEP_FIELDS each.
    Routing latency: one router layer's scores + top-k over the bank for a batch of queries (router
    queries of the real shape), per query; query latency: the whole query pass with host fetches."""
    queries = sweep_queries(task, tokens_N, num_queries=num_queries, seed=seed)
    gold_docs, gold_of = [], []
    for ex in queries:
        mine = []
        for m in np.flatnonzero(ex["gold_BM"]):
            mine.append(len(gold_docs))
            gold_docs.append(ex["docs_BML"][m, :ex["doc_lengths_BM"][m]])
        gold_of.append(mine)
    mean_len = (task.doc_len + task.doc_len - task.doc_len // 4) / 2
    counts = [max(int(size / mean_len) - len(gold_docs), 0) for size in sorted(sizes)]
    distractors = distractor_docs(task, tokens_N, max(counts), seed=seed)
    layers = router_layers(model.config)
    rows = []
    for size, count in zip(sorted(sizes), counts):
        docs = gold_docs + distractors[:count]
        order = np.random.default_rng([seed, size]).permutation(len(docs))   # bank slot j holds docs[order[j]]
        where = np.argsort(order)
        bank_docs = [docs[j] for j in order]
        bank = MemoryBank.build(model, bank_docs, batch_size=64)
        bank.check_top_k(model)
        recalls, right, query_s = [], [], 0.0
        for start in range(0, len(queries), batch_size):
            group = queries[start:start + batch_size]
            b = {k: np.stack([ex[k] for ex in group]) for k in ("inputs_BT", "targets_BT", "answer_mask_BT",
                                                                  "route_mask_BT")}
            gold_BM = np.zeros((len(group), bank.num_docs), np.float32)
            for r, q in enumerate(range(start, start + len(group))):
                gold_BM[r, where[gold_of[q]]] = 1.0
            query_s += _timed(bank.query, model, b["inputs_BT"], b["route_mask_BT"], repeats=1)
            logits_BTV, routing = reinjected_query(model, bank, bank_docs, b["inputs_BT"], b["route_mask_BT"],
                                                   reinject_docs)
            metrics = memory_metrics(logits_BTV, routing, {**b, "gold_BM": jnp.asarray(gold_BM)})
            recalls.append(float(metrics["routing_recall"]) * len(group))
            right.append(float(metrics["answer_accuracy"]) * len(group))
        layer = layers[0]
        N, H = kinds.option(model.config, "num_heads", layer), kinds.option(model.config, "head_dims", layer)
        router_q_BTNH = jax.random.normal(jax.random.key(seed), (batch_size, task.query_len, N, H))
        mask_BT = jnp.ones((batch_size, task.query_len), bool)
        top_k = kinds.option(model.config, "msa_top_k", layer)
        route = jax.jit(lambda q, m, k, v: select_documents(route_scores(q, m, k, v), top_k))
        route_s = _timed(route, router_q_BTNH, mask_BT, bank.router_k[layer], bank.valid)
        rows.append({"bank_tokens": int(bank.doc_lengths_M.sum()), "bank_docs": bank.num_docs,
                     "routing_recall": sum(recalls) / len(queries), "answer_accuracy": sum(right) / len(queries),
                     "route_ms_per_query": 1e3 * route_s / batch_size, "query_ms_per_query": 1e3 * query_s / len(queries),
                     "device_bytes": bank.device_bytes(), "host_bytes": bank.host_bytes()})
    return rows


def write_sweep(rows: list[dict], out_dir: str) -> list[str]:
    """results.json, results.csv and results.png (recall and accuracy, and latency, against bank tokens)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(out_dir, exist_ok=True)
    paths = [os.path.join(out_dir, f"results.{ext}") for ext in ("json", "csv", "png")]
    with open(paths[0], "w") as f:
        json.dump(rows, f, indent=2)
    with open(paths[1], "w") as f:
        f.write(",".join(SWEEP_FIELDS) + "\n")
        f.writelines(",".join(str(r[k]) for k in SWEEP_FIELDS) + "\n" for r in rows)
    tokens = [r["bank_tokens"] for r in rows]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    left.plot(tokens, [r["routing_recall"] for r in rows], "o-", label="routing recall@k")
    left.plot(tokens, [r["answer_accuracy"] for r in rows], "s-", label="answer accuracy")
    left.set(xscale="log", xlabel="bank tokens", ylim=(0, 1.05), title="retrieval against bank size")
    left.legend()
    right.plot(tokens, [r["route_ms_per_query"] for r in rows], "o-", label="routing (scores + top-k)")
    right.plot(tokens, [r["query_ms_per_query"] for r in rows], "s-", label="whole query pass")
    right.set(xscale="log", yscale="log", xlabel="bank tokens", ylabel="ms per query", title="latency")
    right.legend()
    fig.tight_layout()
    fig.savefig(paths[2], dpi=100)
    plt.close(fig)
    return paths
