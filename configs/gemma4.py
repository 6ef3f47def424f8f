"""Gemma-4-like decoders.

Presets: `tiny` (trains on 2 CPU cores in minutes), `small` (~100M-parameter replica), `1b` (~1B, for
throughput benchmarks), and the released
text decoders `e2b`, `e4b`, `26b_a4b`, `31b`.
    python train.py --config=configs/gemma4.py:tiny
"""
from __future__ import annotations

from configs.common import base_config, small_replica_training
from zoo.gemma4 import model_config

BYTE_VOCAB = 256


def _pattern(num_sliding: int, repeats: int, tail: tuple[str, ...] = ()) -> tuple[str, ...]:
    return (("sliding",) * num_sliding + ("full",)) * repeats + tail


def _model(preset: str):
    if preset == "tiny":
        return model_config(
            vocab_size=BYTE_VOCAB, d_model=128, attention_types=_pattern(2, 2), num_heads=4, num_kv_heads=2,
            head_dim=32, global_head_dim=64, sliding_window=64, mlp_dim=384, double_wide_mlp=True,
            num_kv_shared_layers=2, ple_dim=16, max_positions=4096)
    if preset == "small":  # ~100M parameters
        return model_config(
            vocab_size=BYTE_VOCAB, d_model=672, attention_types=_pattern(3, 3), num_heads=8, num_kv_heads=2,
            head_dim=80, global_head_dim=160, sliding_window=512, mlp_dim=2688, double_wide_mlp=True,
            num_kv_shared_layers=3, ple_dim=64, max_positions=32768)
    if preset == "1b":  # ~1.1B parameters, byte vocabulary: a throughput/MFU benchmark size (one H100)
        return model_config(
            vocab_size=BYTE_VOCAB, d_model=2048, attention_types=_pattern(5, 3), num_heads=8, num_kv_heads=2,
            head_dim=256, global_head_dim=512, sliding_window=1024, mlp_dim=8192, num_kv_shared_layers=6,
            ple_dim=64, max_positions=32768)
    if preset == "e2b":
        return model_config(
            vocab_size=262_144, d_model=1536, attention_types=_pattern(4, 7), num_heads=8, num_kv_heads=1,
            head_dim=256, global_head_dim=512, sliding_window=512, mlp_dim=6144, double_wide_mlp=True,
            num_kv_shared_layers=20, ple_dim=256, ple_vocab_size=262_144)
    if preset == "e4b":
        return model_config(
            vocab_size=262_144, d_model=2560, attention_types=_pattern(5, 7), num_heads=8, num_kv_heads=2,
            head_dim=256, global_head_dim=512, sliding_window=512, mlp_dim=10240,
            num_kv_shared_layers=18, ple_dim=256, ple_vocab_size=262_144)
    if preset == "26b_a4b":
        return model_config(
            vocab_size=262_144, d_model=2816, attention_types=_pattern(5, 5), num_heads=16, num_kv_heads=8,
            head_dim=256, global_head_dim=512, num_global_kv_heads=2, k_eq_v=True, sliding_window=1024,
            mlp_dim=2112, num_experts=128, top_k=8, expert_dim=704)
    if preset == "31b":
        return model_config(
            vocab_size=262_144, d_model=5376, attention_types=_pattern(5, 10), num_heads=32, num_kv_heads=16,
            head_dim=256, global_head_dim=512, num_global_kv_heads=4, k_eq_v=True, sliding_window=1024,
            mlp_dim=21504)
    raise ValueError(f"unknown gemma4 preset {preset!r}; expected one of {PRESETS}")


PRESETS = ("tiny", "small", "1b", "e2b", "e4b", "26b_a4b", "31b")


def get_config(preset: str = "tiny"):
    preset = preset or "tiny"
    config = base_config(_model(preset))
    if preset == "tiny":
        # ~4 minutes on 2 idle CPU cores, ending near 2.5 validation bits per byte on the stdlib corpus.
        config.train.update(steps=300, eval_every=100, checkpoint_every=100)
        config.optimizer.warmup_steps = 20
    if preset == "small":
        small_replica_training(config)
    return config
