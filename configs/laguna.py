"""Laguna-like decoders.

Presets: `tiny` (trains on 2 CPU cores in minutes), `small` (~100M-parameter replica: one full layer in
four, 3/4 of the sliding layers' query heads on full layers as in 48/64), and the released `xs2`
(33B total, ~3B active).
    python train.py --config=configs/laguna.py:tiny
"""
from __future__ import annotations

from configs.common import base_config, small_replica_training
from zoo.laguna import model_config

BYTE_VOCAB = 256
BYTE_IDS = dict(pad_id=0, bos_id=2, eos_ids=(1,))   # the byte presets' ids, as in configs/gemma4.py


def _layers(repeats: int, full_heads: int, sliding_heads: int):
    """One full layer then three sliding ones, `repeats` times; the first layer dense, the rest MoE."""
    attention_types = ("full", "sliding", "sliding", "sliding") * repeats
    num_heads = (full_heads, sliding_heads, sliding_heads, sliding_heads) * repeats
    moe_layers = (False,) + (True,) * (len(attention_types) - 1)
    return dict(attention_types=attention_types, num_heads=num_heads, moe_layers=moe_layers)


def _model(preset: str):
    if preset == "tiny":
        return model_config(
            vocab_size=BYTE_VOCAB, d_model=128, **_layers(1, full_heads=3, sliding_heads=4), num_kv_heads=1,
            head_dim=32, sliding_window=64, mlp_dim=384, num_experts=8, top_k=2, expert_dim=64,
            shared_expert_dim=64, routed_scale=2.5, max_positions=4096, **BYTE_IDS)
    if preset == "small":
        return model_config(
            vocab_size=BYTE_VOCAB, d_model=512, **_layers(3, full_heads=6, sliding_heads=8), num_kv_heads=2,
            head_dim=64, sliding_window=512, mlp_dim=2048, num_experts=32, top_k=4, expert_dim=160,
            shared_expert_dim=160, routed_scale=2.5, max_positions=32768, **BYTE_IDS)
    if preset == "xs2":
        return model_config(
            vocab_size=100_352, d_model=2048, **_layers(10, full_heads=48, sliding_heads=64), num_kv_heads=8,
            head_dim=128, sliding_window=512, mlp_dim=8192, num_experts=256, top_k=8, expert_dim=512,
            shared_expert_dim=512, routed_scale=2.5, max_positions=131_072)
    raise ValueError(f"unknown laguna preset {preset!r}; expected one of {PRESETS}")


PRESETS = ("tiny", "small", "xs2")


def get_config(preset: str = "tiny"):
    config = base_config(_model(preset or "tiny"))
    if preset == "small":
        small_replica_training(config)
    return config
