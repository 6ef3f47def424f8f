"""ZAYA1-like decoders (Compressed Convolutional Attention, top-1 MoE with an MLP router and a skip class).

Presets: `tiny` (trains on 2 CPU cores in minutes), `small` (~100M-parameter replica), and the released
`8b` (ZAYA1-8B: 40 layers, 16 experts, 8.84B parameters, 0.75B active outside the embeddings).
    python train.py --config=configs/zaya1.py:tiny
"""
from __future__ import annotations

from configs.common import base_config, small_replica_training
from zoo.zaya1 import model_config

BYTE_VOCAB = 256
BYTE_IDS = dict(pad_id=0, bos_id=2, eos_id=1)   # the byte presets' ids, as in configs/gemma4.py


def _model(preset: str):
    if preset == "tiny":
        return model_config(
            vocab_size=BYTE_VOCAB, d_model=128, attention_types=("cca",) * 4, num_heads=4, num_kv_heads=2,
            head_dim=16, num_experts=4, expert_dim=256, router_dim=32, max_positions=4096, **BYTE_IDS)
    if preset == "small":
        return model_config(
            vocab_size=BYTE_VOCAB, d_model=768, attention_types=("cca",) * 12, num_heads=8, num_kv_heads=2,
            head_dim=48, num_experts=8, expert_dim=384, router_dim=64, max_positions=32768, **BYTE_IDS)
    if preset == "8b":
        return model_config(
            vocab_size=262_272, d_model=2048, attention_types=("cca",) * 40, num_heads=8, num_kv_heads=2,
            head_dim=128, num_experts=16, expert_dim=2048, router_dim=256, max_positions=131_072)
    raise ValueError(f"unknown zaya1 preset {preset!r}; expected one of {PRESETS}")


PRESETS = ("tiny", "small", "8b")


def get_config(preset: str = "tiny"):
    config = base_config(_model(preset or "tiny"))
    if preset == "small":
        small_replica_training(config)
    return config
