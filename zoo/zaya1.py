"""ZAYA1-like decoder: Compressed Convolutional Attention and a top-1 MoE with an MLP router whose state
accumulates across layers and which may skip the experts, on a float32 residual stream with learned
scales and biases.

Model input: x = (embed(ids) + b_in) * s_in, kept in float32.
Block l:
    x = (cca(rmsnorm(x)) + hb) * hs + (x + rb) * rs                    (learned per-channel hb, hs, rb, rs)
    m, r_l = moe(rmsnorm(x), r_{l-1})      r: the router state, handed from layer to layer (none into l=0)
    x = (m + hb') * hs' + (x + rb') * rs'
"""
from __future__ import annotations

import jax
import ml_collections
from flax import nnx

from layers import kinds
from layers.context import LayerContext
from layers.norms import RMSNorm
from layers.residual import ScaledResidual
from zoo.state_dict import Rule, linear_in, linear_out, same, token_ids_from_hf, transpose, uniform

ATTENTION_TYPES = ("cca", "cca_sliding")
PER_LAYER_KEYS = ("attention_types", "num_heads", "num_kv_heads", "head_dims", "windows")


def model_config(*, vocab_size: int, d_model: int, attention_types, num_heads: int, num_kv_heads: int,
                 head_dim: int, num_experts: int, expert_dim: int, router_dim: int, sliding_window: int = 0,
                 conv_kernel_sizes: tuple[int, int] = (2, 2), skip_output: str = "zero",
                 norm_eps: float = 1e-5, rope_theta: float = 5_000_000.0, sliding_theta: float = 10_000.0,
                 rope_fraction: float = 0.5, max_positions: int = 131_072, pad_id: int = 0, bos_id: int = 2,
                 eos_id: int = 106) -> ml_collections.ConfigDict:
    """The per-layer model config of a ZAYA1-like decoder from the family's few knobs."""
    attention_types = tuple(attention_types)
    L = len(attention_types)
    unknown = set(attention_types) - set(ATTENTION_TYPES)
    if unknown:
        raise ValueError(f"unknown attention types {sorted(unknown)}; expected {ATTENTION_TYPES}")
    m = ml_collections.ConfigDict()
    m.family = "zaya1"
    m.vocab_size, m.d_model, m.num_layers = vocab_size, d_model, L
    m.attention_types = attention_types
    m.num_heads = (num_heads,) * L
    m.num_kv_heads = (num_kv_heads,) * L
    m.head_dims = (head_dim,) * L
    m.windows = tuple(sliding_window if t == "cca_sliding" else 0 for t in attention_types)
    m.conv_kernel_sizes = tuple(conv_kernel_sizes)
    m.rope = ml_collections.ConfigDict({
        "cca": {"kind": "default", "theta": rope_theta, "fraction": rope_fraction},
        "cca_sliding": {"kind": "default", "theta": sliding_theta, "fraction": rope_fraction},
    })
    m.num_experts, m.top_k, m.expert_dim, m.router_dim = num_experts, 1, expert_dim, router_dim
    m.moe_layers, m.router = True, "mlp_skip"
    m.skip_output = skip_output
    m.activation = "silu"
    m.router_activation = "gelu"
    m.norm_eps = norm_eps
    m.input_scale_bias = True
    m.residual_fp32 = True
    m.tie_embeddings = True
    m.max_positions = max_positions
    m.pad_id, m.eos_id, m.bos_id = pad_id, eos_id, bos_id
    m.attention_impl = "xla"
    m.dtype = "float32"
    return m


def validate(cfg) -> None:
    """Fails with a message naming the first inconsistency in a ZAYA1-like model config."""
    kinds.check_layers(cfg, PER_LAYER_KEYS)


class Zaya1Block(nnx.Module):
    def __init__(self, cfg, i: int, *, rngs: nnx.Rngs):
        D, eps = cfg.d_model, cfg.norm_eps
        self.input_norm = RMSNorm(D, eps=eps)
        self.attn = kinds.build_attention(cfg, i, rngs)
        self.post_attn_residual = ScaledResidual(D)
        self.post_attn_norm = RMSNorm(D, eps=eps)
        self.mlp = kinds.build_mlp(cfg, i, rngs)
        self.post_mlp_residual = ScaledResidual(D)

    def __call__(self, x_BTD: jax.Array, ctx: LayerContext) -> jax.Array:
        dtype = self.input_norm.scale[...].dtype          # the compute dtype; x may be a float32 stream
        x_BTD = self.post_attn_residual(self.attn.mix(self.input_norm(x_BTD.astype(dtype)), ctx), x_BTD)
        return self.post_mlp_residual(self.mlp.mix(self.post_attn_norm(x_BTD.astype(dtype)), ctx), x_BTD)


Block = Zaya1Block


# ---------------------------------------------------------------------------------------------------
# Hugging Face: config and state-dict key mapping (transformers `ZayaForCausalLM`, model_type `zaya`).

HF_MODEL_TYPES = ("zaya",)
HF_ARCHITECTURE = "ZayaForCausalLM"
HF_LAYER_TYPES = {"hybrid": "cca", "hybrid_sliding": "cca_sliding"}
HF_DEFAULT_ROPE = {"hybrid": {"rope_type": "default", "rope_theta": 5_000_000.0, "partial_rotary_factor": 0.5},
                   "hybrid_sliding": {"rope_type": "default", "rope_theta": 10_000.0, "partial_rotary_factor": 0.5}}


def from_hf_config(hf: dict) -> ml_collections.ConfigDict:
    """Our model config from a Hugging Face `config.json` dict."""
    L = hf.get("num_hidden_layers", 40)
    layer_types = hf.get("layer_types") or ["hybrid"] * L
    try:
        attention_types = [HF_LAYER_TYPES[t] for t in layer_types]
    except KeyError as e:
        raise ValueError(f"unsupported ZAYA layer type {e.args[0]!r}; expected one of {sorted(HF_LAYER_TYPES)}"
                         ) from None
    for key in ("attention_bias", "lm_head_bias"):
        if hf.get(key):
            raise ValueError(f"ZAYA with {key}=True is not supported")
    if hf.get("num_experts_per_tok", 1) != 1:
        raise ValueError(f"ZAYA routes one expert per token; num_experts_per_tok = {hf['num_experts_per_tok']}")
    rope = hf.get("rope_parameters") or {}
    ropes = {t: rope.get(t) or HF_DEFAULT_ROPE[t] for t in HF_LAYER_TYPES}
    for t, r in ropes.items():
        if r.get("rope_type", "default") != "default":
            raise ValueError(f"unsupported ZAYA rope type {r['rope_type']!r} for {t} layers")
    if ropes["hybrid"].get("partial_rotary_factor", 1.0) != ropes["hybrid_sliding"].get("partial_rotary_factor", 1.0):
        raise ValueError("different partial_rotary_factor for hybrid and hybrid_sliding layers is not supported")
    m = model_config(
        vocab_size=hf.get("vocab_size", 262_272), d_model=hf.get("hidden_size", 2048), attention_types=attention_types,
        num_heads=hf.get("num_attention_heads", 8), num_kv_heads=hf.get("num_key_value_heads", 2),
        head_dim=hf.get("head_dim", 128), num_experts=hf.get("num_experts", 16),
        expert_dim=hf.get("moe_intermediate_size", 2048), router_dim=hf.get("router_hidden_size", 256),
        sliding_window=hf.get("sliding_window") or 0,
        conv_kernel_sizes=(hf.get("cca_time0", 2), hf.get("cca_time1", 2)), norm_eps=hf.get("rms_norm_eps", 1e-5),
        rope_theta=ropes["hybrid"]["rope_theta"], sliding_theta=ropes["hybrid_sliding"]["rope_theta"],
        rope_fraction=ropes["hybrid"].get("partial_rotary_factor", 1.0),
        max_positions=hf.get("max_position_embeddings", 131_072),
        **token_ids_from_hf(hf))
    m.activation = hf.get("hidden_act", "silu")
    m.tie_embeddings = bool(hf.get("tie_word_embeddings", True))
    return m


def _uniform(values, what: str):
    return uniform(values, what, "ZAYA")


def to_hf_config(cfg) -> dict:
    """A `ZayaConfig` dict for our model config; fails if the config has no HF equivalent."""
    others = sorted(set(cfg.attention_types) - set(ATTENTION_TYPES))
    if others:
        raise ValueError(f"Hugging Face ZAYA has CCA attention layers only, not {others}")
    if cfg.skip_output != "zero":
        raise ValueError(f"Hugging Face ZAYA outputs zero for tokens routed to the skip class; "
                         f"model.skip_output = {cfg.skip_output!r} has no equivalent there")
    if cfg.router_activation != "gelu" or not (cfg.input_scale_bias and cfg.residual_fp32):
        raise ValueError("Hugging Face ZAYA needs a gelu router, the input scale/bias and an fp32 residual stream")
    sliding = [cfg.windows[i] for i, t in enumerate(cfg.attention_types) if t == "cca_sliding"]
    rope, rope_s = cfg.rope.cca, cfg.rope.cca_sliding
    if rope.fraction != rope_s.fraction or rope.kind != "default" or rope_s.kind != "default":
        raise ValueError("Hugging Face ZAYA needs default RoPE with one partial fraction on all layers")
    t0, t1 = cfg.conv_kernel_sizes
    return {
        "model_type": "zaya", "architectures": [HF_ARCHITECTURE],
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.d_model, "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": _uniform(cfg.num_heads, "num_heads"),
        "num_key_value_heads": _uniform(cfg.num_kv_heads, "num_kv_heads"),
        "head_dim": _uniform(cfg.head_dims, "head_dim"),
        "layer_types": ["hybrid_sliding" if t == "cca_sliding" else "hybrid" for t in cfg.attention_types],
        "sliding_window": _uniform(sliding, "sliding window") if sliding else None,
        "rope_parameters": {
            "hybrid": {"rope_type": "default", "rope_theta": float(rope.theta),
                       "partial_rotary_factor": float(rope.fraction)},
            "hybrid_sliding": {"rope_type": "default", "rope_theta": float(rope_s.theta),
                               "partial_rotary_factor": float(rope_s.fraction)},
        },
        "cca_time0": t0, "cca_time1": t1,
        "num_experts": cfg.num_experts, "num_experts_per_tok": 1, "moe_intermediate_size": cfg.expert_dim,
        "router_hidden_size": cfg.router_dim, "hidden_act": cfg.activation, "rms_norm_eps": cfg.norm_eps,
        "tie_word_embeddings": bool(cfg.tie_embeddings), "max_position_embeddings": cfg.max_positions,
        "pad_token_id": cfg.pad_id, "eos_token_id": cfg.eos_id, "bos_token_id": cfg.bos_id,
        "attention_bias": False, "lm_head_bias": False,
    }


def hf_rules(cfg):
    """The state-dict mapping: `Rule`s from Hugging Face names (without the `model.` prefix) to our
    parameter paths, with the reshapes in both directions."""
    D = cfg.d_model
    rules = [Rule.one("embed_tokens.weight", ("embed", "table"), *same()),
             Rule.one("norm.weight", ("final_norm", "scale"), *same()),
             Rule.one("input_hidden_states_bias", ("input_scale_bias", "bias"), *same()),
             Rule.one("input_hidden_states_scale", ("input_scale_bias", "scale"), *same())]
    if not cfg.tie_embeddings:
        rules.append(Rule.one("lm_head.weight", ("lm_head",), *transpose(), hf_prefix=""))
    for i in range(cfg.num_layers):
        hf, ours = f"layers.{i}.", ("blocks", i)
        N, K, H = cfg.num_heads[i], cfg.num_kv_heads[i], cfg.head_dims[i]
        G = N + K
        attn, qkv, attn_ours = hf + "self_attn.", hf + "self_attn.qkv_proj.", ours + ("attn",)
        rules += [
            Rule.one(hf + "input_layernorm.weight", ours + ("input_norm", "scale"), *same()),
            Rule.one(hf + "post_attention_layernorm.weight", ours + ("post_attn_norm", "scale"), *same()),
            Rule.one(qkv + "q_proj.weight", attn_ours + ("q_proj",), *linear_in(D, N, H)),
            Rule.one(qkv + "k_proj.weight", attn_ours + ("k_proj",), *linear_in(D, K, H)),
            Rule.one(qkv + "v_proj_current.weight", attn_ours + ("v_current",), *transpose()),
            Rule.one(qkv + "v_proj_delayed.weight", attn_ours + ("v_delayed",), *transpose()),
            # Conv1d weights: depthwise [G*H, 1, t0] <-> ours [t0, G, H]; grouped [G*H_out, H_in, t1] <->
            # ours [t1, G, H_in, H_out].
            Rule.one(qkv + "conv_qk_depthwise.weight", attn_ours + ("conv_depthwise",),
                     lambda a, G=G, H=H: a[:, 0, :].T.reshape(-1, G, H),
                     lambda x: x.reshape(x.shape[0], -1).T[:, None, :]),
            Rule.one(qkv + "conv_qk_depthwise.bias", attn_ours + ("conv_depthwise_bias",),
                     lambda a, G=G, H=H: a.reshape(G, H), lambda x: x.reshape(-1)),
            Rule.one(qkv + "conv_qk_grouped.weight", attn_ours + ("conv_grouped",),
                     lambda a, G=G, H=H: a.reshape(G, H, H, -1).transpose(3, 0, 2, 1),
                     lambda x, G=G, H=H: x.transpose(1, 3, 2, 0).reshape(G * H, H, -1)),
            Rule.one(qkv + "conv_qk_grouped.bias", attn_ours + ("conv_grouped_bias",),
                     lambda a, G=G, H=H: a.reshape(G, H), lambda x: x.reshape(-1)),
            Rule.one(attn + "qk_norm.temp", attn_ours + ("temp",), *same()),
            Rule.one(attn + "o_proj.weight", attn_ours + ("o_proj",), *linear_out(N, H, D)),
        ]
        gate, router = hf + "mlp.gate.", ours + ("mlp", "router")
        rules += [
            Rule.one(gate + "down_proj.weight", router + ("down_proj",), *transpose()),
            Rule.one(gate + "down_proj.bias", router + ("down_bias",), *same()),
            Rule.one(gate + "router_mlp.norm.weight", router + ("norm", "scale"), *same()),
            Rule.one(gate + "router_mlp.fc1.weight", router + ("fc1",), *transpose()),
            Rule.one(gate + "router_mlp.fc1.bias", router + ("fc1_bias",), *same()),
            Rule.one(gate + "router_mlp.fc2.weight", router + ("fc2",), *transpose()),
            Rule.one(gate + "router_mlp.fc2.bias", router + ("fc2_bias",), *same()),
            Rule.one(gate + "router_mlp.out_proj.weight", router + ("out_proj",), *transpose()),
            Rule.one(gate + "balancing_biases", router + ("balancing_biases",), *same()),
            Rule.gate_up(hf + "mlp.experts.gate_up_proj", ours + ("mlp", "experts", "gate_proj"),
                         ours + ("mlp", "experts", "up_proj")),
            Rule.one(hf + "mlp.experts.down_proj", ours + ("mlp", "experts", "down_proj"),
                     *transpose(axes=(0, 2, 1))),
        ]
        if i > 0:
            rules.append(Rule.one(gate + "router_states_scale", router + ("state_scale",), *same()))
        for theirs, mine in (("post_attention_residual_scale", "post_attn_residual"),
                             ("post_mlp_residual_scale", "post_mlp_residual")):
            rules += [Rule.one(f"{hf}{theirs}.{k}", ours + (mine,) + v, *same())
                      for k, v in (("hidden_states_scale", ("branch", "scale")),
                                   ("hidden_states_bias", ("branch", "bias")),
                                   ("residual_scale", ("residual", "scale")),
                                   ("residual_bias", ("residual", "bias")))]
    return rules


def hf_ignored(cfg, name: str) -> bool:
    """Checkpoint tensors we accept and drop: none."""
    return False
