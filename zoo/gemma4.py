"""Gemma-4-like decoder: sliding/full layers with their own head dims and RoPE, cross-layer KV sharing,
per-layer embeddings, sandwich norms, a learned layer scalar, and the optional parallel MoE block.

Block l (ple_l = the layer's slice of the per-layer embeddings):
    h = h + post_attn_norm(attn(input_norm(h)))
    h = h + post_ffn_norm(mlp(pre_ffn_norm(h)))                          # dense layer
    h = h + post_ffn_norm(post_ffn_norm_1(mlp(pre_ffn_norm(h)))          # MoE layer: dense MLP and
                          + post_ffn_norm_2(experts(pre_ffn_norm_2(h))))  # experts side by side
    h = h + post_ple_norm(ple_proj(gelu_tanh(ple_gate(h)) * ple_l))
    h = h * layer_scalar
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from layers import activations, kinds, params
from layers.context import LayerContext
from layers.norms import RMSNorm
from zoo.state_dict import Rule, linear_in, linear_out, same, token_ids_from_hf, transpose, uniform

ATTENTION_TYPES = ("sliding", "full")
PER_LAYER_KEYS = ("attention_types", "num_heads", "num_kv_heads", "head_dims", "windows", "kv_sources",
                  "k_eq_v", "mlp_dims", "moe_layers")


def kv_share_sources(attention_types, num_kv_shared_layers: int) -> tuple[int, ...]:
    """Per layer, the layer whose keys/values it reuses (-1: its own). A shared layer i >= L - n reads
    the LAST non-shared layer of the same attention type."""
    L = len(attention_types)
    first_shared = L - num_kv_shared_layers
    sources = []
    for i, kind in enumerate(attention_types):
        if i < first_shared:
            sources.append(-1)
            continue
        owners = [j for j in range(first_shared) if attention_types[j] == kind]
        if not owners:
            raise ValueError(f"layer {i} ({kind}) is kv-shared but no earlier non-shared {kind} layer exists")
        sources.append(owners[-1])
    return tuple(sources)


def model_config(*, vocab_size: int, d_model: int, attention_types, num_heads: int, num_kv_heads: int,
                 head_dim: int, global_head_dim: int, num_global_kv_heads: int | None = None,
                 sliding_window: int, mlp_dim: int, double_wide_mlp: bool = False,
                 num_kv_shared_layers: int = 0, k_eq_v: bool = False, ple_dim: int = 0,
                 ple_vocab_size: int | None = None, num_experts: int = 0, top_k: int = 0, expert_dim: int = 0,
                 final_softcap: float = 30.0, norm_eps: float = 1e-6, sliding_theta: float = 10_000.0,
                 full_theta: float = 1_000_000.0, full_rope_fraction: float = 0.25,
                 max_positions: int = 131_072) -> ml_collections.ConfigDict:
    """The per-layer model config of a Gemma-4-like decoder from the family's few knobs."""
    attention_types = tuple(attention_types)
    L = len(attention_types)
    unknown = set(attention_types) - set(ATTENTION_TYPES)
    if unknown:
        raise ValueError(f"unknown attention types {sorted(unknown)}; expected {ATTENTION_TYPES}")
    sources = kv_share_sources(attention_types, num_kv_shared_layers)
    full_kv = num_global_kv_heads if (k_eq_v and num_global_kv_heads) else num_kv_heads
    m = ml_collections.ConfigDict()
    m.family = "gemma4"
    m.vocab_size, m.d_model, m.num_layers = vocab_size, d_model, L
    m.attention_types = attention_types
    m.num_heads = (num_heads,) * L
    m.num_kv_heads = tuple(full_kv if t == "full" else num_kv_heads for t in attention_types)
    m.head_dims = tuple(global_head_dim if t == "full" else head_dim for t in attention_types)
    m.windows = tuple(sliding_window if t == "sliding" else 0 for t in attention_types)
    m.kv_sources = sources
    m.k_eq_v = tuple(bool(k_eq_v and t == "full") for t in attention_types)
    m.mlp_dims = tuple(mlp_dim * (2 if double_wide_mlp and s >= 0 else 1) for s in sources)
    m.moe_layers = (num_experts > 0,) * L
    m.rope = ml_collections.ConfigDict({
        "sliding": {"kind": "default", "theta": sliding_theta, "fraction": 1.0},
        "full": {"kind": "proportional", "theta": full_theta, "fraction": full_rope_fraction},
    })
    m.num_experts, m.top_k, m.expert_dim = num_experts, top_k, expert_dim
    m.v_norm, m.attn_scale = True, 1.0   # the q/k norms replace 1/sqrt(d); values are normalised too
    m.router = "softmax"
    m.ple_dim = ple_dim
    m.ple_vocab_size = ple_vocab_size or vocab_size
    m.final_softcap = final_softcap
    m.norm_eps = norm_eps
    m.activation = "gelu_tanh"
    m.scale_embeddings = True
    m.tie_embeddings = True
    m.max_positions = max_positions
    m.pad_id, m.eos_id, m.bos_id = 0, 1, 2
    m.attention_impl = "xla"
    m.dtype = "float32"
    return m


def validate(cfg) -> None:
    """Fails with a message naming the first inconsistency in a Gemma-4-like model config."""
    kinds.check_layers(cfg, PER_LAYER_KEYS)


class Gemma4Block(nnx.Module):
    def __init__(self, cfg, i: int, *, rngs: nnx.Rngs):
        D, eps = cfg.d_model, cfg.norm_eps
        self.index = i
        self.input_norm = RMSNorm(D, eps=eps)
        self.attn = kinds.build_attention(cfg, i, rngs)
        self.post_attn_norm = RMSNorm(D, eps=eps)
        self.pre_ffn_norm = RMSNorm(D, eps=eps)
        self.mlp = kinds.build_mlp(cfg, i, rngs, moe=False)
        self.post_ffn_norm = RMSNorm(D, eps=eps)
        if kinds.option(cfg, "moe_layers", i):   # experts beside the dense MLP, with their own norms
            self.moe = kinds.build_mlp(cfg, i, rngs, moe=True)
            self.post_ffn_norm_1 = RMSNorm(D, eps=eps)
            self.pre_ffn_norm_2 = RMSNorm(D, eps=eps)
            self.post_ffn_norm_2 = RMSNorm(D, eps=eps)
        else:
            self.moe = None
        if cfg.get("ple_dim", 0):
            self.act = activations.get(cfg.activation)
            self.ple_gate = params.normal(rngs, (D, cfg.ple_dim), ("embed", "layer_embed"))
            self.ple_proj = params.normal(rngs, (cfg.ple_dim, D), ("layer_embed", "embed"))
            self.post_ple_norm = RMSNorm(D, eps=eps)
        else:
            self.ple_gate = None
        self.layer_scalar = params.ones((1,), (None,))

    def __call__(self, h_BTD: jax.Array, ctx: LayerContext) -> jax.Array:
        h_BTD = h_BTD + self.post_attn_norm(self.attn.mix(self.input_norm(h_BTD), ctx))

        ffn_BTD = self.mlp(self.pre_ffn_norm(h_BTD))
        if self.moe is not None:   # the router reads the residual itself, the experts its own norm of it
            moe_BTD = self.moe(self.pre_ffn_norm_2(h_BTD), router_input_BTD=h_BTD, tokens_BT=ctx.tokens_BT,
                               partitioning=ctx.partitioning)
            ffn_BTD = self.post_ffn_norm_1(ffn_BTD) + self.post_ffn_norm_2(moe_BTD)
        h_BTD = h_BTD + self.post_ffn_norm(ffn_BTD)

        if self.ple_gate is not None:
            ple_BTP = ctx.layer_inputs_BTLP[:, :, self.index, :]
            gate_BTP = self.act(jnp.einsum("BTD,DP->BTP", h_BTD, self.ple_gate[...])) * ple_BTP
            h_BTD = h_BTD + self.post_ple_norm(jnp.einsum("BTP,PD->BTD", gate_BTP, self.ple_proj[...]))
        return h_BTD * self.layer_scalar[...].astype(h_BTD.dtype)


Block = Gemma4Block


# ---------------------------------------------------------------------------------------------------
# Hugging Face: config and state-dict key mapping (transformers `Gemma4ForCausalLM`, model_type
# `gemma4_text`; multimodal checkpoints nest it under `text_config` and `model.language_model.`).

HF_MODEL_TYPES = ("gemma4_text", "gemma4")
HF_ARCHITECTURE = "Gemma4ForCausalLM"
HF_LAYER_TYPES = {"sliding_attention": "sliding", "full_attention": "full"}


def from_hf_config(hf: dict) -> ml_collections.ConfigDict:
    """Our model config from a Hugging Face `config.json` dict."""
    if hf.get("model_type") == "gemma4":
        hf = hf["text_config"]
    if hf.get("use_bidirectional_attention") == "all":
        raise ValueError("bidirectional Gemma 4 text models are not supported (use_bidirectional_attention='all')")
    L = hf["num_hidden_layers"]
    layer_types = hf.get("layer_types") or [
        "full_attention" if (i + 1) % 6 == 0 else "sliding_attention" for i in range(L)]
    try:
        attention_types = [HF_LAYER_TYPES[t] for t in layer_types]
    except KeyError as e:
        raise ValueError(f"unsupported Gemma 4 layer type {e.args[0]!r}") from None
    per_layer = {int(k): v for k, v in (hf.get("per_layer_config") or {}).items()}
    full = [i for i, t in enumerate(attention_types) if t == "full"]
    global_head_dim = hf.get("global_head_dim") or (per_layer.get(full[0], {}).get("head_dim") if full else None)
    num_global_kv = hf.get("num_global_key_value_heads") or (
        per_layer.get(full[0], {}).get("num_key_value_heads") if full else None)
    rope = hf.get("rope_parameters") or {}
    sliding_rope = rope.get("sliding_attention", {"rope_type": "default", "rope_theta": 10_000.0})
    full_rope = rope.get("full_attention", {"rope_type": "proportional", "rope_theta": 1e6,
                                            "partial_rotary_factor": 0.25})
    if sliding_rope.get("rope_type", "default") != "default" or full_rope.get("rope_type") != "proportional":
        raise ValueError(f"unsupported Gemma 4 rope parameters {rope}")
    if full_rope.get("factor", 1.0) != 1.0:
        raise ValueError("proportional rope with factor != 1 is not supported")
    if hf.get("attention_bias"):
        raise ValueError("Gemma 4 with attention_bias=True is not supported")
    moe = bool(hf.get("enable_moe_block"))
    m = model_config(
        vocab_size=hf["vocab_size"], d_model=hf["hidden_size"], attention_types=attention_types,
        num_heads=hf["num_attention_heads"], num_kv_heads=hf["num_key_value_heads"], head_dim=hf["head_dim"],
        global_head_dim=global_head_dim or hf["head_dim"], num_global_kv_heads=num_global_kv,
        sliding_window=hf["sliding_window"], mlp_dim=hf["intermediate_size"],
        double_wide_mlp=bool(hf.get("use_double_wide_mlp")), num_kv_shared_layers=hf.get("num_kv_shared_layers", 0),
        k_eq_v=bool(hf.get("attention_k_eq_v")), ple_dim=hf.get("hidden_size_per_layer_input") or 0,
        ple_vocab_size=hf.get("vocab_size_per_layer_input"),
        num_experts=hf.get("num_experts") or 0 if moe else 0, top_k=hf.get("top_k_experts") or 0 if moe else 0,
        expert_dim=hf.get("moe_intermediate_size") or 0 if moe else 0,
        final_softcap=hf.get("final_logit_softcapping") or 0.0, norm_eps=hf.get("rms_norm_eps", 1e-6),
        sliding_theta=sliding_rope.get("rope_theta", 10_000.0), full_theta=full_rope.get("rope_theta", 1e6),
        full_rope_fraction=full_rope.get("partial_rotary_factor", 1.0),
        max_positions=hf.get("max_position_embeddings", 131_072))
    if hf.get("hidden_activation", "gelu_pytorch_tanh") != "gelu_pytorch_tanh":
        m.activation = hf["hidden_activation"]
    m.tie_embeddings = bool(hf.get("tie_word_embeddings", True))
    m.update(token_ids_from_hf(hf))
    return m


def _uniform(values, what: str):
    return uniform(values, what, "Gemma 4")


def to_hf_config(cfg) -> dict:
    """A `Gemma4TextConfig` dict for our model config; fails if the config has no HF equivalent."""
    L = cfg.num_layers
    others = sorted(set(cfg.attention_types) - set(ATTENTION_TYPES))
    if others:
        raise ValueError(f"Hugging Face Gemma 4 has sliding and full attention layers only, not {others}")
    sliding = [i for i, t in enumerate(cfg.attention_types) if t == "sliding"]
    full = [i for i, t in enumerate(cfg.attention_types) if t == "full"]
    if not full or cfg.attention_types[-1] != "full":
        raise ValueError("Hugging Face Gemma 4 needs the last layer to be a full-attention layer")
    k_eq_v = _uniform((cfg.k_eq_v[i] for i in full), "k_eq_v") or False
    if any(cfg.k_eq_v[i] for i in sliding):
        raise ValueError("Hugging Face Gemma 4 supports k_eq_v only on full-attention layers")
    n_shared = sum(1 for s in cfg.kv_sources if s >= 0)
    if kv_share_sources(cfg.attention_types, n_shared) != tuple(cfg.kv_sources):
        raise ValueError("kv_sources do not follow the Hugging Face Gemma 4 sharing rule")
    base_mlp = _uniform((cfg.mlp_dims[i] for i in range(L) if cfg.kv_sources[i] < 0), "mlp_dim")
    shared_mlp = _uniform((cfg.mlp_dims[i] for i in range(L) if cfg.kv_sources[i] >= 0), "shared-layer mlp_dim")
    if shared_mlp not in (None, base_mlp, 2 * base_mlp):
        raise ValueError("kv-shared layers must use the same or double MLP width in Hugging Face Gemma 4")
    moe = _uniform(cfg.moe_layers, "MoE setting")
    num_kv = _uniform((cfg.num_kv_heads[i] for i in sliding), "sliding num_kv_heads") or cfg.num_kv_heads[0]
    full_kv = _uniform((cfg.num_kv_heads[i] for i in full), "full-layer num_kv_heads")
    if full_kv != num_kv and not k_eq_v:
        raise ValueError("Hugging Face Gemma 4 gives full layers their own kv-head count only with k_eq_v")
    rope_s, rope_f = cfg.rope.get("sliding"), cfg.rope.full
    hf = {
        "model_type": "gemma4_text", "architectures": [HF_ARCHITECTURE],
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.d_model, "intermediate_size": base_mlp,
        "num_hidden_layers": L, "num_attention_heads": _uniform(cfg.num_heads, "num_heads"),
        "num_key_value_heads": num_kv,
        "head_dim": _uniform((cfg.head_dims[i] for i in sliding), "sliding head_dim") or cfg.head_dims[0],
        "global_head_dim": _uniform((cfg.head_dims[i] for i in full), "full head_dim"),
        "sliding_window": _uniform((cfg.windows[i] for i in sliding), "sliding window") or 512,
        "layer_types": [f"{t}_attention" for t in cfg.attention_types],
        "rope_parameters": {
            "sliding_attention": {"rope_type": "default", "rope_theta": float(rope_s.theta) if rope_s else 1e4},
            "full_attention": {"rope_type": "proportional", "rope_theta": float(rope_f.theta),
                               "partial_rotary_factor": float(rope_f.fraction)},
        },
        "num_kv_shared_layers": n_shared, "use_double_wide_mlp": bool(shared_mlp == 2 * base_mlp != base_mlp),
        "attention_k_eq_v": bool(k_eq_v), "final_logit_softcapping": cfg.final_softcap or None,
        "hidden_size_per_layer_input": cfg.ple_dim, "vocab_size_per_layer_input": cfg.ple_vocab_size,
        "enable_moe_block": bool(moe), "num_experts": cfg.num_experts or None,
        "top_k_experts": cfg.top_k or None, "moe_intermediate_size": cfg.expert_dim or None,
        "rms_norm_eps": cfg.norm_eps, "hidden_activation": "gelu_pytorch_tanh" if cfg.activation == "gelu_tanh"
        else cfg.activation, "tie_word_embeddings": bool(cfg.tie_embeddings),
        "max_position_embeddings": cfg.max_positions,
        "pad_token_id": cfg.pad_id, "eos_token_id": cfg.eos_id, "bos_token_id": cfg.bos_id,
        "attention_bias": False,
    }
    if k_eq_v:
        hf["num_global_key_value_heads"] = full_kv
    return hf


def hf_rules(cfg):
    """The state-dict mapping: `Rule`s from Hugging Face names (without the `model.` prefix) to our
    parameter paths, with the reshapes in both directions."""
    D = cfg.d_model
    rules = [Rule.one("embed_tokens.weight", ("embed", "table"), *same()),
             Rule.one("norm.weight", ("final_norm", "scale"), *same())]
    if not cfg.tie_embeddings:
        rules.append(Rule.one("lm_head.weight", ("lm_head",), *transpose(), hf_prefix=""))
    if cfg.ple_dim:
        rules += [
            Rule.one("embed_tokens_per_layer.weight", ("per_layer_embed", "token_table"), *same()),
            Rule.one("per_layer_model_projection.weight", ("per_layer_embed", "context_proj"), *transpose()),
            Rule.one("per_layer_projection_norm.weight", ("per_layer_embed", "context_norm", "scale"), *same()),
        ]
    norms = {"input_layernorm": "input_norm", "post_attention_layernorm": "post_attn_norm",
             "pre_feedforward_layernorm": "pre_ffn_norm", "post_feedforward_layernorm": "post_ffn_norm"}
    for i in range(cfg.num_layers):
        hf, ours = f"layers.{i}.", ("blocks", i)
        N, K, H = cfg.num_heads[i], cfg.num_kv_heads[i], cfg.head_dims[i]
        rules += [Rule.one(hf + f"{k}.weight", ours + (v, "scale"), *same()) for k, v in norms.items()]
        rules += [Rule.one(hf + "self_attn.q_proj.weight", ours + ("attn", "q_proj"), *linear_in(D, N, H)),
                  Rule.one(hf + "self_attn.q_norm.weight", ours + ("attn", "q_norm", "scale"), *same()),
                  Rule.one(hf + "self_attn.o_proj.weight", ours + ("attn", "o_proj"), *linear_out(N, H, D))]
        if cfg.kv_sources[i] < 0:
            rules += [Rule.one(hf + "self_attn.k_proj.weight", ours + ("attn", "k_proj"), *linear_in(D, K, H)),
                      Rule.one(hf + "self_attn.k_norm.weight", ours + ("attn", "k_norm", "scale"), *same())]
            if not cfg.k_eq_v[i]:
                rules.append(Rule.one(hf + "self_attn.v_proj.weight", ours + ("attn", "v_proj"),
                                      *linear_in(D, K, H)))
        rules += [Rule.one(hf + f"mlp.{p}.weight", ours + ("mlp", p), *transpose())
                  for p in ("gate_proj", "up_proj", "down_proj")]
        if cfg.moe_layers[i]:
            rules += [
                Rule.one(hf + "router.proj.weight", ours + ("moe", "router", "proj"), *transpose()),
                Rule.one(hf + "router.scale", ours + ("moe", "router", "input_scale"), *same()),
                Rule.one(hf + "router.per_expert_scale", ours + ("moe", "router", "per_expert_scale"), *same()),
                Rule.gate_up(hf + "experts.gate_up_proj", ours + ("moe", "experts", "gate_proj"),
                             ours + ("moe", "experts", "up_proj")),
                Rule.one(hf + "experts.down_proj", ours + ("moe", "experts", "down_proj"),
                         *transpose(axes=(0, 2, 1))),
            ]
            rules += [Rule.one(hf + f"{k}.weight", ours + (v, "scale"), *same())
                      for k, v in (("post_feedforward_layernorm_1", "post_ffn_norm_1"),
                                   ("pre_feedforward_layernorm_2", "pre_ffn_norm_2"),
                                   ("post_feedforward_layernorm_2", "post_ffn_norm_2"))]
        if cfg.ple_dim:
            rules += [Rule.one(hf + "per_layer_input_gate.weight", ours + ("ple_gate",), *transpose()),
                      Rule.one(hf + "per_layer_projection.weight", ours + ("ple_proj",), *transpose()),
                      Rule.one(hf + "post_per_layer_input_norm.weight", ours + ("post_ple_norm", "scale"), *same())]
        rules.append(Rule.one(hf + "layer_scalar", ours + ("layer_scalar",), *same()))
    return rules


def hf_ignored(cfg, name: str) -> bool:
    """Checkpoint tensors we accept and drop: redundant k/v weights of kv-shared layers, and the
    multimodal towers of `Gemma4ForConditionalGeneration` checkpoints."""
    parts = name.split(".")
    if len(parts) >= 4 and parts[0] == "layers" and parts[2] == "self_attn":
        layer = int(parts[1])
        return cfg.kv_sources[layer] >= 0 and parts[3] in ("k_proj", "v_proj", "k_norm", "v_norm")
    return False
