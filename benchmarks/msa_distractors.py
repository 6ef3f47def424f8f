"""Why MSA routing recall falls with bank size: recall@k of a trained MSA model's queries against banks of
their gold documents plus distractors of one kind at a time, at equal bank sizes:

  same_noun   facts `<unseen adjective> <noun of some query's key>=<3 digits>;` (what eval.py --memory uses)
  other_noun  facts `<unseen adjective> <noun no query asks about>=<3 digits>;`
  seen_key    facts whose key is of the training's kind (a seen adjective; a key no query asks about)
  no_fact     corpus text without a planted fact
Every bank also holds the queries' own gold documents (each a competitor for the other queries); size 0
is that bank alone.

Queries are restricted to keys whose noun is in the first half of the noun list, so the other half is
free for `other_noun`. Prints a table (and writes it as JSON with --out).
    python benchmarks/msa_distractors.py --workdir=runs/msa_tiny --sizes=0,16384,65536
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from zoo import checkpoints, data, memory
from zoo.tasks import ADJECTIVES, NOUNS

KINDS = ("same_noun", "other_noun", "seen_key", "no_fact")


def distractors(task: memory.MemoryTask, tokens_N: np.ndarray, kind: str, nouns: list[str], n: int, seed: int,
                asked: set[str]) -> list[np.ndarray]:
    rng = np.random.default_rng([seed, KINDS.index(kind)])
    out = []
    for _ in range(n):
        length = int(rng.integers(task.doc_len - task.doc_len // 4, task.doc_len + 1))
        if kind == "no_fact":
            start = int(rng.integers(0, len(tokens_N) - length))
            out.append(tokens_N[start:start + length].astype(np.int32))
            continue
        if kind == "seen_key":
            free = [k for k in task.keys() if k not in asked]
            key = free[int(rng.integers(len(free)))]
        else:
            key = f"{ADJECTIVES[6 + int(rng.integers(len(ADJECTIVES) - 6))]} {nouns[int(rng.integers(len(nouns)))]}"
        out.append(memory.make_document(rng, tokens_N, f"{key}={int(rng.integers(1000)):03d};", length,
                                        task.chunk_size))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--sizes", default="0,16384,65536")
    parser.add_argument("--queries", type=int, default=48)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    config = checkpoints.read_config(args.workdir)
    task, corpus = memory.MemoryTask.from_config(config), data.load_corpus(config.data)
    model = checkpoints.load(args.workdir)
    near, far = list(NOUNS[:len(NOUNS) // 2]), list(NOUNS[len(NOUNS) // 2:])
    queries, index, seen = [], 0, set()
    while len(queries) < args.queries:
        ex = memory.make_example(task, corpus.val_N, seed=args.seed, index=index)
        index += 1
        if ex["key"].split()[1] in near and ex["key"] not in seen:
            seen.add(ex["key"])
            queries.append(ex)
    gold_docs, gold_of = [], []
    for ex in queries:
        gold_of.append([])
        for m in np.flatnonzero(ex["gold_BM"]):
            gold_of[-1].append(len(gold_docs))
            gold_docs.append(ex["docs_BML"][m, :ex["doc_lengths_BM"][m]])
    mean_len = task.doc_len - task.doc_len // 8
    rows = []
    for size in sorted(int(s) for s in args.sizes.split(",")):
        count = max(int(size / mean_len) - len(gold_docs), 0)
        for kind in KINDS:
            if count == 0 and kind != KINDS[0]:
                continue
            docs = gold_docs + distractors(task, corpus.val_N, kind, near if kind == "same_noun" else far, count,
                                           args.seed, seen)
            bank = memory.MemoryBank.build(model, docs, batch_size=64)
            hits = []
            for start in range(0, len(queries), 8):
                group = queries[start:start + 8]
                tokens = np.stack([ex["inputs_BT"] for ex in group])
                mask = np.stack([ex["route_mask_BT"] for ex in group])
                gold_BM = np.zeros((len(group), bank.num_docs), np.float32)
                for r, q in enumerate(range(start, start + len(group))):
                    gold_BM[r, gold_of[q]] = 1.0
                _, routing = bank.query(model, tokens, mask)
                hits += [np.asarray(memory.recall_at_k(r.selected_Bk, jnp.asarray(gold_BM))) for r in routing.values()]
            rows.append({"bank_tokens": int(bank.doc_lengths_M.sum()), "bank_docs": bank.num_docs,
                         "distractors": kind, "routing_recall": float(np.mean(np.concatenate(hits)))})
            print(f"{rows[-1]['bank_tokens']:>8} tokens {bank.num_docs:>5} docs  {kind:<10}  "
                  f"recall@k {rows[-1]['routing_recall']:.3f}", flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
