"""DeepSeek-V4-like decoders.

Presets: `tiny` (byte vocabulary; trains on 2 CPU cores in minutes), `small` (~150M-parameter byte-level
replica keeping the CSA/HCA alternation, the ratio-4 and ratio-128 compressors, hash routing and mHC),
and the released sizes `flash` and `pro` (layer patterns from their `compress_ratios`: 0 = SWA, 4 = CSA,
128 = HCA; the trailing entry is the multi-token-prediction block).
    python train.py --config=configs/deepseek_v4.py:tiny
"""
from __future__ import annotations

from configs.common import base_config, small_replica_training
from zoo.deepseek_v4 import model_config

BYTE_VOCAB = 256
KINDS = {0: "swa", 4: "csa", 128: "hca"}


def _pattern(ratios) -> tuple[str, ...]:
    return tuple(KINDS[r] for r in ratios)


def _model(preset: str):
    if preset == "tiny":   # ratio-16 HCA: a 256-token training sequence holds 16 of its entries
        return model_config(
            vocab_size=BYTE_VOCAB, d_model=64, attention_types=_pattern([0, 4, 128, 4]), num_heads=4,
            head_dim=32, rope_dim=16, q_rank=48, out_groups=2, out_rank=32, window=32, hca_ratio=16,
            index_heads=4, index_dim=32, index_top_k=16, num_experts=4, top_k=2, expert_dim=128,
            num_hash_layers=1, hc_streams=4, mtp_depth=1, max_positions=4096,
            yarn={"factor": 4.0, "original_max_positions": 1024, "beta_fast": 32.0, "beta_slow": 1.0})
    if preset == "small":  # ~150M parameters (~50M active), the MTP block included
        return model_config(
            vocab_size=BYTE_VOCAB, d_model=512, attention_types=_pattern([0, 0] + [4, 128] * 5 + [4]),
            num_heads=8, head_dim=128, rope_dim=32, q_rank=256, out_groups=4, out_rank=256, window=128,
            index_heads=16, index_dim=64, index_top_k=64, num_experts=12, top_k=2, expert_dim=448,
            num_hash_layers=3, hc_streams=4, mtp_depth=1, max_positions=65_536,
            yarn={"factor": 4.0, "original_max_positions": 16_384, "beta_fast": 32.0, "beta_slow": 1.0})
    if preset == "flash":
        return model_config(
            vocab_size=129_280, d_model=4096, attention_types=_pattern([0, 0] + [4, 128] * 20 + [4]),
            num_heads=64, head_dim=512, rope_dim=64, q_rank=1024, out_groups=8, out_rank=1024,
            index_heads=64, index_dim=128, index_top_k=512, num_experts=256, top_k=6, expert_dim=2048,
            routed_scale=1.5, mtp_depth=1, mtp_attention_type="swa")
    if preset == "pro":
        return model_config(
            vocab_size=129_280, d_model=7168, attention_types=_pattern([128, 128] + [4, 128] * 29 + [4]),
            num_heads=128, head_dim=512, rope_dim=64, q_rank=1536, out_groups=16, out_rank=1024,
            index_heads=64, index_dim=128, index_top_k=1024, num_experts=384, top_k=6, expert_dim=3072,
            routed_scale=2.5, mtp_depth=1, mtp_attention_type="swa")
    raise ValueError(f"unknown deepseek_v4 preset {preset!r}; expected one of {PRESETS}")


PRESETS = ("tiny", "small", "flash", "pro")


def get_config(preset: str = "tiny"):
    config = base_config(_model(preset or "tiny"))
    if preset == "tiny":
        config.train.steps = 300
    if preset == "small":
        small_replica_training(config, batch_size=16)
    return config
