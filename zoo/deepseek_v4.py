"""DeepSeek-V4-like decoder: one K=V vector per token attending over a sliding window joined with
compressed entries of the whole past (CSA: the indexer's top-k of ratio-4 overlapping entries; HCA: all
ratio-128 entries; SWA: the window alone), manifold-constrained hyper-connections around every sublayer,
and a sqrt-softplus-routed MoE with a shared expert (hash-routed by token id in the first layers).

Residual: n streams x [B, T, n, D] (the embedding copied n times; collapsed by the decoder's HyperHead).
Block l:
    x = hc_attn(x, u -> attn_l(rmsnorm(u)))        attn_l: swa / csa / hca (layers/sparse_attention.py)
    x = hc_ffn(x, u -> moe_l(rmsnorm(u)))
    moe_l(h) = sum_k w_k expert_k(h) + shared(h)   w: sqrt(softplus(h W)) of the chosen experts, summing
                                                   to routed_scale; chosen by top-k of score + bias, or
                                                   by the token id in the first `num_hash_layers`
Experts compute silu(min(g, L)) * clip(u, -L, L). RoPE: plain (theta 10k) on SWA layers, YaRN (theta 160k,
attention factor 1) on CSA/HCA layers, their compressors and indexers. The optional multi-token-
prediction module (zoo.decoder.MTPModule) reuses this block with `mtp_attention_type`.
"""
from __future__ import annotations

import ml_collections
import numpy as np
from flax import nnx

from layers import kinds
from layers.context import LayerContext
from layers.hyper_connections import HyperConnection
from layers.norms import RMSNorm
from layers.rope import RopeSpec
from zoo.state_dict import Rule, linear_in, same, token_ids_from_hf, transpose

ATTENTION_TYPES = ("swa", "csa", "hca")
YARN = {"factor": 16.0, "original_max_positions": 65_536, "beta_fast": 32.0, "beta_slow": 1.0}


def model_config(*, vocab_size: int, d_model: int, attention_types, num_heads: int, head_dim: int, rope_dim: int,
                 q_rank: int, out_groups: int, out_rank: int, window: int = 128, csa_ratio: int = 4,
                 hca_ratio: int = 128, index_heads: int, index_dim: int, index_top_k: int, num_experts: int,
                 top_k: int, expert_dim: int, num_hash_layers: int = 3, routed_scale: float = 1.5,
                 swiglu_limit: float = 10.0, shared_expert_clamp: bool = True, hc_streams: int = 4,
                 hc_sinkhorn_iters: int = 20, hc_eps: float = 1e-6, mtp_depth: int = 1,
                 mtp_attention_type: str = "swa", mtp_loss_weight: float = 0.3, norm_eps: float = 1e-6,
                 rope_theta: float = 10_000.0, compress_rope_theta: float = 160_000.0, yarn: dict | None = YARN,
                 max_positions: int = 1 << 20) -> ml_collections.ConfigDict:
    """The model config of a DeepSeek-V4-like decoder. `yarn=None` gives CSA/HCA layers plain RoPE."""
    attention_types = tuple(attention_types)
    L = len(attention_types)
    m = ml_collections.ConfigDict()
    m.family = "deepseek_v4"
    m.vocab_size, m.d_model, m.num_layers = vocab_size, d_model, L
    m.attention_types = attention_types
    m.kv_sources = (-1,) * L
    m.num_heads, m.head_dim, m.rope_dim = num_heads, head_dim, rope_dim
    m.q_rank, m.out_groups, m.out_rank = q_rank, out_groups, out_rank
    m.window, m.csa_ratio, m.hca_ratio = window, csa_ratio, hca_ratio
    m.index_heads, m.index_dim, m.index_top_k = index_heads, index_dim, index_top_k
    main = {"kind": "default", "theta": rope_theta, "style": "interleaved"}
    compress = ({"kind": "yarn", "theta": compress_rope_theta, "style": "interleaved", "attention_factor": 1.0,
                 **yarn} if yarn else {"kind": "default", "theta": compress_rope_theta, "style": "interleaved"})
    m.rope = ml_collections.ConfigDict({"swa": main, "csa": compress, "hca": dict(compress)})
    m.num_experts, m.top_k, m.expert_dim = num_experts, top_k, expert_dim
    m.moe_layers, m.router, m.shared_expert_dim = True, "sqrt_softplus", expert_dim   # hash: first layers
    m.num_hash_layers, m.routed_scale = num_hash_layers, routed_scale
    m.swiglu_limit, m.shared_expert_clamp = swiglu_limit, shared_expert_clamp
    m.hc_streams, m.hc_sinkhorn_iters, m.hc_eps = hc_streams, hc_sinkhorn_iters, hc_eps
    m.mtp_depth, m.mtp_attention_type, m.mtp_loss_weight = mtp_depth, mtp_attention_type, mtp_loss_weight
    m.norm_eps = norm_eps
    m.activation = "silu"
    m.tie_embeddings = False
    m.max_positions = max_positions
    m.pad_id, m.eos_id, m.bos_id = 0, 1, 0
    m.attention_impl = "xla"
    m.dtype = "float32"
    return m


def layer_spec(cfg, i: int) -> tuple[str, bool]:
    """(attention type, hash-routed) of layer i; i >= num_layers are the multi-token-prediction blocks."""
    if i >= cfg.num_layers:
        return cfg.mtp_attention_type, False
    return cfg.attention_types[i], i < cfg.num_hash_layers


def validate(cfg) -> None:
    """Fails with a message naming the first inconsistency in a DeepSeek-V4-like model config."""
    L = cfg.num_layers
    kinds.check_layers(cfg, ("attention_types", "kv_sources"))
    kind = cfg.mtp_attention_type
    if kind not in kinds.ATTENTION_KINDS:
        raise ValueError(f"model.mtp_attention_type = {kind!r}; expected one of {tuple(sorted(kinds.ATTENTION_KINDS))}")
    if kind not in cfg.rope:
        raise ValueError(f"model.rope has no entry for attention type {kind!r}")
    kinds.ATTENTION_KINDS[kind].check(cfg, L, kind)
    if cfg.hc_streams < 0 or cfg.mtp_depth < 0:
        raise ValueError("model.hc_streams and model.mtp_depth must be >= 0")
    if not 0 <= cfg.num_hash_layers <= L:
        raise ValueError(f"model.num_hash_layers={cfg.num_hash_layers} must lie in [0, num_layers={L}]")
    exact = {"bfloat16": 256, "float16": 2048}.get(cfg.dtype)
    if cfg.num_hash_layers and exact and cfg.num_experts > exact:
        raise ValueError(f"hash routing stores expert ids up to {cfg.num_experts - 1}, which {cfg.dtype} does "
                         f"not hold exactly above {exact}; load this model with dtype float32")


class DeepseekV4Block(nnx.Module):
    def __init__(self, cfg, i: int, *, rngs: nnx.Rngs):
        kind, hashed = layer_spec(cfg, i)
        D, eps, n = cfg.d_model, cfg.norm_eps, cfg.hc_streams

        def hyper_connection():
            return (HyperConnection(n, D, sinkhorn_iters=cfg.hc_sinkhorn_iters, eps=cfg.hc_eps, norm_eps=eps,
                                    rngs=rngs) if n else None)

        self.attn_hc = hyper_connection()
        self.attn_norm = RMSNorm(D, eps=eps)
        self.attn = kinds.build_attention(cfg, i, rngs, kind=kind)
        self.ffn_hc = hyper_connection()
        self.ffn_norm = RMSNorm(D, eps=eps)
        self.mlp = kinds.build_mlp(cfg, i, rngs, moe=True, router="hash" if hashed else None)

    def __call__(self, x, ctx: LayerContext):
        """x: the residual streams [B, T, n, D] (or [B, T, D] with hc_streams 0, a plain residual)."""
        def attention(u_BTD):
            return self.attn.mix(self.attn_norm(u_BTD), ctx)

        def moe(u_BTD):
            return self.mlp.mix(self.ffn_norm(u_BTD), ctx)

        x = self.attn_hc(x, attention) if self.attn_hc is not None else x + attention(x)
        return self.ffn_hc(x, moe) if self.ffn_hc is not None else x + moe(x)


Block = DeepseekV4Block


# ---------------------------------------------------------------------------------------------------
# Hugging Face: config and state-dict key mapping (transformers `DeepseekV4ForCausalLM`, model_type
# `deepseek_v4`). `save_pretrained` writes DeepSeek's own leaf names (`attn.wq_a`, `ffn.experts.3.w1`,
# `hc_attn_fn`, ...) under `model.`; the released checkpoints use the same names without the prefix and
# spell a few differently (`embed`, `hc_head_fn`, `attn.kv_norm`); "a|b" rules accept either spelling.

HF_MODEL_TYPES = ("deepseek_v4",)
HF_ARCHITECTURE = "DeepseekV4ForCausalLM"
HF_LAYER_TYPES = {"sliding_attention": "swa", "compressed_sparse_attention": "csa",
                  "heavily_compressed_attention": "hca"}
HF_RATIO_TYPES = {0: "sliding_attention", 4: "compressed_sparse_attention", 128: "heavily_compressed_attention"}


def _hf_rope(rope: dict) -> dict:
    kind = rope.get("rope_type") or rope.get("type") or "default"
    spec = {"kind": kind, "theta": float(rope["rope_theta"]), "style": "interleaved"}
    if kind == "yarn":
        spec.update(factor=float(rope["factor"]), original_max_positions=int(rope["original_max_position_embeddings"]),
                    beta_fast=float(rope.get("beta_fast", 32.0)), beta_slow=float(rope.get("beta_slow", 1.0)),
                    truncate=bool(rope.get("truncate", True)),
                    attention_factor=float(rope.get("attention_factor", 1.0)))
    elif kind != "default":
        raise ValueError(f"unsupported DeepSeek-V4 rope type {kind!r}; expected 'default' or 'yarn'")
    return spec


def from_hf_config(hf: dict) -> ml_collections.ConfigDict:
    """Our model config from a Hugging Face (or DeepSeek release) `config.json` dict."""
    L = hf["num_hidden_layers"]
    ratios = hf.get("compress_ratios")
    rates = dict(hf.get("compress_rates") or {"compressed_sparse_attention": hf.get("compress_rate_csa", 4),
                                              "heavily_compressed_attention": hf.get("compress_rate_hca", 128)})
    if hf.get("layer_types"):
        layer_types = list(hf["layer_types"])
    elif ratios:
        layer_types = [HF_RATIO_TYPES[r] for r in ratios[:L]]
    else:  # transformers' default: two HCA layers, then HCA / CSA alternating
        layer_types = ["heavily_compressed_attention"] * min(L, 2) + [
            "compressed_sparse_attention" if i % 2 else "heavily_compressed_attention" for i in range(L - 2)]
    try:
        attention_types = [HF_LAYER_TYPES[t] for t in layer_types[:L]]
    except KeyError as e:
        raise ValueError(f"unsupported DeepSeek-V4 layer type {e.args[0]!r}") from None
    mtp_type = HF_LAYER_TYPES[HF_RATIO_TYPES[ratios[L]]] if ratios and len(ratios) > L else "swa"
    mlp_types = hf.get("mlp_layer_types")
    num_hash = (sum(1 for t in mlp_types if t == "hash_moe") if mlp_types
                else hf.get("num_hash_layers", hf.get("n_hash_layers", 3)))
    if mlp_types and list(mlp_types) != ["hash_moe"] * num_hash + ["moe"] * (len(mlp_types) - num_hash):
        raise ValueError(f"hash-routed MoE layers must come first, got mlp_layer_types={mlp_types}")
    for key, want in (("scoring_func", "sqrtsoftplus"), ("n_shared_experts", 1), ("num_key_value_heads", 1),
                      ("hidden_act", "silu"), ("norm_topk_prob", True)):
        if hf.get(key, want) != want:
            raise ValueError(f"DeepSeek-V4 with {key}={hf[key]!r} is not supported (expected {want!r})")
    if hf.get("tie_word_embeddings"):
        raise ValueError("DeepSeek-V4 with tied embeddings is not supported")
    head_dim = hf.get("head_dim", 512)
    rope_dim = hf.get("qk_rope_head_dim") or int(head_dim * (hf.get("partial_rotary_factor") or 64 / 512))
    rope = hf.get("rope_parameters") or {}
    if not (isinstance(rope.get("main"), dict) and isinstance(rope.get("compress"), dict)):
        yarn = {k: v for k, v in (rope or hf.get("rope_scaling") or {}).items() if k not in ("main", "compress")}
        rope = {"main": {"rope_type": "default", "rope_theta": hf.get("rope_theta", 10_000.0)},
                "compress": {**yarn, "rope_theta": hf.get("compress_rope_theta", 160_000.0)}}
    m = model_config(
        vocab_size=hf["vocab_size"], d_model=hf["hidden_size"], attention_types=attention_types,
        num_heads=hf["num_attention_heads"], head_dim=head_dim, rope_dim=rope_dim, q_rank=hf["q_lora_rank"],
        out_groups=hf["o_groups"], out_rank=hf["o_lora_rank"], window=hf.get("sliding_window", 128),
        csa_ratio=rates["compressed_sparse_attention"], hca_ratio=rates["heavily_compressed_attention"],
        index_heads=hf.get("index_n_heads", 64), index_dim=hf.get("index_head_dim", 128),
        index_top_k=hf.get("index_topk", 512), num_experts=hf["n_routed_experts"],
        top_k=hf["num_experts_per_tok"], expert_dim=hf["moe_intermediate_size"], num_hash_layers=num_hash,
        routed_scale=hf.get("routed_scaling_factor", 1.5), swiglu_limit=hf.get("swiglu_limit", 10.0),
        hc_streams=hf.get("hc_mult", 4), hc_sinkhorn_iters=hf.get("hc_sinkhorn_iters", 20),
        hc_eps=hf.get("hc_eps", 1e-6), mtp_depth=0, mtp_attention_type=mtp_type,
        norm_eps=hf.get("rms_norm_eps", 1e-6), max_positions=hf.get("max_position_embeddings", 1 << 20))
    m.rope = ml_collections.ConfigDict({"swa": _hf_rope(rope["main"]), "csa": _hf_rope(rope["compress"]),
                                        "hca": _hf_rope(rope["compress"])})
    m.update(token_ids_from_hf(hf))
    return m


def hf_update_config(cfg, names) -> None:
    """The multi-token-prediction blocks load when the checkpoint holds their weights (`mtp.<k>.`):
    DeepSeek's release keeps them, transformers drops them."""
    cfg.mtp_depth = len({n.split(".")[1] for n in names if n.startswith("mtp.")})


def _rope_to_hf(rope) -> dict:
    out = {"rope_type": rope.kind, "rope_theta": float(rope.theta)}
    if rope.kind == "yarn":
        out.update(factor=float(rope.factor), original_max_position_embeddings=int(rope.original_max_positions),
                   beta_fast=float(rope.beta_fast), beta_slow=float(rope.beta_slow),
                   attention_factor=float(RopeSpec.from_config(rope).attention_factor),
                   truncate=bool(rope.get("truncate", True)))
    elif rope.kind != "default":
        raise ValueError(f"Hugging Face DeepSeek-V4 has no rope kind {rope.kind!r}")
    if rope.get("style", "half") != "interleaved" or rope.get("fraction", 1.0) != 1.0:
        raise ValueError("Hugging Face DeepSeek-V4 rotates the trailing rope_dim dims in interleaved pairs")
    return out


def to_hf_config(cfg) -> dict:
    """A `DeepseekV4Config` dict for our model config; fails if the config has no HF equivalent."""
    if not cfg.hc_streams:
        raise ValueError("Hugging Face DeepSeek-V4 always has hyper-connections (model.hc_streams > 0)")
    others = sorted(set(cfg.attention_types) - set(ATTENTION_TYPES))
    if others:
        raise ValueError(f"Hugging Face DeepSeek-V4 has swa, csa and hca layers only, not {others}")
    if not cfg.shared_expert_clamp:
        raise ValueError("Hugging Face DeepSeek-V4 clamps the shared expert too (model.shared_expert_clamp)")
    ropes = [_rope_to_hf(cfg.rope[t]) for t in (set(cfg.attention_types) - {"swa"} or {"csa"})]
    if any(r != ropes[0] for r in ropes):
        raise ValueError("Hugging Face DeepSeek-V4 gives CSA and HCA layers one rope, the config has two")
    L = cfg.num_layers
    hf_types = {v: k for k, v in HF_LAYER_TYPES.items()}
    main = {**_rope_to_hf(cfg.rope.swa), "partial_rotary_factor": cfg.rope_dim / cfg.head_dim}
    compress = {**ropes[0], "partial_rotary_factor": cfg.rope_dim / cfg.head_dim}
    return {
        "model_type": "deepseek_v4", "architectures": [HF_ARCHITECTURE],
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.d_model, "num_hidden_layers": L,
        "num_attention_heads": cfg.num_heads, "num_key_value_heads": 1, "head_dim": cfg.head_dim,
        "partial_rotary_factor": cfg.rope_dim / cfg.head_dim, "q_lora_rank": cfg.q_rank,
        "o_groups": cfg.out_groups, "o_lora_rank": cfg.out_rank, "sliding_window": cfg.window,
        "layer_types": [hf_types[t] for t in cfg.attention_types],
        "compress_rates": {"compressed_sparse_attention": cfg.csa_ratio,
                           "heavily_compressed_attention": cfg.hca_ratio},
        "index_n_heads": cfg.index_heads, "index_head_dim": cfg.index_dim, "index_topk": cfg.index_top_k,
        "n_routed_experts": cfg.num_experts, "num_experts_per_tok": cfg.top_k, "n_shared_experts": 1,
        "moe_intermediate_size": cfg.expert_dim, "scoring_func": "sqrtsoftplus", "norm_topk_prob": True,
        "routed_scaling_factor": cfg.routed_scale, "swiglu_limit": cfg.swiglu_limit,
        "mlp_layer_types": ["hash_moe"] * cfg.num_hash_layers + ["moe"] * (L - cfg.num_hash_layers),
        "hc_mult": cfg.hc_streams, "hc_sinkhorn_iters": cfg.hc_sinkhorn_iters, "hc_eps": cfg.hc_eps,
        "rms_norm_eps": cfg.norm_eps, "rope_theta": main["rope_theta"],
        "compress_rope_theta": compress["rope_theta"], "rope_parameters": {"main": main, "compress": compress},
        "num_nextn_predict_layers": cfg.mtp_depth, "hidden_act": "silu", "tie_word_embeddings": False,
        "max_position_embeddings": cfg.max_positions, "pad_token_id": cfg.pad_id, "eos_token_id": cfg.eos_id,
        "bos_token_id": cfg.bos_id, "attention_bias": False,
    }


def _block_rules(cfg, i: int, hf: str, ours: tuple, hf_prefix: str | None) -> list:
    """The rules of one block: HF names `hf` + leaf, our paths `ours` + leaf."""
    D, N, H, G, O = cfg.d_model, cfg.num_heads, cfg.head_dim, cfg.out_groups, cfg.out_rank
    M, E = N // G, cfg.num_experts
    kind, hashed = layer_spec(cfg, i)

    def one(name, path, convert):
        return Rule.one("|".join(hf + n for n in name.split("|")), ours + path, *convert, hf_prefix=hf_prefix)

    def mixing(C):   # HF [C, n*D] <-> ours [n, D, C]
        n = cfg.hc_streams
        return (lambda a: a.T.reshape(n, D, C)), (lambda x: x.reshape(n * D, C).T)

    def experts(leaf: str, param: str):   # E tensors [out, in] <-> ours [E, in, out]
        names = tuple(hf + f"ffn.experts.{e}.{leaf}.weight" for e in range(E))
        return Rule(names, (ours + ("mlp", "experts", param),), lambda *a: (np.stack([w.T for w in a]),),
                    lambda x: tuple(x[e].T for e in range(E)), hf_prefix)

    def compressor(hf_c: str, ours_c: tuple):
        return [one(hf_c + "wkv.weight", ours_c + ("kv_proj",), transpose()),
                one(hf_c + "wgate.weight", ours_c + ("gate_proj",), transpose()),
                one(hf_c + "ape", ours_c + ("position_bias",), same()),
                one(hf_c + "norm.weight", ours_c + ("norm", "scale"), same())]

    n_mix = (2 + cfg.hc_streams) * cfg.hc_streams
    rules = [one("attn_norm.weight", ("attn_norm", "scale"), same()),
             one("ffn_norm.weight", ("ffn_norm", "scale"), same())]
    if cfg.hc_streams:
        for sub in ("attn", "ffn"):
            rules += [one(f"hc_{sub}_fn", (f"{sub}_hc", "proj"), mixing(n_mix)),
                      one(f"hc_{sub}_base", (f"{sub}_hc", "bias"), same()),
                      one(f"hc_{sub}_scale", (f"{sub}_hc", "scale"), same())]
    rules += [
        one("attn.attn_sink", ("attn", "sinks"), same()),
        one("attn.wq_a.weight", ("attn", "q_a_proj"), transpose()),
        one("attn.q_norm.weight", ("attn", "q_norm", "scale"), same()),
        one("attn.wq_b.weight", ("attn", "q_b_proj"), linear_in(cfg.q_rank, N, H)),
        one("attn.wkv.weight", ("attn", "kv_proj"), transpose()),
        one("attn.norm.weight|attn.kv_norm.weight", ("attn", "kv_norm", "scale"), same()),
        one("attn.wo_a.weight", ("attn", "o_a_proj"),   # HF [G*O, M*H] <-> ours [G, M, H, O]
            ((lambda a: a.reshape(G, O, M, H).transpose(0, 2, 3, 1)),
             (lambda x: x.transpose(0, 3, 1, 2).reshape(G * O, M * H)))),
        one("attn.wo_b.weight", ("attn", "o_b_proj"),   # HF [D, G*O] <-> ours [G, O, D]
            ((lambda a: a.T.reshape(G, O, D)), (lambda x: x.reshape(G * O, D).T))),
    ]
    if kind != "swa":
        rules += compressor("attn.compressor.", ("attn", "compressor"))
    if kind == "csa":
        rules += compressor("attn.indexer.compressor.", ("attn", "indexer", "compressor"))
        rules += [one("attn.indexer.wq_b.weight", ("attn", "indexer", "q_proj"),
                      linear_in(cfg.q_rank, cfg.index_heads, cfg.index_dim)),
                  one("attn.indexer.weights_proj.weight|attn.indexer.scorer.weights_proj.weight",
                      ("attn", "indexer", "weights_proj"), transpose())]
    rules.append(one("ffn.gate.weight", ("mlp", "router", "proj"), transpose()))
    if hashed:   # integer expert ids on disk, exact small integers in our float table
        rules.append(one("ffn.gate.tid2eid", ("mlp", "router", "token_experts"),
                         ((lambda a: a), (lambda x: x.round().astype("int32")))))
    else:
        rules.append(one("ffn.gate.bias", ("mlp", "router", "correction_bias"), same()))
    rules += [experts("w1", "gate_proj"), experts("w3", "up_proj"), experts("w2", "down_proj")]
    rules += [one(f"ffn.shared_experts.{w}.weight", ("mlp", "shared_expert", p), transpose())
              for w, p in (("w1", "gate_proj"), ("w3", "up_proj"), ("w2", "down_proj"))]
    return rules


def hf_rules(cfg):
    """The state-dict mapping: `Rule`s from checkpoint names (without the `model.` prefix; "a|b" = either
    spelling, the first is written) to our parameter paths, with the reshapes in both directions. The
    multi-token-prediction blocks live at the top level (`mtp.<k>.`), as in DeepSeek's release."""
    n, D = cfg.hc_streams, cfg.d_model
    mixing = ((lambda a: a.T.reshape(n, D, n)), (lambda x: x.reshape(n * D, n).T))
    rules = [Rule.one("embed_tokens.weight|embed.weight", ("embed", "table"), *same()),
             Rule.one("norm.weight", ("final_norm", "scale"), *same()),
             Rule.one("head.weight", ("lm_head",), *transpose(), hf_prefix="")]
    if n:
        rules += [Rule.one("hc_head.hc_fn|hc_head_fn", ("hyper_head", "proj"), *mixing),
                  Rule.one("hc_head.hc_base|hc_head_base", ("hyper_head", "bias"), *same()),
                  Rule.one("hc_head.hc_scale|hc_head_scale", ("hyper_head", "scale"), *same())]
    for i in range(cfg.num_layers):
        rules += _block_rules(cfg, i, f"layers.{i}.", ("blocks", i), None)
    for k in range(cfg.get("mtp_depth", 0)):
        hf, ours = f"mtp.{k}.", ("mtp", k)
        rules += _block_rules(cfg, cfg.num_layers + k, hf, ours + ("block",), "")
        rules += [Rule.one(hf + "e_proj.weight", ours + ("embed_proj",), *transpose(), hf_prefix=""),
                  Rule.one(hf + "h_proj.weight", ours + ("hidden_proj",), *transpose(), hf_prefix=""),
                  Rule.one(hf + "enorm.weight", ours + ("embed_norm", "scale"), *same(), hf_prefix=""),
                  Rule.one(hf + "hnorm.weight", ours + ("hidden_norm", "scale"), *same(), hf_prefix=""),
                  Rule.one(hf + "norm.weight", ours + ("final_norm", "scale"), *same(), hf_prefix="")]
        if n:
            rules += [Rule.one(hf + "hc_head_fn", ours + ("hyper_head", "proj"), *mixing, hf_prefix=""),
                      Rule.one(hf + "hc_head_base", ours + ("hyper_head", "bias"), *same(), hf_prefix=""),
                      Rule.one(hf + "hc_head_scale", ours + ("hyper_head", "scale"), *same(), hf_prefix="")]
    return rules


def hf_ignored(cfg, name: str) -> bool:
    """Checkpoint tensors we accept and drop: none (every tensor has a parameter)."""
    return False
