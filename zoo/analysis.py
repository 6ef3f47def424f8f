"""Parameter, KV-cache and FLOP accounting for any model config the zoo builds.

    python -m zoo.analysis --config=configs/gemma4.py:e2b [--context=131072] [--dtype=bfloat16] [--batch=1]
    report(get_config("e2b"), context=131_072)   # -> dict of exact integers

Parameters are counted from the shape-only model (`zoo.build_abstract`), so the figures follow the code,
not a formula. KV-cache and attention figures come from each attention kind's accounting in the layer
registry (`layers.kinds.ATTENTION_KINDS`; `ATTENTION_KINDS` here is that accounting by kind name, and
`register_attention_kind` adds one for a kind built elsewhere), and nothing here names a family.

Units: the table prints decimal units (GB = 1e9 bytes, B = 1e9 parameters), as docs/families/gemma4.md
does: its "E2B 5.64 GB" is 5,637,144,576 bytes (5.25 GiB).
"""
from __future__ import annotations

import math
import re
import sys
from typing import Any

import jax.numpy as jnp
import numpy as np
from absl import app, flags
from flax import nnx
from ml_collections import config_flags

from layers import kinds
from zoo import families, inference
from zoo.decoder import DecoderOptions
from zoo.models import build_abstract

# Where the decoder keeps its lookup tables and untied head (zoo/decoder.py, layers/embeddings.py), as
# paths in `nnx.state(model, nnx.Param)`, and the module name of routed experts (layers/moe.py), whose
# weights have the expert index as their leading dimension.
TOKEN_TABLE = ("embed", "table")
PER_LAYER_TABLE = ("per_layer_embed", "token_table")
LM_HEAD = ("lm_head",)
EXPERTS = "experts"


AttentionKind = kinds.Accounting   # how the layers of one attention kind cache and attend
GQA = kinds.GQA
ATTENTION_KINDS: dict[str, AttentionKind] = {name: kind.accounting for name, kind in kinds.ATTENTION_KINDS.items()}


def register_attention_kind(name: str, kind: AttentionKind) -> None:
    """Makes layers whose `model.attention_types` entry is `name` countable (a kind registered outside
    layers.kinds, e.g. while prototyping)."""
    if not isinstance(kind, AttentionKind):
        raise TypeError(f"attention kind {name!r} must be an AttentionKind, got {type(kind).__name__}")
    if name in ATTENTION_KINDS and ATTENTION_KINDS[name] is not kind:
        raise ValueError(f"attention kind {name!r} is already registered")
    ATTENTION_KINDS[name] = kind


def _attention_kind(name: str) -> AttentionKind:
    try:
        return ATTENTION_KINDS[name]
    except KeyError:
        raise ValueError(f"no KV/FLOP accounting for attention kind {name!r}; known kinds: "
                         f"{sorted(ATTENTION_KINDS)} (add one with zoo.analysis.register_attention_kind)") from None


def _model_config(config):
    """The model config, given either the full config (with `.model`) or the model config itself."""
    model = config.get("model", config) if hasattr(config, "get") else None
    if model is None or not hasattr(model, "get") or "attention_types" not in model:
        raise ValueError("expected a config with a `.model` entry or a model config (with attention_types), "
                         f"got {type(config).__name__}")
    return model


def _positive_int(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def _dtype(dtype) -> np.dtype:
    try:
        return jnp.dtype(dtype)
    except TypeError:
        raise ValueError(f"unknown dtype {dtype!r}; expected e.g. 'bfloat16', 'float16', 'float32'") from None


def count_params(model_cfg) -> dict[str, int]:
    """Exact parameter counts of the model config by role (see `report` for the definitions), plus
    `params_matmul_active`: the active parameters that multiply activations (rank >= 2, lookup-only
    tables left out; a tied token table counts as the output head)."""
    cfg = _model_config(model_cfg)
    lookup_only = {PER_LAYER_TABLE} | (set() if DecoderOptions.from_config(cfg).tie_embeddings else {TOKEN_TABLE})
    counts = dict.fromkeys(("total", "embedding", "per_layer", "inactive", "matmul_active"), 0)
    for path, var in nnx.to_flat_state(nnx.state(build_abstract(cfg), nnx.Param)):
        shape = var.get_value().shape
        size = math.prod(shape)
        counts["total"] += size
        if path in (TOKEN_TABLE, PER_LAYER_TABLE, LM_HEAD):
            counts["embedding"] += size
        if path == PER_LAYER_TABLE:
            counts["per_layer"] += size
        inactive = 0
        if EXPERTS in path[:-1]:
            if shape[0] != cfg.num_experts:
                raise ValueError(f"expert weight {path} has leading dim {shape[0]}, "
                                 f"expected model.num_experts={cfg.num_experts}")
            inactive = size // cfg.num_experts * (cfg.num_experts - cfg.top_k)
        counts["inactive"] += inactive
        if len(shape) >= 2 and path not in lookup_only:
            counts["matmul_active"] += size - inactive
    return {
        "params_total": counts["total"],
        "params_embedding": counts["embedding"],
        "params_non_embedding": counts["total"] - counts["embedding"],
        "params_per_layer_embedding": counts["per_layer"],
        "params_effective": counts["total"] - counts["per_layer"],
        "params_active": counts["total"] - counts["inactive"],
        "params_matmul_active": counts["matmul_active"],
    }


def kv_cache(model_cfg, context: int, dtype="bfloat16", batch: int = 1) -> dict[str, Any]:
    """KV-cache bytes at `context` tokens: as the decoder allocates it (only layers with their own k/v,
    `kv_sources[i] == -1`; each kind keeps its `cached_tokens`), with every allocating layer keeping the
    whole context, and both again as if every layer had its own k/v; `kv_cache_bytes_native` (only for
    kinds that define a native cache precision) the decoder's cache in that precision.
    `kv_cache_bytes_measured` (see `measured_cache`) sums what the decoder actually allocates, for
    configs whose kinds are all in the layer registry. `kv_cache_bytes_mha_equivalent` is the
    multi-head baseline at the same width: every layer caching full-width K and V (2 x d_model values per
    token) for the whole context. Also the bytes one token costs one layer, by attention type (an int, or
    the distinct values if layers of a type differ)."""
    cfg = _model_config(model_cfg)
    context, batch = _positive_int(context, "context"), _positive_int(batch, "batch")
    itemsize = _dtype(dtype).itemsize
    totals = dict.fromkeys(("kv_cache_bytes", "kv_cache_bytes_full_length", "kv_cache_bytes_no_sharing",
                            "kv_cache_bytes_full_length_no_sharing"), 0)
    kv_sources = cfg.get("kv_sources") or (-1,) * cfg.num_layers
    native, has_native = 0, False
    by_type: dict[str, set[int]] = {}
    for i, name in enumerate(cfg.attention_types):
        kind = _attention_kind(name)
        per_token = kind.kv_bytes_per_token(cfg, i, itemsize)
        by_type.setdefault(name, set()).add(per_token)
        kept, full = batch * per_token * int(kind.cached_tokens(cfg, i, context)), batch * per_token * context
        totals["kv_cache_bytes_no_sharing"] += kept
        totals["kv_cache_bytes_full_length_no_sharing"] += full
        if kv_sources[i] < 0:
            totals["kv_cache_bytes"] += kept
            totals["kv_cache_bytes_full_length"] += full
            if kind.native_kv_bytes is not None:
                has_native = True
                native += batch * int(kind.native_kv_bytes(cfg, i, context))
            else:
                native += kept
    if has_native:
        totals["kv_cache_bytes_native"] = native
    if all(name in kinds.ATTENTION_KINDS for name in cfg.attention_types):   # else: accounting-only kinds
        totals.update(measured_cache(cfg, context, dtype, batch))
    totals["kv_cache_bytes_mha_equivalent"] = batch * cfg.num_layers * 2 * cfg.d_model * itemsize * context
    totals["kv_bytes_per_token_by_type"] = {
        name: next(iter(values)) if len(values) == 1 else tuple(sorted(values)) for name, values in by_type.items()}
    return totals


def measured_cache(model_cfg, context: int, dtype="bfloat16", batch: int = 1) -> dict[str, int]:
    """The cache the decoder allocates for `batch` sequences of `context` tokens (zoo.inference.cache_spec,
    shapes only): `kv_cache_bytes_measured`, all of it; `kv_cache_bytes_measured_state`, the part that is
    not keys, values or compressed entries (row lengths, compressors' pending windows in float32, CCA's
    convolution inputs), so that measured - state is the arithmetic `kv_cache_bytes` (at contexts of at
    least every window: a sliding layer always allocates its whole ring)."""
    parts = inference.cache_bytes_by_part(inference.cache_spec(model_cfg, batch_size=batch, max_len=context,
                                                               dtype=_dtype(dtype)))
    return {"kv_cache_bytes_measured": parts["kv"] + parts["state"], "kv_cache_bytes_measured_state": parts["state"]}


def attention_flops(model_cfg, context: int) -> dict[str, float]:
    """Forward attention FLOPs (q.k and p.v; softmax and masking not counted) of every layer, kv-shared ones
    included: for the token at position `context` (a decode step with a full cache), and the mean over the
    positions 1..context of one causal sequence (what a training step of that length pays per token)."""
    cfg = _model_config(model_cfg)
    context = _positive_int(context, "context")
    positions = np.arange(1, context + 1, dtype=np.int64)
    last = total = 0
    for i, name in enumerate(cfg.attention_types):
        kind = _attention_kind(name)
        last += int(kind.query_flops(cfg, i, context))
        total += int(np.broadcast_to(kind.query_flops(cfg, i, positions), positions.shape).sum())
    return {"last": last, "mean": total / context}


def report(config, context: int | None = None, dtype="bfloat16", batch: int = 1) -> dict[str, Any]:
    """Parameter, KV-cache and FLOP figures of a config (the full config or its `.model`).

    context: tokens in the cache / sequence length (default: `model.max_positions`); dtype: the KV-cache
    dtype; batch: sequences in the cache (scales the KV bytes only).

    params_embedding: the token table, the per-layer token table and an untied lm_head (the per-layer
        context projection is a matmul on the hidden state, so it counts as non-embedding).
    params_per_layer_embedding: the per-layer token table alone; params_effective: everything else
        (Gemma's "effective" size).
    params_active: per token, the total less the weights of the experts a token does not select,
        (num_experts - top_k) x per-expert weights per MoE layer; routers count as active.
    kv_cache_bytes*: see `kv_cache`.
    flops_per_token: forward FLOPs of the token at position `context` = flops_per_token_matmul (2 x the
        active parameters that multiply activations: no lookups, norms or scalars; the tied head included)
        + flops_per_token_attention. flops_per_token_seq_mean: the same averaged over a causal sequence of
        `context` tokens (times 3 for forward + backward when computing training MFU).
    """
    cfg = _model_config(config)
    if context is None:
        if "max_positions" not in cfg:
            raise ValueError("pass context=...: the model config has no max_positions to default to")
        context = cfg.max_positions
    context, batch = _positive_int(context, "context"), _positive_int(batch, "batch")
    out: dict[str, Any] = {"family": cfg.family, "num_layers": cfg.num_layers, "context": context,
                           "dtype": _dtype(dtype).name, "batch": batch}
    params = count_params(cfg)
    matmul = 2 * params.pop("params_matmul_active")
    out.update(params)
    out.update(kv_cache(cfg, context, dtype, batch))
    attention = attention_flops(cfg, context)
    out["flops_per_token_matmul"] = matmul
    out["flops_per_token_attention"] = attention["last"]
    out["flops_per_token"] = matmul + attention["last"]
    out["flops_per_token_seq_mean"] = matmul + attention["mean"]
    extras = families.get(cfg.family).report_extras
    if extras is not None:
        out.update(extras(cfg, context, dtype))
    return out


_UNITS = {"params": ("", "K", "M", "B", "T"), "kv": ("B", "KB", "MB", "GB", "TB"),
          "flops": ("FLOP", "KFLOP", "MFLOP", "GFLOP", "TFLOP")}


def _human(value: float, units: tuple[str, ...]) -> str:
    """In decimal units; values below 10,000 as they are."""
    if abs(value) < 1e4:
        return f"{value:,.0f} {units[0]}".rstrip()
    power = min(int(math.log10(abs(value)) // 3), len(units) - 1)
    return f"{value / 1000 ** power:.2f} {units[power]}"


def format_table(rep: dict[str, Any]) -> str:
    """`report`'s dict as an aligned table: name, value in decimal units, exact value."""
    header = ("  ".join(f"{k}={rep[k]:,}" if isinstance(rep[k], int) else f"{k}={rep[k]}"
                        for k in ("family", "num_layers", "context", "dtype", "batch"))
              + "   (decimal units: B = 1e9 params, GB = 1e9 bytes)")
    rows = []
    for key, value in rep.items():
        units = _UNITS.get(key.split("_")[0])
        if units is None:
            continue
        items = value.items() if isinstance(value, dict) else [(None, value)]
        for sub, v in items:
            name = key if sub is None else f"{key}[{sub}]"
            if isinstance(v, tuple):
                rows.append((name, "varies", ", ".join(f"{x:,}" for x in v)))
            else:
                rows.append((name, _human(v, units), f"{v:,.0f}" if isinstance(v, float) else f"{v:,}"))
    widths = [max(len(r[c]) for r in rows) for c in range(3)]
    lines = [header, ""] + [f"{a:<{widths[0]}}  {b:>{widths[1]}}  {c:>{widths[2]}}" for a, b, c in rows]
    return "\n".join(lines)


def _cli() -> None:
    """`python -m zoo.analysis --config=FILE:PRESET [--context=N] [--dtype=D] [--batch=N]`: prints the
    table; a bad preset, key or value ends with one line on stderr naming it."""
    def fail(error) -> None:
        text = str(error.args[0]) if isinstance(error, KeyError) and error.args else str(error)
        lines = [line.strip() for line in text.splitlines() if line.strip()]
        message = lines[-1] if lines else type(error).__name__
        if isinstance(error, (KeyError, AttributeError)):   # an unknown override key, named by its last part
            guess = re.search(r'Did you mean "(\w+)" instead of "(\w+)"', text)
            key = guess.group(2) if guess else re.search(r"(\w+)", text).group(1)
            override = [a for a in sys.argv[1:] if a.startswith("--config.") and key in a.split("=", 1)[0]]
            message = (f"unknown config key {key!r}" + (f" in {override[0]}" if override else "")
                       + (f" (did you mean {guess.group(1)!r}?)" if guess else ""))
        elif message.startswith(("ValueError: ", "KeyError: ", "FileNotFoundError: ")):
            message = message.split(": ", 1)[1]
        print(f"error: {message}", file=sys.stderr)
        sys.exit(1)

    config = config_flags.DEFINE_config_file("config", None, "Config file and preset, e.g. configs/gemma4.py:e2b.")
    context = flags.DEFINE_integer("context", None, "Context length in tokens (default: model.max_positions).")
    dtype = flags.DEFINE_string("dtype", "bfloat16", "KV-cache dtype.")
    batch = flags.DEFINE_integer("batch", 1, "Sequences held in the KV cache.")

    def parse(argv):
        try:
            return flags.FLAGS(argv)
        except Exception as e:  # noqa: BLE001 - config files and overrides fail in many ways
            fail(e)

    def main(argv):
        if len(argv) > 1:
            fail(f"unexpected arguments: {argv[1:]}")
        try:
            if config.value is None:
                fail("--config is required, e.g. --config=configs/gemma4.py:e2b")
            for name, flag in (("--context", context), ("--batch", batch)):
                if flag.value is not None and flag.value < 1:
                    fail(f"{name} must be at least 1, got {flag.value}")
            print(format_table(report(config.value, context=context.value, dtype=dtype.value, batch=batch.value)))
        except KeyboardInterrupt:
            print("error: interrupted", file=sys.stderr)
            sys.exit(130)
        except Exception as e:  # noqa: BLE001 - a bad preset or value surfaces when the config is read
            fail(e)

    app.run(main, flags_parser=parse)


if __name__ == "__main__":
    _cli()
