"""Hybrids no released model has: one family's stack with another family's layer kinds (layers.kinds).

Presets (byte vocabulary, tiny sizes that train on 2 CPU cores in minutes):
- `laguna_cca`: a Laguna stack (per-layer query-head budgets, softplus output gate, sigmoid MoE with a shared
  expert) whose sliding layers are CCA with a 64-token window and whose last global layer reuses the keys
  and values of the global layer before it (Gemma-4 KV sharing);
- `deepseek_shared`: a DeepSeek-V4 stack (mHC streams, CSA/HCA, hash and sqrt-softplus routing, MTP) that
  opens and closes with grouped-query sliding layers, the last reading the first one's keys and values;
- `gemma_hca`: a Gemma-4 stack (PLE, sandwich norms, layer scalars, KV sharing on its sliding layers) whose
  global layers are DeepSeek-V4's Heavily Compressed Attention.
    python train.py --config=configs/hybrid.py:laguna_cca
"""
from __future__ import annotations

from configs.common import base_config
from configs.deepseek_v4 import get_config as deepseek_config
from configs.gemma4 import get_config as gemma_config
from configs.laguna import get_config as laguna_config

PRESETS = ("laguna_cca", "deepseek_shared", "gemma_hca")
SLIDING_ROPE = {"kind": "default", "theta": 10_000.0, "fraction": 1.0}
# DeepSeek-V4's HCA settings at tiny size: the K=V head, its low-rank query and grouped output, a ratio-16
# compressor (a 256-token sequence holds 16 entries), interleaved RoPE on the last 16 dims of each head.
TINY_HCA = dict(head_dim=32, rope_dim=16, q_rank=48, out_groups=2, out_rank=32, window=32, hca_ratio=16)


def _laguna_cca():
    m = laguna_config("tiny").model
    # layers: full, cca_sliding x 3, full, cca_sliding x 2, full (shares layer 4's keys and values)
    kinds = ("full",) + ("cca_sliding",) * 3 + ("full",) + ("cca_sliding",) * 2 + ("full",)
    m.attention_types, m.num_layers = kinds, len(kinds)
    m.num_heads = tuple(3 if k == "full" else 4 for k in kinds)
    m.num_kv_heads, m.head_dims = (1,) * len(kinds), (32,) * len(kinds)
    m.windows = tuple(64 if k == "cca_sliding" else 0 for k in kinds)
    m.kv_sources = (-1,) * 7 + (4,)
    m.moe_layers = (False,) + (True,) * 7
    m.rope.cca_sliding = dict(m.rope.sliding, fraction=0.5)
    m.conv_kernel_sizes = (2, 2)
    return m


def _deepseek_shared():
    m = deepseek_config("tiny").model
    m.attention_types = ("sliding", "csa", "hca", "sliding")
    m.kv_sources = (-1, -1, -1, 0)
    m.num_kv_heads, m.head_dims, m.windows = 1, 32, 32   # the grouped-query layers' options
    m.rope.sliding = dict(SLIDING_ROPE)
    return m


def _gemma_hca():
    m = gemma_config("tiny").model
    m.attention_types = ("sliding", "sliding", "hca", "sliding", "sliding", "hca")
    m.kv_sources = (-1, -1, -1, -1, 1, -1)
    m.num_kv_heads = (2,) * 6
    m.head_dims = (32,) * 6
    m.windows = (64, 64, 0, 64, 64, 0)
    m.k_eq_v = (False,) * 6
    m.mlp_dims = (384,) * 4 + (768,) + (384,)
    m.update(TINY_HCA)
    m.rope.hca = {"kind": "default", "theta": 160_000.0, "style": "interleaved"}
    del m.rope["full"]
    return m


def get_config(preset: str = "laguna_cca"):
    builders = {"laguna_cca": _laguna_cca, "deepseek_shared": _deepseek_shared, "gemma_hca": _gemma_hca}
    if preset not in builders:
        raise ValueError(f"unknown hybrid preset {preset!r}; expected one of {PRESETS}")
    config = base_config(builders[preset]())
    config.train.update(steps=300, eval_every=100, checkpoint_every=100)
    return config
