"""zoo.analysis against the arithmetic of docs/families/gemma4.md, recomputed here from the released
configs' numbers (not from zoo.analysis), and against the parameters of a built model.

The sheet's bytes are decimal: E2B's 5.64 GB is 5,637,144,576 B (5.25 GiB), so GB = 1e9 below."""
from __future__ import annotations

import functools
import math
import subprocess
import sys
from pathlib import Path

import jax
import pytest
from flax import nnx

import zoo
from configs.gemma4 import get_config
from zoo import analysis

T = 131_072
GB = 1e9
ROOT = Path(__file__).resolve().parents[1]

# Released text decoders (the sheet's table): layers, hidden, mlp, kv heads, sliding layers per block of
# 7, kv-shared layers, double-wide MLP on shared layers. Both: vocab 262144, 8 heads, head dims 256/512,
# window 512, PLE 256.
E2B = dict(L=35, D=1536, F=6144, K=1, sliding_per_block=4, shared=20, double=True)
E4B = dict(L=42, D=2560, F=10240, K=2, sliding_per_block=5, shared=18, double=False)
V, N, H, H_FULL, WINDOW, P = 262_144, 8, 256, 512, 512, 256


@functools.cache
def _report(preset: str, context: int = T, dtype: str = "bfloat16"):
    return analysis.report(get_config(preset), context=context, dtype=dtype)


def _layer_types(m):
    return (["sliding"] * m["sliding_per_block"] + ["full"]) * 7


def _sheet_params(m):
    """Every parameter of the text decoder, by hand: (layers, token table, per-layer table, PLE projection)."""
    D, L, K = m["D"], m["L"], m["K"]
    layers = 0
    for i, kind in enumerate(_layer_types(m)):
        h = H_FULL if kind == "full" else H
        own_kv = i < L - m["shared"]
        attention = 2 * D * N * h + h + (2 * D * K * h + h if own_kv else 0)   # q, o, q_norm; k, v, k_norm
        mlp = 3 * D * m["F"] * (2 if m["double"] and not own_kv else 1)
        ple = 2 * D * P + D                                                   # gate, proj, post norm
        layers += attention + mlp + ple + 4 * D + 1                           # 4 sandwich norms, layer scalar
    return layers, V * D, V * L * P, D * L * P + P + D                       # + context norm, final norm


@pytest.mark.parametrize("preset,m,total,effective", [("e2b", E2B, 4.63, 2.28), ("e4b", E4B, 7.46, 4.64)])
def test_released_param_counts_match_the_sheet(preset, m, total, effective):
    layers, table, per_layer, projection = _sheet_params(m)
    rep = _report(preset)
    assert rep["params_total"] == layers + table + per_layer + projection
    assert rep["params_per_layer_embedding"] == per_layer == V * m["L"] * P
    assert rep["params_embedding"] == table + per_layer                      # tied: no separate head
    assert rep["params_non_embedding"] == layers + projection
    assert rep["params_effective"] == rep["params_total"] - per_layer
    assert rep["params_active"] == rep["params_total"]                       # dense
    assert round(rep["params_total"] / 1e9, 2) == total
    assert round(rep["params_effective"] / 1e9, 2) == effective


def test_e2b_param_breakdown_matches_the_sheet():
    layers, table, per_layer, projection = _sheet_params(E2B)
    assert [round(x / 1e9, 3) for x in (layers, table, per_layer, projection)] == [1.863, 0.403, 2.349, 0.014]


@pytest.mark.parametrize("preset,m,sliding_b,full_b,gb_no_share,gb_share,gb_window_saving", [
    ("e2b", E2B, 1024, 2048, 5.64, 2.42, 1.08),
    ("e4b", E4B, 2048, 4096, 13.15, 7.52, 1.63),
])
def test_released_kv_cache_matches_the_sheet(preset, m, sliding_b, full_b, gb_no_share, gb_share,
                                             gb_window_saving):
    bf16 = 2
    assert 2 * m["K"] * H * bf16 == sliding_b and 2 * m["K"] * H_FULL * bf16 == full_b
    types = _layer_types(m)
    own = types[:m["L"] - m["shared"]]
    per_token = {"sliding": sliding_b, "full": full_b}

    def total(layers, sliding_tokens):
        return sum(per_token[t] * (sliding_tokens if t == "sliding" else T) for t in layers)

    rep = _report(preset)
    assert rep["kv_bytes_per_token_by_type"] == per_token
    assert rep["kv_cache_bytes_full_length_no_sharing"] == total(types, T)
    assert rep["kv_cache_bytes_full_length"] == total(own, T)
    assert rep["kv_cache_bytes_no_sharing"] == total(types, WINDOW)
    assert rep["kv_cache_bytes"] == total(own, WINDOW)
    assert round(rep["kv_cache_bytes_full_length_no_sharing"] / GB, 2) == gb_no_share
    assert round(rep["kv_cache_bytes_full_length"] / GB, 2) == gb_share
    assert round((rep["kv_cache_bytes_no_sharing"] - rep["kv_cache_bytes"]) / GB, 2) == gb_window_saving
    assert round(rep["kv_cache_bytes_full_length_no_sharing"] / 2**30, 2) != gb_no_share   # not GiB


def test_moe_active_params_drop_the_unselected_experts():
    rep = _report("26b_a4b")
    assert rep["params_total"] - rep["params_active"] == (128 - 8) * 3 * 2816 * 704 * 30
    # k_eq_v full layers (2 kv heads x 512) cache one tensor, the raw key projection (K and V follow on read)
    assert rep["kv_bytes_per_token_by_type"] == {"sliding": 2 * 8 * 256 * 2, "full": 1 * 2 * 512 * 2}


def test_tiny_counts_every_parameter_of_the_built_model():
    cfg = get_config("tiny")
    built = nnx.state(zoo.build(cfg.model), nnx.Param)
    assert _report("tiny")["params_total"] == sum(x.size for x in jax.tree.leaves(built))


def test_tiny_kv_and_flops_by_hand():
    m = get_config("tiny").model
    context = 100                                          # beyond tiny's 64-token window
    rep = analysis.report(m, context=context, dtype="float32", batch=3)
    kept = [min(w, context) if w else context for w in m.windows]
    per_token = [2 * k * h * 4 for k, h in zip(m.num_kv_heads, m.head_dims)]
    own = [s < 0 for s in m.kv_sources]
    assert rep["kv_cache_bytes"] == 3 * sum(b * n for b, n, o in zip(per_token, kept, own) if o)
    assert rep["kv_cache_bytes_no_sharing"] == 3 * sum(b * n for b, n in zip(per_token, kept))
    assert rep["kv_cache_bytes_full_length"] == 3 * context * sum(b for b, o in zip(per_token, own) if o)
    per_key = [4 * n * h for n, h in zip(m.num_heads, m.head_dims)]
    assert rep["flops_per_token_attention"] == sum(f * n for f, n in zip(per_key, kept))
    seen = [sum(min(w, t) if w else t for t in range(1, context + 1)) for w in m.windows]
    mean = rep["flops_per_token_matmul"] + sum(f * s for f, s in zip(per_key, seen)) / context
    assert rep["flops_per_token_seq_mean"] == pytest.approx(mean, rel=1e-12)
    assert rep["flops_per_token"] == rep["flops_per_token_matmul"] + rep["flops_per_token_attention"]


def test_e2b_matmul_flops_are_twice_the_effective_params_less_vectors():
    rep = _report("e2b")
    q_norms, k_norms = 28 * H + 7 * H_FULL, 12 * H + 3 * H_FULL        # k norms on the 15 own-kv layers
    vectors = 35 * (5 * 1536 + 1) + q_norms + k_norms + P + 1536       # block norms + scalar, PLE/final norm
    assert rep["flops_per_token_matmul"] == 2 * (rep["params_effective"] - vectors)


def test_short_context_keeps_everything():
    rep = _report("tiny", context=32)
    assert rep["kv_cache_bytes"] == rep["kv_cache_bytes_full_length"]
    assert rep["context"] == 32 and rep["dtype"] == "bfloat16"


def test_registered_attention_kind_is_used(monkeypatch):
    monkeypatch.setattr(analysis, "ATTENTION_KINDS", dict(analysis.ATTENTION_KINDS))
    compressed = analysis.AttentionKind(kv_bytes_per_token=lambda cfg, i, itemsize: 10 * itemsize,
                                        cached_tokens=lambda cfg, i, context: context // 4,
                                        flops_per_key=lambda cfg, i: 7)
    analysis.register_attention_kind("compressed", compressed)
    m = get_config("tiny").model
    m.attention_types = ("compressed",) * m.num_layers
    kv = analysis.kv_cache(m, 400, "bfloat16")
    assert kv["kv_cache_bytes_no_sharing"] == m.num_layers * 20 * 100
    assert kv["kv_bytes_per_token_by_type"] == {"compressed": 20}
    assert analysis.attention_flops(m, 400)["last"] == m.num_layers * 7 * 100
    with pytest.raises(ValueError, match="already registered"):
        analysis.register_attention_kind("compressed", analysis.GQA)


@pytest.mark.parametrize("kwargs,message", [
    (dict(context=0), "context must be a positive integer"),
    (dict(context=1.5), "context must be a positive integer"),
    (dict(context=8, batch=0), "batch must be a positive integer"),
    (dict(context=8, dtype="bfloat17"), "unknown dtype 'bfloat17'"),
])
def test_bad_arguments_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        analysis.report(get_config("tiny"), **kwargs)


def test_bad_config_and_unknown_kind_are_named():
    with pytest.raises(ValueError, match="model config"):
        analysis.report({"layers": 3}, context=8)
    m = get_config("tiny").model
    m.attention_types = ("mystery",) * m.num_layers
    with pytest.raises(ValueError, match="no KV/FLOP accounting for attention kind 'mystery'"):
        analysis.kv_cache(m, 8)


def test_cli_prints_the_table():
    out = subprocess.run(
        [sys.executable, "-m", "zoo.analysis", "--config=configs/gemma4.py:tiny", "--context=1000",
         "--dtype=float32"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    rep = _report("tiny", context=1000, dtype="float32")
    assert "context=1,000" in out and "dtype=float32" in out
    for key in ("params_total", "params_effective", "kv_cache_bytes_full_length_no_sharing",
                "kv_bytes_per_token_by_type[full]", "flops_per_token"):
        line = next(line for line in out.splitlines() if line.split() and line.split()[0] == key)
        value = rep[key] if "[" not in key else rep["kv_bytes_per_token_by_type"]["full"]
        assert line.split()[-1] == f"{value:,}"
    assert math.isclose(float(out.split("params_total")[1].split()[0]), rep["params_total"] / 1e6, rel_tol=1e-2)


def test_zaya1_8b_counts_and_kv_against_mha():
    from configs.zaya1 import get_config as zaya_config
    rep = analysis.report(zaya_config("8b"), context=131_072)
    assert round(rep["params_non_embedding"] / 1e9, 1) == 8.3
    assert round(rep["params_total"] / 1e9, 1) == 8.8
    assert round((rep["params_active"] - rep["params_embedding"]) / 1e9, 2) == 0.75
    # 40 layers x 2 kv heads x 128 x (K, V) x 2 bytes per token, against 16-head MHA at width 2048
    assert rep["kv_cache_bytes"] == 40 * 2 * 128 * 2 * 2 * 131_072
    assert rep["kv_cache_bytes_mha_equivalent"] == 40 * 2048 * 2 * 2 * 131_072
    assert rep["kv_cache_bytes_mha_equivalent"] == 8 * rep["kv_cache_bytes"]


def test_laguna_xs2_counts_and_kv():
    from configs.laguna import get_config as laguna_config
    rep = analysis.report(laguna_config("xs2"), context=131_072)
    assert round(rep["params_total"] / 1e9) == 33 and round(rep["params_active"] / 1e9) == 3
    global_bytes = 10 * 131_072 * 2 * 8 * 128 * 2          # 10 full layers keep the whole context
    sliding_bytes = 30 * 512 * 2 * 8 * 128 * 2             # 30 sliding layers keep 512 tokens
    assert rep["kv_cache_bytes"] == global_bytes + sliding_bytes
    assert round(global_bytes / 1e9, 1) == 5.4 and round(sliding_bytes / 1e6) == 63


def test_deepseek_v4_kv_and_decode_flops_against_the_sheet():
    from configs.deepseek_v4 import get_config as dsv4_config
    flash = analysis.report(dsv4_config("flash"), context=2 ** 20)
    pro = analysis.report(dsv4_config("pro"), context=2 ** 20)
    # native: CSA layers pay (584 + 68) / 4 B per token, HCA layers 584 / 128 B (Flash 21 + 20, Pro 30 + 31)
    assert flash["kv_bytes_per_token_native"] == 21 * (584 + 68) / 4 + 20 * 584 / 128
    assert pro["kv_bytes_per_token_native"] == 30 * (584 + 68) / 4 + 31 * 584 / 128
    assert flash["kv_bytes_per_token_v32_native"] == 61 * (656 + 132) == 48_068
    assert round(100 * pro["kv_fraction_of_v32_native"], 1) == 10.5
    assert round(100 * flash["kv_fraction_of_v32_native"], 1) == 7.3
    assert abs(100 * flash["kv_fraction_of_v32_bf16"] - 7.9) < 0.1   # 6229 / 78324 = 7.95%; the sheet says 7.9
    assert round(pro["kv_cache_bytes_native"] / 2 ** 30, 2) == 4.92     # sheet: 4.91 GiB without the window
    assert round(flash["kv_cache_bytes_native"] / 2 ** 30, 2) == 3.43
    assert round(flash["flops_per_token_v32"] / 1e9) == 1157
    assert 135e9 < flash["flops_per_token"] < 145e9 and 295e9 < pro["flops_per_token"] < 310e9
