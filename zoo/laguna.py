"""Laguna-like decoder: sliding and full attention layers with their own query-head counts over a fixed
kv-head count, QK-norm before RoPE (YaRN on partial rotary for full layers), a softplus output gate on
every attention layer, and sigmoid-routed MoE with a shared expert.

Block l:
    h = x + attn_l(input_norm(x))          # o_proj(softplus(input_norm(x) W_g) * attention)
    y = h + mlp_l(pre_mlp_norm(h))
    mlp_l = SwiGLU                                                   # dense layer
    mlp_l = routed_scale * sum_k w_k expert_k + SwiGLU_shared        # MoE layer: top-k of sigmoid
                                                                     # scores + correction bias
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from layers import kinds
from layers.context import LayerContext
from layers.norms import RMSNorm
from layers.rope import RopeSpec, yarn_mscale
from zoo.state_dict import Rule, linear_in, linear_out, same, token_ids_from_hf, transpose, uniform

ATTENTION_TYPES = ("sliding", "full")
GATINGS = ("per_head", "per_element")
PER_LAYER_KEYS = ("attention_types", "num_heads", "num_kv_heads", "head_dims", "windows", "kv_sources",
                  "moe_layers")
# The released XS.2 rope: YaRN on half the dims of full layers, plain rope on sliding layers.
FULL_ROPE = {"kind": "yarn", "theta": 500_000.0, "fraction": 0.5, "factor": 32.0, "original_max_positions": 4096,
             "beta_fast": 64.0, "beta_slow": 1.0, "attention_factor": 1.0}
SLIDING_ROPE = {"kind": "default", "theta": 10_000.0, "fraction": 1.0}


def model_config(*, vocab_size: int, d_model: int, attention_types: Sequence[str], num_heads, num_kv_heads: int,
                 head_dim: int, sliding_window: int, mlp_dim: int, moe_layers: Sequence[bool],
                 num_experts: int = 0, top_k: int = 0, expert_dim: int = 0, shared_expert_dim: int = 0,
                 routed_scale: float = 1.0, router_softcap: float = 0.0, gating: str = "per_head",
                 full_rope: Mapping = FULL_ROPE, sliding_rope: Mapping = SLIDING_ROPE, norm_eps: float = 1e-6,
                 tie_embeddings: bool = False, max_positions: int = 131_072, pad_id: int = 9, bos_id: int = 2,
                 eos_ids: Sequence[int] = (2, 24)) -> ml_collections.ConfigDict:
    """The per-layer model config of a Laguna-like decoder. `num_heads` is one count or one per layer;
    `moe_layers[i]` makes layer i a MoE layer (else a dense SwiGLU of `mlp_dim`)."""
    attention_types = tuple(attention_types)
    L = len(attention_types)
    m = ml_collections.ConfigDict()
    m.family = "laguna"
    m.vocab_size, m.d_model, m.num_layers = vocab_size, d_model, L
    m.attention_types = attention_types
    m.num_heads = tuple(num_heads) if isinstance(num_heads, Sequence) else (num_heads,) * L
    m.num_kv_heads = (num_kv_heads,) * L
    m.head_dims = (head_dim,) * L
    m.windows = tuple(sliding_window if t == "sliding" else 0 for t in attention_types)
    m.kv_sources = (-1,) * L
    m.moe_layers = tuple(bool(x) for x in moe_layers)
    m.gating = gating
    m.router = "sigmoid"
    m.rope = ml_collections.ConfigDict({"full": dict(full_rope), "sliding": dict(sliding_rope)})
    m.mlp_dim = mlp_dim
    m.num_experts, m.top_k, m.expert_dim, m.shared_expert_dim = num_experts, top_k, expert_dim, shared_expert_dim
    m.routed_scale, m.router_softcap = float(routed_scale), float(router_softcap)
    m.norm_eps = norm_eps
    m.activation = "silu"
    m.tie_embeddings = tie_embeddings
    m.max_positions = max_positions
    m.pad_id, m.bos_id = pad_id, bos_id
    m.eos_id, m.eos_ids = eos_ids[0], tuple(eos_ids)   # eos_id: the first of every end-of-sequence id
    m.attention_impl = "xla"
    m.dtype = "float32"
    return m


def validate(cfg) -> None:
    """Fails with a message naming the first inconsistency in a Laguna-like model config."""
    if cfg.gating not in GATINGS:
        raise ValueError(f"model.gating = {cfg.gating!r}; expected one of {GATINGS}")
    kinds.check_layers(cfg, PER_LAYER_KEYS)
    if any(cfg.moe_layers) and cfg.shared_expert_dim <= 0:
        raise ValueError("MoE layers need 0 < model.top_k <= model.num_experts, model.expert_dim > 0 and "
                         "model.shared_expert_dim > 0")


class LagunaBlock(nnx.Module):
    def __init__(self, cfg, i: int, *, rngs: nnx.Rngs):
        D, eps = cfg.d_model, cfg.norm_eps
        self.input_norm = RMSNorm(D, eps=eps)
        self.attn = kinds.build_attention(cfg, i, rngs)
        self.pre_mlp_norm = RMSNorm(D, eps=eps)
        self.mlp = kinds.build_mlp(cfg, i, rngs)

    def __call__(self, x_BTD: jax.Array, ctx: LayerContext) -> jax.Array:
        h_BTD = x_BTD + self.attn.mix(self.input_norm(x_BTD), ctx)
        return h_BTD + self.mlp.mix(self.pre_mlp_norm(h_BTD), ctx)


Block = LagunaBlock


# ---------------------------------------------------------------------------------------------------
# Hugging Face: config and state-dict key mapping (transformers `LagunaForCausalLM`, model_type `laguna`).
# On disk, `save_pretrained` splits the fused experts per expert and moves the correction bias under
# `experts`: `mlp.experts.{e}.{gate,up,down}_proj.weight`, `mlp.experts.e_score_correction_bias`,
# `mlp.shared_expert.*` (transformers renames them to its in-memory names when loading).

HF_MODEL_TYPES = ("laguna",)
HF_ARCHITECTURE = "LagunaForCausalLM"
HF_LAYER_TYPES = {"sliding_attention": "sliding", "full_attention": "full"}
HF_MLP_TYPES = {"dense": False, "sparse": True}
HF_DEFAULT_ROPE = {"full_attention": {"rope_type": "default", "rope_theta": 500_000.0, "partial_rotary_factor": 0.5},
                   "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0}}


def _rope_from_hf(rope: dict, truncate: bool, max_positions: int) -> dict:
    """Our rope settings from one layer type's HF `rope_parameters` entry."""
    kind = rope.get("rope_type", "default")
    ours = {"kind": kind, "theta": rope["rope_theta"], "fraction": rope.get("partial_rotary_factor", 1.0)}
    if kind == "default":
        return ours
    if kind != "yarn":
        raise ValueError(f"unsupported Laguna rope_type {kind!r}; expected 'default' or 'yarn'")
    if rope.get("attention_factor") is None and (rope.get("mscale") or rope.get("mscale_all_dim")):
        raise ValueError("yarn rope with mscale/mscale_all_dim is not supported; give attention_factor")
    original = rope.get("original_max_position_embeddings") or max_positions
    factor = rope.get("factor") or max_positions / original
    attention_factor = rope.get("attention_factor")
    ours.update(factor=factor, original_max_positions=original, beta_fast=rope.get("beta_fast") or 32.0,
                beta_slow=rope.get("beta_slow") or 1.0,
                attention_factor=yarn_mscale(factor) if attention_factor is None else attention_factor)
    if not truncate:
        ours["truncate"] = False
    return ours


def from_hf_config(hf: dict) -> ml_collections.ConfigDict:
    """Our model config from a Hugging Face `config.json` dict."""
    L = hf["num_hidden_layers"]
    if hf.get("attention_bias"):
        raise ValueError("Laguna with attention_bias=True is not supported")
    if hf.get("moe_apply_router_weight_on_input"):
        raise ValueError("Laguna with moe_apply_router_weight_on_input=True is not supported")
    try:
        attention_types = [HF_LAYER_TYPES[t] for t in hf.get("layer_types") or ["full_attention"] * L]
        moe_layers = [HF_MLP_TYPES[t] for t in hf.get("mlp_layer_types") or ["dense"] + ["sparse"] * (L - 1)]
    except KeyError as e:
        raise ValueError(f"unsupported Laguna layer type {e.args[0]!r}") from None
    rope = hf.get("rope_parameters") or HF_DEFAULT_ROPE
    if "rope_type" in rope:
        raise ValueError("Laguna needs rope_parameters keyed by layer type (full_attention, sliding_attention)")
    # transformers reads YaRN's `truncate` from the top level of rope_parameters, even when nested.
    truncate = bool(rope.get("truncate", True))
    max_positions = hf.get("max_position_embeddings", 131_072)
    ropes = {HF_LAYER_TYPES[t]: _rope_from_hf(rope[t], truncate, max_positions)
             for t in HF_LAYER_TYPES if rope.get(t) is not None}
    gating = hf.get("gating", True)
    ids = token_ids_from_hf(hf, ("pad_id", "bos_id"))
    eos = hf.get("eos_token_id")
    if eos is not None:
        ids["eos_ids"] = (eos,) if isinstance(eos, int) else tuple(eos)
    m = model_config(
        vocab_size=hf["vocab_size"], d_model=hf["hidden_size"], attention_types=attention_types,
        num_heads=hf.get("num_attention_heads_per_layer") or hf["num_attention_heads"],
        num_kv_heads=hf["num_key_value_heads"],
        head_dim=hf.get("head_dim") or hf["hidden_size"] // hf["num_attention_heads"],
        sliding_window=hf.get("sliding_window", 512), mlp_dim=hf["intermediate_size"], moe_layers=moe_layers,
        num_experts=hf.get("num_experts", 256), top_k=hf.get("num_experts_per_tok", 8),
        expert_dim=hf.get("moe_intermediate_size", 512),
        shared_expert_dim=hf.get("shared_expert_intermediate_size", 512),
        routed_scale=hf.get("moe_routed_scaling_factor", 1.0),
        router_softcap=hf.get("moe_router_logit_softcapping") or 0.0,
        gating="per_head" if gating is True or gating == "per-head" else "per_element",
        full_rope=ropes.get("full", FULL_ROPE), sliding_rope=ropes.get("sliding", SLIDING_ROPE),
        norm_eps=hf.get("rms_norm_eps", 1e-6), tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        max_positions=max_positions, **ids)
    m.activation = hf.get("hidden_act", "silu")
    return m


def _uniform(values, what: str):
    return uniform(values, what, "Laguna")


def _rope_to_hf(rope) -> dict:
    spec = RopeSpec.from_config(rope)
    if spec.kind not in ("default", "yarn") or spec.style != "half":
        raise ValueError(f"Hugging Face Laguna supports half-style default or yarn rope, not {spec}")
    hf = {"rope_type": spec.kind, "rope_theta": float(spec.theta), "partial_rotary_factor": float(spec.fraction)}
    if spec.kind == "yarn":
        hf.update(factor=float(spec.factor), original_max_position_embeddings=int(spec.original_max_positions),
                  beta_fast=float(spec.beta_fast), beta_slow=float(spec.beta_slow),
                  attention_factor=float(spec.attention_factor), truncate=bool(spec.truncate))
    elif spec.attention_factor != 1.0:
        raise ValueError("Hugging Face Laguna's default rope has no attention_factor")
    return hf


def to_hf_config(cfg) -> dict:
    """A `LagunaConfig` dict for our model config; fails if the config has no HF equivalent."""
    types = sorted(set(cfg.attention_types))
    if set(types) - set(ATTENTION_TYPES):
        raise ValueError(f"Hugging Face Laguna has sliding and full attention layers only, not "
                         f"{sorted(set(types) - set(ATTENTION_TYPES))}")
    if any(s >= 0 for s in cfg.kv_sources):
        raise ValueError("Hugging Face Laguna layers do not share k/v (model.kv_sources must be -1)")
    rope = {f"{k}_attention": _rope_to_hf(cfg.rope[k]) for k in types}
    truncate = _uniform((r["truncate"] for r in rope.values() if "truncate" in r), "yarn truncate")
    if truncate is False:
        rope["truncate"] = False   # where transformers reads it (see from_hf_config)
    moe = any(cfg.moe_layers)
    hf = {
        "model_type": "laguna", "architectures": [HF_ARCHITECTURE],
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.d_model, "intermediate_size": cfg.mlp_dim,
        "num_hidden_layers": cfg.num_layers, "num_attention_heads": cfg.num_heads[0],
        "num_attention_heads_per_layer": list(cfg.num_heads),
        "num_key_value_heads": _uniform(cfg.num_kv_heads, "num_kv_heads"),
        "head_dim": _uniform(cfg.head_dims, "head_dim"),
        "sliding_window": _uniform((w for w in cfg.windows if w), "sliding window") or 512,
        "layer_types": [f"{t}_attention" for t in cfg.attention_types],
        "mlp_layer_types": ["sparse" if x else "dense" for x in cfg.moe_layers],
        "rope_parameters": rope, "gating": True if cfg.gating == "per_head" else "per-element",
        "rms_norm_eps": cfg.norm_eps, "hidden_act": cfg.activation, "tie_word_embeddings": bool(cfg.tie_embeddings),
        "max_position_embeddings": cfg.max_positions, "attention_bias": False,
        "pad_token_id": cfg.pad_id, "bos_token_id": cfg.bos_id,
        "eos_token_id": list(cfg.eos_ids) if len(cfg.eos_ids) > 1 else cfg.eos_id,
    }
    if moe:
        hf.update(num_experts=cfg.num_experts, num_experts_per_tok=cfg.top_k, moe_intermediate_size=cfg.expert_dim,
                  shared_expert_intermediate_size=cfg.shared_expert_dim,
                  moe_routed_scaling_factor=cfg.routed_scale, moe_router_logit_softcapping=cfg.router_softcap)
    return hf


def _per_expert_rule(hf: str, ours: tuple, num_experts: int):
    """HF `{hf}.{e}.{gate,up,down}_proj.weight` ([F, D], [F, D], [D, F] per expert e) <-> our expert
    weights gate, up [E, D, F] and down [E, F, D]."""
    projections = ("gate_proj", "up_proj", "down_proj")
    names = tuple(f"{hf}.{e}.{p}.weight" for e in range(num_experts) for p in projections)

    def to_ours(*arrays):
        return tuple(jnp.stack([a.T for a in arrays[j::3]]) for j in range(3))

    def to_hf(*weights):
        return tuple(weights[j][e].T for e in range(num_experts) for j in range(3))
    return Rule(names, tuple(ours + ("experts", p) for p in projections), to_ours, to_hf)


def hf_rules(cfg):
    """The state-dict mapping: `Rule`s from Hugging Face on-disk names (without the `model.` prefix) to our
    parameter paths, with the reshapes in both directions."""
    D = cfg.d_model
    rules = [Rule.one("embed_tokens.weight", ("embed", "table"), *same()),
             Rule.one("norm.weight", ("final_norm", "scale"), *same())]
    if not cfg.tie_embeddings:
        rules.append(Rule.one("lm_head.weight", ("lm_head",), *transpose(), hf_prefix=""))
    for i in range(cfg.num_layers):
        hf, ours = f"layers.{i}.", ("blocks", i)
        N, K, H = cfg.num_heads[i], cfg.num_kv_heads[i], cfg.head_dims[i]
        attn = ours + ("attn",)
        rules += [
            Rule.one(hf + "input_layernorm.weight", ours + ("input_norm", "scale"), *same()),
            # HF's "post_attention_layernorm" normalises the MLP's input.
            Rule.one(hf + "post_attention_layernorm.weight", ours + ("pre_mlp_norm", "scale"), *same()),
            Rule.one(hf + "self_attn.q_proj.weight", attn + ("q_proj",), *linear_in(D, N, H)),
            Rule.one(hf + "self_attn.k_proj.weight", attn + ("k_proj",), *linear_in(D, K, H)),
            Rule.one(hf + "self_attn.v_proj.weight", attn + ("v_proj",), *linear_in(D, K, H)),
            Rule.one(hf + "self_attn.o_proj.weight", attn + ("o_proj",), *linear_out(N, H, D)),
            Rule.one(hf + "self_attn.q_norm.weight", attn + ("q_norm", "scale"), *same()),
            Rule.one(hf + "self_attn.k_norm.weight", attn + ("k_norm", "scale"), *same()),
            Rule.one(hf + "self_attn.g_proj.weight", attn + ("g_proj",),
                     *(transpose() if cfg.gating == "per_head" else linear_in(D, N, H))),
        ]
        if cfg.moe_layers[i]:
            mlp = ours + ("mlp",)
            rules += [
                Rule.one(hf + "mlp.gate.weight", mlp + ("router", "proj"), *transpose()),
                Rule.one(hf + "mlp.experts.e_score_correction_bias", mlp + ("router", "correction_bias"), *same()),
                _per_expert_rule(hf + "mlp.experts", mlp, cfg.num_experts),
            ]
            rules += [Rule.one(hf + f"mlp.shared_expert.{p}.weight", mlp + ("shared_expert", p), *transpose())
                      for p in ("gate_proj", "up_proj", "down_proj")]
        else:
            rules += [Rule.one(hf + f"mlp.{p}.weight", ours + ("mlp", p), *transpose())
                      for p in ("gate_proj", "up_proj", "down_proj")]
    return rules


def hf_ignored(cfg, name: str) -> bool:
    """Laguna checkpoints hold nothing the decoder drops."""
    return False
