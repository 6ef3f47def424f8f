"""DeepSeek-V4 next to its predecessor DeepSeek-V3.2: KV-cache bytes per token in the released cache
precision and in bf16, and decode FLOPs per token (figures only this family reports; zoo.analysis adds them
through the family's `report_extras`)."""
from __future__ import annotations

from layers.kinds import native_entry_bytes, native_index_key_bytes


# DeepSeek-V3.2, the predecessor the family sheet compares with: 61 MLA layers caching a 512-dim latent
# and a 64-dim RoPE key per token, plus a lightning-indexer key (64 heads x 128, top-k 2048) per token;
# 37B active parameters. Native: fp8 latent with scales + bf16 RoPE = 656 B, fp8 index key = 132 B.
V32 = dict(layers=61, latent=512, rope=64, heads=128, index_heads=64, index_dim=128, index_top_k=2048,
           active_params=37e9, native_entry=656, index_key=132)


def _per_token_bytes(cfg, entry: int, index_key: int) -> float:
    """Steady-state cache bytes per token (the window ignored) with the given entry and index-key sizes."""
    total = 0.0
    for kind in cfg.attention_types:
        if kind == "csa":
            total += (entry + index_key) / cfg.csa_ratio
        elif kind == "hca":
            total += entry / cfg.hca_ratio
    return total


def report_extras(cfg, context: int, dtype) -> dict:
    """Per-token KV bytes next to DeepSeek-V3.2's, natively (fp8/fp4 as released) and in bf16 (main
    entries in bf16; index keys in fp8 for both, as the sheet counts them), and decode FLOPs per token
    at `context` next to V3.2's (2 x active params + attention over the selected keys + the indexer)."""
    v32_native = V32["layers"] * (V32["native_entry"] + V32["index_key"])
    v32_bf16 = V32["layers"] * (2 * (V32["latent"] + V32["rope"]) + V32["index_key"])
    native = _per_token_bytes(cfg, native_entry_bytes(cfg, 0), native_index_key_bytes(cfg, 0))
    bf16 = _per_token_bytes(cfg, 2 * cfg.head_dim, V32["index_key"])
    v32_attention = V32["heads"] * min(context, V32["index_top_k"]) * 2 * (V32["latent"] + V32["rope"] + V32["latent"])
    v32_indexer = context * 2 * V32["index_heads"] * V32["index_dim"]
    v32_flops = 2 * V32["active_params"] + V32["layers"] * (v32_attention + v32_indexer)
    return {
        "kv_bytes_per_token_native": native, "kv_bytes_per_token_bf16": bf16,
        "kv_bytes_per_token_v32_native": v32_native, "kv_bytes_per_token_v32_bf16": v32_bf16,
        "kv_fraction_of_v32_native": native / v32_native, "kv_fraction_of_v32_bf16": bf16 / v32_bf16,
        "flops_per_token_v32": v32_flops,
    }
