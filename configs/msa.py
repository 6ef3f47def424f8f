"""Memory Sparse Attention (layers.msa) on a Laguna-style stack, trained on memory-bank examples
(zoo.memory: N documents of corpus text with planted key=value facts and a query whose answer is in one
or more of them) with the LM loss on the answer plus the InfoNCE routing loss; the raw text of the best
document is re-injected before the question (the gold one while training) so the answer can be copied.

Presets: `tiny` (learns to route on 2 CPU cores in minutes), `small` (one GPU). The MSA layers are the
router layers; the plain layers below them see the query's own tokens only.
    python train.py --config=configs/msa.py:tiny
"""
from __future__ import annotations

import ml_collections

from configs.common import base_config
from zoo.laguna import model_config

BYTE_VOCAB = 256
BYTE_IDS = dict(pad_id=0, bos_id=2, eos_ids=(1,))
MSA_ROPE = {"kind": "default", "theta": 10_000.0, "fraction": 1.0}


def _model(preset: str):
    if preset == "tiny":
        m = model_config(vocab_size=BYTE_VOCAB, d_model=96, attention_types=("full", "msa"), num_heads=4,
                         num_kv_heads=2, head_dim=24, sliding_window=0, mlp_dim=256, moe_layers=(False, False),
                         gating="per_head", max_positions=4096, **BYTE_IDS)
        m.msa_chunk_size, m.msa_top_k, m.msa_max_doc_len = 16, 2, 128
    elif preset == "small":
        types = ("full",) * 3 + ("msa",) * 3
        m = model_config(vocab_size=BYTE_VOCAB, d_model=512, attention_types=types, num_heads=8, num_kv_heads=4,
                         head_dim=64, sliding_window=0, mlp_dim=1536, moe_layers=(False,) * 6, gating="per_head",
                         max_positions=32768, **BYTE_IDS)
        m.msa_chunk_size, m.msa_top_k, m.msa_max_doc_len = 64, 4, 1024
    else:
        raise ValueError(f"unknown msa preset {preset!r}; expected one of {PRESETS}")
    m.rope.msa = dict(MSA_ROPE)
    return m


PRESETS = ("tiny", "small")


def memory_config(preset: str) -> ml_collections.ConfigDict:
    """The `memory` section: the examples (zoo.memory.MemoryTask) and the routing loss."""
    c = ml_collections.ConfigDict()
    c.num_docs = 8 if preset == "tiny" else 16            # documents per example
    c.doc_len = 128 if preset == "tiny" else 512          # longest document (tokens); <= model.msa_max_doc_len
    c.query_len = 24 if preset == "tiny" else 32          # query + answer tokens (padded)
    c.multi_positive_rate = 0.25                          # examples whose fact sits in two documents
    c.reinject_docs = 1                                   # raw text of the best documents put before the query
    c.reinject_gold_in_training = True                    # training re-injects the gold documents (teacher forcing)
    c.question_loss_weight = 1.0                          # the question's bytes too (copied from the document)
    c.routing_loss_weight = 1.0
    c.temperature = 0.1
    return c


def get_config(preset: str = "tiny"):
    preset = preset or "tiny"
    config = base_config(_model(preset))
    config.memory = memory_config(preset)
    t = config.train
    if preset == "tiny":
        t.steps, t.batch_size, t.seq_len, t.eval_every, t.eval_batches, t.checkpoint_every = 1000, 8, 128, 250, 4, 500
        config.optimizer.learning_rate, config.optimizer.warmup_steps = 3e-3, 30
    else:
        t.steps, t.batch_size, t.seq_len, t.eval_every, t.eval_batches, t.checkpoint_every = 2000, 16, 512, 250, 8, 500
        config.optimizer.learning_rate = 1e-3
    return config
