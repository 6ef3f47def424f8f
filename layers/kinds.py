"""The registry of layer kinds: every family's stack takes its token and channel mixers from here.

A config picks each layer's kinds as data: `attention_types[i]` names the attention kind of layer i
(`kv_sources[i] >= 0` turns a grouped-query layer into a KV-shared one that reads layer kv_sources[i]'s
keys and values), and `moe_layers[i]` makes layer i's MLP a mixture of experts behind the router kind
`router` (else a dense gated MLP). An option is read per layer with `option`: a scalar applies to every
layer, a tuple gives one value per layer. Each kind is one `AttentionKind` entry below: how it builds its
module (whose `mix(x_BTD, ctx)` is the token mixer), which options it reads and checks, and its cache and
FLOP accounting (zoo.analysis reads the same objects). A new kind is one module plus one line in
ATTENTION_KINDS; it then works in every family's stack.

Attention kinds and the options they read (defaults in LAYER_OPTIONS):
    full, sliding    grouped-query attention: num_heads, num_kv_heads, head_dims, windows (sliding), kv_sources,
                     k_eq_v, qk_norm, v_norm, attn_scale, gating, attention_sinks, rope[kind]
    cca, cca_sliding compressed convolutional attention: num_heads, num_kv_heads, head_dims, windows,
                     conv_kernel_sizes, rope[kind]
    swa, csa, hca    one K=V vector per token over a window (+ compressed entries; the indexer's top-k for
                     csa): num_heads, head_dim, rope_dim, q_rank, out_groups, out_rank, window, csa_ratio,
                     hca_ratio, index_heads, index_dim, index_top_k, rope[kind]; under the Pallas kernels
                     csa_dkv (CSA's backward path) and indexer_fused_topk
    msa              memory sparse attention (layers.msa; a router layer): num_heads, num_kv_heads, head_dims,
                     qk_norm, attn_scale, msa_chunk_size, msa_top_k, msa_head_reduce, msa_max_doc_len,
                     msa_query_offset (None: msa_max_doc_len), rope[msa]
MLP kinds: dense (mlp_dims or mlp_dim, activation, swiglu_limit) and moe (num_experts, top_k, expert_dim,
router: softmax | sigmoid | sqrt_softplus | hash | mlp_skip, shared_expert_dim, routed_scale,
router_softcap, router_dim, skip_output, swiglu_limit, shared_expert_clamp, experts_matmul: the grouped
matmul, layers.moe.GROUPED_MATMUL_IMPLS).
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from flax import nnx

from layers import activations, params
from layers.attention import IMPLS, OUTPUT_GATES, Attention
from layers.cca import CCA
from layers.mlp import GatedMLP
from layers.mlp_router import SKIP_OUTPUTS, SkipMoE
from layers.moe import GROUPED_MATMUL_IMPLS, ROUTERS, MoE
from layers.msa import HEAD_REDUCTIONS, MemorySparseAttention
from layers.rope import RopeSpec
from layers.sparse_attention import CompressedAttention
from pallas_kernels.compressed import CSA_DKV

# Options a config may leave out, with the value they then take (every layer alike).
LAYER_OPTIONS = {
    "kv_sources": -1, "k_eq_v": False, "qk_norm": True, "v_norm": False, "attn_scale": None, "gating": "none",
    "attention_sinks": False, "windows": 0, "conv_kernel_sizes": (2, 2), "moe_layers": False,
    "router": "softmax", "shared_expert_dim": 0, "routed_scale": 1.0, "router_softcap": 0.0,
    "swiglu_limit": 0.0, "shared_expert_clamp": False, "skip_output": "zero", "router_activation": "gelu",
    "router_input_norm": True, "router_dim": 0, "attention_impl": "xla", "experts_matmul": "auto",
    "csa_dkv": "atomic", "indexer_fused_topk": False, "norm_eps": 1e-6,
    "activation": "silu",
    "msa_chunk_size": 64, "msa_top_k": 16, "msa_head_reduce": "mean", "msa_max_doc_len": 4096,
    "msa_query_offset": None,
}
TUPLE_VALUED = frozenset({"conv_kernel_sizes"})   # options whose one value is itself a tuple
_REQUIRED = object()


def option(cfg, key: str, i: int, default: Any = _REQUIRED) -> Any:
    """Layer i's value of option `key`: the config's scalar, or entry i of its per-layer tuple."""
    if key in cfg:
        value = cfg[key]
    elif default is not _REQUIRED:
        value = default
    elif key in LAYER_OPTIONS:
        value = LAYER_OPTIONS[key]
    else:
        raise ValueError(f"layer {i} needs model.{key}, which the config does not set")
    if isinstance(value, (tuple, list)) and key not in TUPLE_VALUED:
        if i >= len(value):
            raise ValueError(f"model.{key} has {len(value)} entries; layer {i} has none")
        return value[i]
    return value


def _rope(cfg, kind: str) -> RopeSpec:
    if kind not in cfg.get("rope", {}):
        raise ValueError(f"model.rope has no entry for attention type {kind!r}")
    return RopeSpec.from_config(cfg.rope[kind])


@dataclasses.dataclass(frozen=True)
class Accounting:
    """How the layers of one attention kind cache and attend (zoo.analysis).

    kv_bytes_per_token(cfg, i, itemsize): bytes one cached token costs layer i.
    cached_tokens(cfg, i, context): tokens layer i caches at a context length (an int or an integer numpy
        array of lengths), which is also how many keys the query at that position reads.
    flops_per_key(cfg, i): forward FLOPs of one query of layer i against one key.
    flops_per_query(cfg, i, context): optional; forward attention FLOPs of the query at position `context`
        (int or array) when they are not flops_per_key x cached_tokens (sparse selection, an indexer).
    native_kv_bytes(cfg, i, context): optional; cache bytes in the model's own cache precision (e.g. fp8
        entries with block scales) at a context length.
    """
    kv_bytes_per_token: Callable[[Any, int, int], int]
    cached_tokens: Callable[[Any, int, Any], Any]
    flops_per_key: Callable[[Any, int], int]
    flops_per_query: Callable[[Any, int, Any], Any] | None = None
    native_kv_bytes: Callable[[Any, int, int], int] | None = None

    def query_flops(self, cfg, i: int, context):
        if self.flops_per_query is not None:
            return self.flops_per_query(cfg, i, context)
        return self.flops_per_key(cfg, i) * self.cached_tokens(cfg, i, context)


@dataclasses.dataclass(frozen=True)
class AttentionKind:
    """One attention kind: `build(cfg, i, kind, rngs)` makes layer i's module, `check(cfg, i, kind)` fails
    naming the first bad option of layer i, `accounting` counts its cache and FLOPs, and
    `cache(cfg, i, kind, batch, max_len, dtype)` describes what layer i stores for decoding (a pytree of
    jax.ShapeDtypeStruct; the module's own `cache_spec`, read from a shape-only build)."""
    build: Callable[[Any, int, str, nnx.Rngs], nnx.Module]
    check: Callable[[Any, int, str], None]
    accounting: Accounting
    cache: Callable[..., Any] = None

    def __post_init__(self):
        if self.cache is None:
            object.__setattr__(self, "cache", self._module_cache)

    def _module_cache(self, cfg, i: int, kind: str, batch: int, max_len: int, dtype) -> Any:
        module = nnx.eval_shape(lambda: self.build(cfg, i, kind, params.SeededRngs()))
        return module.cache_spec(batch, max_len, dtype)


# ---- grouped-query attention (full, sliding, KV-shared) -------------------------------------------

def _gqa_kv_bytes(cfg, i: int, itemsize: int) -> int:
    """K and V, each kv heads x head dim; a `k_eq_v` layer caches only its raw key projection (V is that
    projection after v_norm, K after k_norm and RoPE: both follow on read)."""
    tensors = 1 if option(cfg, "k_eq_v", i) else 2
    return tensors * option(cfg, "num_kv_heads", i) * option(cfg, "head_dims", i) * itemsize


def _windowed_tokens(cfg, i: int, context):
    """The last `window` tokens (window 0: all of them)."""
    window = option(cfg, "windows", i)
    return np.minimum(context, window) if window else context


def _gqa_flops_per_key(cfg, i: int) -> int:
    """q.k and p.v for every query head: 2 multiply-adds of head-dim length, 2 FLOPs each."""
    return 4 * option(cfg, "num_heads", i) * option(cfg, "head_dims", i)


GQA = Accounting(_gqa_kv_bytes, _windowed_tokens, _gqa_flops_per_key)


def _gqa_cache(cfg, i: int, kind: str, batch: int, max_len: int, dtype) -> dict:
    """Keys and values of every position (full), a ring of the window (sliding), nothing (KV-shared: the
    layer reads what its source attended over, so its window may not reach further than the source's).
    A `k_eq_v` layer stores one tensor, its raw key projection (`kv_BSKH`): keys and values follow from it
    on read (Attention.keys_values), so its cache is half the size."""
    src = option(cfg, "kv_sources", i)
    if src >= 0:
        own, theirs = (option(cfg, "windows", j) if cfg.attention_types[j] == "sliding" else 0 for j in (i, src))
        if theirs and not 0 < own <= theirs:
            raise ValueError(f"layer {i} shares the k/v of layer {src}, whose cache keeps a {theirs}-token window, "
                             f"but attends over {'every token' if not own else f'{own} tokens'}")
        return {}
    window = option(cfg, "windows", i) if kind == "sliding" else 0
    kv = jax.ShapeDtypeStruct((batch, window or max_len, option(cfg, "num_kv_heads", i), option(cfg, "head_dims", i)),
                              dtype)
    return {"kv_BSKH": kv} if option(cfg, "k_eq_v", i) else {"k_BSKH": kv, "v_BSKH": kv}


def _heads_check(cfg, i: int) -> None:
    n, k = option(cfg, "num_heads", i), option(cfg, "num_kv_heads", i)
    if n % k:
        raise ValueError(f"layer {i}: num_heads={n} is not divisible by num_kv_heads={k}")


def _gqa_check(cfg, i: int, kind: str) -> None:
    _heads_check(cfg, i)
    if kind == "sliding" and option(cfg, "windows", i) <= 0:
        raise ValueError(f"layer {i} is a sliding layer but model.windows[{i}] = {option(cfg, 'windows', i)}")
    if option(cfg, "gating", i) not in OUTPUT_GATES:
        raise ValueError(f"layer {i}: model.gating = {option(cfg, 'gating', i)!r}; expected one of {OUTPUT_GATES}")
    src = option(cfg, "kv_sources", i)
    if src < 0:
        return
    if not 0 <= src < i or option(cfg, "kv_sources", src) >= 0:
        raise ValueError(f"layer {i}: kv_sources must name an earlier layer with its own k/v, got {src}")
    if cfg.attention_types[src] not in ("full", "sliding"):
        raise ValueError(f"layer {i} shares k/v of layer {src}, a {cfg.attention_types[src]!r} layer; only "
                         "grouped-query layers (full, sliding) hand on their keys and values")
    if ((option(cfg, "head_dims", src), option(cfg, "num_kv_heads", src))
            != (option(cfg, "head_dims", i), option(cfg, "num_kv_heads", i))):
        raise ValueError(f"layer {i} shares k/v of layer {src} but their head dims or kv heads differ")


def _gqa_build(cfg, i: int, kind: str, rngs: nnx.Rngs) -> Attention:
    read_later = any(option(cfg, "kv_sources", j) == i for j in range(i + 1, cfg.num_layers))
    return Attention(
        cfg.d_model, option(cfg, "num_heads", i), option(cfg, "num_kv_heads", i), option(cfg, "head_dims", i),
        rope=_rope(cfg, kind), window=option(cfg, "windows", i) if kind == "sliding" else 0,
        qk_norm=option(cfg, "qk_norm", i), v_norm=option(cfg, "v_norm", i), norm_eps=option(cfg, "norm_eps", i),
        scale=option(cfg, "attn_scale", i), k_eq_v=option(cfg, "k_eq_v", i),
        kv_source=option(cfg, "kv_sources", i), layer=i, publish_kv=read_later,
        sinks=option(cfg, "attention_sinks", i), output_gate=option(cfg, "gating", i),
        impl=option(cfg, "attention_impl", i), rngs=rngs)


# ---- compressed convolutional attention -------------------------------------------------------------

def _cca_check(cfg, i: int, kind: str) -> None:
    _heads_check(cfg, i)
    if (option(cfg, "num_kv_heads", i) * option(cfg, "head_dims", i)) % 2:
        raise ValueError(f"layer {i}: num_kv_heads * head_dim must be even (the value shift halves it)")
    if kind == "cca_sliding" and option(cfg, "windows", i) <= 0:
        raise ValueError(f"layer {i} is cca_sliding but model.windows[{i}] = {option(cfg, 'windows', i)}")
    sizes = tuple(option(cfg, "conv_kernel_sizes", i))
    if len(sizes) != 2 or min(sizes) < 1:
        raise ValueError(f"model.conv_kernel_sizes must be two widths >= 1, got {sizes}")


def _cca_build(cfg, i: int, kind: str, rngs: nnx.Rngs) -> CCA:
    return CCA(cfg.d_model, option(cfg, "num_heads", i), option(cfg, "num_kv_heads", i), option(cfg, "head_dims", i),
               rope=_rope(cfg, kind), window=option(cfg, "windows", i) if kind == "cca_sliding" else 0,
               kernel_sizes=tuple(option(cfg, "conv_kernel_sizes", i)), impl=option(cfg, "attention_impl", i),
               layer=i, rngs=rngs)


# CCA caches K and V after the convolutions, norm and RoPE: kv heads x head dim each, as grouped-query
# attention does (the small per-sequence convolution state is not counted).
CCA_ACCOUNTING = GQA


# ---- one K=V vector per token: window (swa), + all compressed entries (hca), + top-k entries (csa) -----
# A layer caches its last `window` raw tokens and one K=V entry (head_dim values) per compressed entry; a
# CSA layer also one index key (index_dim values) per entry. In the released cache precision an entry is
# fp8 (no-RoPE part, with 8 bytes of block scales) plus the bf16 RoPE part: 448 + 8 + 128 = 584 B at
# head_dim 512; an index key is fp4 with one byte of scale per 32 values: 64 + 4 = 68 B.

def _ratio(cfg, i: int, kind: str) -> int:
    """The compression ratio of a swa (none), csa or hca layer."""
    return 0 if kind == "swa" else option(cfg, f"{kind}_ratio", i)


def _compressed_check(cfg, i: int, kind: str) -> None:
    heads, groups, dim = option(cfg, "num_heads", i), option(cfg, "out_groups", i), option(cfg, "head_dim", i)
    rope_dim = option(cfg, "rope_dim", i)
    if heads % groups:
        raise ValueError(f"layer {i}: model.num_heads={heads} is not divisible by model.out_groups={groups}")
    index_dim = option(cfg, "index_dim", i, 0)
    if rope_dim % 2 or not 0 < rope_dim <= min(dim, index_dim or dim):
        raise ValueError(f"model.rope_dim={rope_dim} must be even and fit the head dim {dim} and the index dim "
                         f"{index_dim}")
    if kind == "csa" and not (option(cfg, "index_heads", i, 0) > 0 and index_dim > 0
                              and option(cfg, "index_top_k", i, 0) > 0):
        raise ValueError("CSA layers need model.index_heads, model.index_dim and model.index_top_k > 0")


def _compressed_build(cfg, i: int, kind: str, rngs: nnx.Rngs) -> CompressedAttention:
    return CompressedAttention(
        cfg.d_model, option(cfg, "num_heads", i), option(cfg, "head_dim", i), q_rank=option(cfg, "q_rank", i),
        out_groups=option(cfg, "out_groups", i), out_rank=option(cfg, "out_rank", i),
        window=option(cfg, "window", i), rope=_rope(cfg, kind), rope_dim=option(cfg, "rope_dim", i),
        compress_ratio=_ratio(cfg, i, kind), overlap=kind == "csa", index_heads=option(cfg, "index_heads", i, 0),
        index_dim=option(cfg, "index_dim", i, 0),
        index_top_k=option(cfg, "index_top_k", i, 0) if kind == "csa" else 0, eps=option(cfg, "norm_eps", i),
        impl=option(cfg, "attention_impl", i), csa_dkv=option(cfg, "csa_dkv", i),
        fused_topk=option(cfg, "indexer_fused_topk", i), layer=i, rngs=rngs)


def _entry_bytes(cfg, i: int, itemsize: int) -> int:
    return option(cfg, "head_dim", i) * itemsize


def native_entry_bytes(cfg, i: int) -> int:
    """A K=V entry in the released cache precision (fp8 no-RoPE part + 8 B of block scales, bf16 RoPE part)."""
    return (option(cfg, "head_dim", i) - option(cfg, "rope_dim", i)) + 8 + 2 * option(cfg, "rope_dim", i)


def native_index_key_bytes(cfg, i: int) -> int:
    """An index key in the released precision (fp4, one byte of scale per 32 values)."""
    return option(cfg, "index_dim", i) // 2 + option(cfg, "index_dim", i) // 32


def _window(cfg, i: int, context):
    return np.minimum(context, option(cfg, "window", i))


def _hca_entries(cfg, i: int, context):
    """Window tokens plus every compressed entry; all of them are keys of the query at `context`."""
    return _window(cfg, i, context) + np.asarray(context) // option(cfg, "hca_ratio", i)


def _csa_cached(cfg, i: int, context):
    """Window tokens, compressed entries and their index keys, in units of one head_dim entry (exact KV
    bytes in any one dtype)."""
    compressed = np.asarray(context) // option(cfg, "csa_ratio", i)
    return (_window(cfg, i, context) + compressed
            + compressed * option(cfg, "index_dim", i) // option(cfg, "head_dim", i))


def _kv_flops_per_key(cfg, i: int) -> int:
    """q.k and p.v over every head, K = V: 4 * heads * head_dim."""
    return 4 * option(cfg, "num_heads", i) * option(cfg, "head_dim", i)


def _csa_query_flops(cfg, i: int, context):
    """Attention over the window and the top-k selected entries, plus the indexer scoring every visible
    entry (q_I.k_I over index heads: 2 * index_heads * index_dim each)."""
    entries = np.asarray(context) // option(cfg, "csa_ratio", i)
    keys = _window(cfg, i, context) + np.minimum(entries, option(cfg, "index_top_k", i))
    return _kv_flops_per_key(cfg, i) * keys + 2 * option(cfg, "index_heads", i) * option(cfg, "index_dim", i) * entries


def _native_bytes(kind: str):
    def native(cfg, i: int, context: int) -> int:
        ratio = _ratio(cfg, i, kind)
        entries = context // ratio if ratio else 0
        index = native_index_key_bytes(cfg, i) if kind == "csa" else 0
        entry = native_entry_bytes(cfg, i)
        return int(_window(cfg, i, context)) * entry + entries * (entry + index)
    return native


# ---- memory sparse attention --------------------------------------------------------------------------
# Without a memory an MSA layer caches and attends like a full layer; the memory's pooled chunks are
# counted by zoo.memory (router keys on the device, content on the host), not as per-token cache.

def msa_query_offset(cfg, i: int) -> int:
    """Where layer i's query positions start: after every memory document's local positions."""
    offset = option(cfg, "msa_query_offset", i)
    return option(cfg, "msa_max_doc_len", i) if offset is None else offset


def _msa_check(cfg, i: int, kind: str) -> None:
    _heads_check(cfg, i)
    if option(cfg, "msa_head_reduce", i) not in HEAD_REDUCTIONS:
        raise ValueError(f"layer {i}: model.msa_head_reduce = {option(cfg, 'msa_head_reduce', i)!r}; expected one "
                         f"of {HEAD_REDUCTIONS}")
    for key in ("msa_chunk_size", "msa_top_k", "msa_max_doc_len"):
        if option(cfg, key, i) < 1:
            raise ValueError(f"layer {i}: model.{key} must be at least 1, got {option(cfg, key, i)}")
    if msa_query_offset(cfg, i) < 0:
        raise ValueError(f"layer {i}: model.msa_query_offset must be >= 0, got {msa_query_offset(cfg, i)}")


def _msa_build(cfg, i: int, kind: str, rngs: nnx.Rngs) -> MemorySparseAttention:
    return MemorySparseAttention(
        cfg.d_model, option(cfg, "num_heads", i), option(cfg, "num_kv_heads", i), option(cfg, "head_dims", i),
        rope=_rope(cfg, kind), chunk_size=option(cfg, "msa_chunk_size", i), top_k=option(cfg, "msa_top_k", i),
        head_reduce=option(cfg, "msa_head_reduce", i), query_offset=msa_query_offset(cfg, i),
        qk_norm=option(cfg, "qk_norm", i), norm_eps=option(cfg, "norm_eps", i), scale=option(cfg, "attn_scale", i),
        impl=option(cfg, "attention_impl", i), layer=i, rngs=rngs)


ATTENTION_KINDS: dict[str, AttentionKind] = {
    "full": AttentionKind(_gqa_build, _gqa_check, GQA, _gqa_cache),
    "sliding": AttentionKind(_gqa_build, _gqa_check, GQA, _gqa_cache),
    "cca": AttentionKind(_cca_build, _cca_check, CCA_ACCOUNTING),
    "cca_sliding": AttentionKind(_cca_build, _cca_check, CCA_ACCOUNTING),
    "swa": AttentionKind(_compressed_build, _compressed_check, Accounting(
        _entry_bytes, _window, _kv_flops_per_key, native_kv_bytes=_native_bytes("swa"))),
    "hca": AttentionKind(_compressed_build, _compressed_check, Accounting(
        _entry_bytes, _hca_entries, _kv_flops_per_key, native_kv_bytes=_native_bytes("hca"))),
    "csa": AttentionKind(_compressed_build, _compressed_check, Accounting(
        _entry_bytes, _csa_cached, _kv_flops_per_key, flops_per_query=_csa_query_flops,
        native_kv_bytes=_native_bytes("csa"))),
    "msa": AttentionKind(_msa_build, _msa_check, GQA),
}


def attention_kind(name: str) -> AttentionKind:
    try:
        return ATTENTION_KINDS[name]
    except KeyError:
        raise ValueError(f"unknown attention kind {name!r}; known kinds: {sorted(ATTENTION_KINDS)}") from None


def attention_cache(cfg, i: int, batch: int, max_len: int, dtype, *, kind: str | None = None) -> Any:
    """Layer i's decoding cache as a pytree of jax.ShapeDtypeStruct (`{}`: it stores nothing)."""
    kind = kind or cfg.attention_types[i]
    return attention_kind(kind).cache(cfg, i, kind, batch, max_len, dtype)


def build_attention(cfg, i: int, rngs: nnx.Rngs, *, kind: str | None = None) -> nnx.Module:
    """Layer i's token mixer, of kind `kind` (default: `model.attention_types[i]`)."""
    kind = kind or cfg.attention_types[i]
    return attention_kind(kind).build(cfg, i, kind, rngs)


# ---- channel mixers -----------------------------------------------------------------------------------

def build_mlp(cfg, i: int, rngs: nnx.Rngs, *, moe: bool | None = None, router: str | None = None
              ) -> nnx.Module:
    """Layer i's channel mixer: a dense gated MLP, or (`moe_layers[i]`, or `moe=True`) a mixture of
    experts behind the router kind `router` (default: `model.router`). Either has `mix(x_BTD, ctx)`."""
    moe = option(cfg, "moe_layers", i) if moe is None else moe
    act = option(cfg, "activation", i)
    if not moe:
        width = option(cfg, "mlp_dims", i) if "mlp_dims" in cfg else option(cfg, "mlp_dim", i)
        return GatedMLP(cfg.d_model, width, activation=act, rngs=rngs)
    router = router or option(cfg, "router", i)
    eps = option(cfg, "norm_eps", i)
    if router == "mlp_skip":
        return SkipMoE(cfg.d_model, cfg.num_experts, cfg.expert_dim, option(cfg, "router_dim", i),
                       accumulate=i > 0, skip_output=option(cfg, "skip_output", i), activation=act,
                       router_activation=option(cfg, "router_activation", i),
                       matmul=option(cfg, "experts_matmul", i), eps=eps, rngs=rngs)
    limit = option(cfg, "swiglu_limit", i)
    return MoE(cfg.d_model, cfg.num_experts, cfg.top_k, cfg.expert_dim, router=router, activation=act,
               limit=limit, shared_expert_dim=option(cfg, "shared_expert_dim", i),
               shared_limit=limit if option(cfg, "shared_expert_clamp", i) else 0.0,
               routed_scale=option(cfg, "routed_scale", i), softcap=option(cfg, "router_softcap", i),
               input_norm=option(cfg, "router_input_norm", i),
               hash_vocab=cfg.vocab_size if router == "hash" else 0, matmul=option(cfg, "experts_matmul", i),
               eps=eps, rngs=rngs)


def _check_mlp(cfg, i: int) -> None:
    if not option(cfg, "moe_layers", i):
        width = option(cfg, "mlp_dims", i) if "mlp_dims" in cfg else option(cfg, "mlp_dim", i)
        if width <= 0:
            raise ValueError(f"layer {i}: a dense MLP needs model.mlp_dim(s) > 0, got {width}")
        return
    router = option(cfg, "router", i)
    if router not in (*ROUTERS, "mlp_skip"):
        raise ValueError(f"layer {i}: unknown model.router {router!r}; expected one of {(*ROUTERS, 'mlp_skip')}")
    top_k = 1 if router == "mlp_skip" else cfg.get("top_k", 0)
    if not (0 < top_k <= cfg.get("num_experts", 0) and cfg.get("expert_dim", 0) > 0):
        raise ValueError("MoE layers need 0 < model.top_k <= model.num_experts and model.expert_dim > 0")
    if router == "mlp_skip":
        if cfg.get("top_k", 1) != 1:
            raise ValueError(f"the MLP router picks one expert per token; model.top_k = {cfg.top_k}")
        if option(cfg, "router_dim", i) <= 0:
            raise ValueError("model.num_experts, model.expert_dim and model.router_dim must be positive")
        if option(cfg, "skip_output", i) not in SKIP_OUTPUTS:
            raise ValueError(f"model.skip_output = {option(cfg, 'skip_output', i)!r}; expected one of {SKIP_OUTPUTS}")
        activations.get(option(cfg, "router_activation", i))


def check_layers(cfg, per_layer_keys=()) -> None:
    """Fails with a message naming the first inconsistency of the per-layer config: each tuple in
    `per_layer_keys` has one entry per layer, each layer's kinds exist and their options are valid."""
    L = cfg.num_layers
    for key in per_layer_keys:
        if len(cfg[key]) != L:
            raise ValueError(f"model.{key} has {len(cfg[key])} entries but model.num_layers is {L}")
    if option(cfg, "attention_impl", 0) not in IMPLS:
        raise ValueError(f"unknown model.attention_impl {cfg.attention_impl!r}; expected one of {IMPLS}")
    activations.get(option(cfg, "activation", 0))
    for i, kind in enumerate(cfg.attention_types):
        if kind not in ATTENTION_KINDS:
            raise ValueError(f"model.attention_types[{i}] = {kind!r}: unknown layer kind; expected one of "
                             f"{tuple(sorted(ATTENTION_KINDS))}")
        _rope(cfg, kind)
        ATTENTION_KINDS[kind].check(cfg, i, kind)
        _check_mlp(cfg, i)
        for key, allowed in (("experts_matmul", GROUPED_MATMUL_IMPLS), ("csa_dkv", CSA_DKV)):
            if option(cfg, key, i) not in allowed:
                raise ValueError(f"layer {i}: unknown model.{key} {option(cfg, key, i)!r}; expected one of "
                                 f"{allowed}")
