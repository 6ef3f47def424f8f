"""Plumbing shared by the compressed/sparse attention kernels: choosing a lowering, checking inputs,
padding, the per-token window start, and the sink softmax of the pure-JAX references.

Shapes: B batch, T tokens, H query heads, D head dim, S compressed entries, K top-k slots, W window.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from jax.experimental.pallas import tpu as pltpu

IMPLS = ("xla", "pallas_gpu", "pallas_tpu", "auto")
FLOAT_DTYPES = (jnp.float32, jnp.bfloat16)


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Tile sizes of the window + compressed attention kernels (tune per chip).

    block_h, block_k: forward; heads per GPU program (the rows of its [block_h, D] x [D, block_k] tiles;
      the TPU always takes all heads) and keys per step (window blocks, compressed blocks/top-k chunks).
    block_h_dq, block_k_dq: the same for the dQ kernel (GPU). CSA's gathered rows get one atomic add per
      head block, so the largest block_h_dq that fits in shared memory is best (32 at D=512 on H100).
    block_kv_bwd, block_rows_bwd: keys per program and (token, head) rows per step of the key-major dK=dV
      kernel.
    num_warps, num_stages / num_warps_bwd, num_stages_bwd: Triton launch parameters (GPU only) of the
      forward / backward kernels.
    """
    block_h: int = 64
    block_k: int = 64
    block_h_dq: int = 32
    block_k_dq: int = 32
    block_kv_bwd: int = 32
    block_rows_bwd: int = 64
    num_warps: int = 8
    num_stages: int = 2
    num_warps_bwd: int = 4
    num_stages_bwd: int = 2

    def __post_init__(self):
        for field in ("block_h", "block_k", "block_h_dq", "block_k_dq", "block_kv_bwd", "block_rows_bwd"):
            value = getattr(self, field)
            if value < 8 or value & (value - 1):
                raise ValueError(f"BlockSizes.{field}={value} must be a power of two >= 8")


@dataclasses.dataclass(frozen=True)
class Lowering:
    """Which kernel runs and how: impl in ("xla", "pallas_gpu", "pallas_tpu") and the `interpret`
    argument handed to pallas_call (False, True, or a pltpu.InterpretParams)."""
    impl: str
    interpret: Any = False


def resolve_lowering(impl: str, interpret: Any = None) -> Lowering:
    """"auto" picks by platform (GPU -> Triton, TPU -> Mosaic, else the reference); an explicit Pallas
    lowering off its own platform runs in interpret mode unless `interpret` says otherwise."""
    if impl not in IMPLS:
        raise ValueError(f"unknown impl {impl!r}; expected one of {IMPLS}")
    backend = jax.default_backend()
    if impl == "auto":
        impl = {"gpu": "pallas_gpu", "tpu": "pallas_tpu"}.get(backend, "xla")
    if impl == "xla":
        return Lowering("xla")
    native = {"pallas_gpu": "gpu", "pallas_tpu": "tpu"}[impl]
    if interpret is None:
        interpret = backend != native
    if impl == "pallas_tpu" and interpret is True:
        interpret = pltpu.InterpretParams()
    if impl == "pallas_gpu" and not isinstance(interpret, bool):
        raise ValueError(f"impl='pallas_gpu' takes interpret=True/False/None, got {interpret!r}")
    return Lowering(impl, interpret)


def check_array(name: str, x: Any, ndim: int, dtypes: tuple, layout: str) -> None:
    """ValueError naming the tensor when it is not a `ndim`-d array of one of `dtypes`."""
    if not hasattr(x, "shape") or not hasattr(x, "dtype"):
        raise ValueError(f"{name} must be an array {layout}, got {type(x).__name__}")
    if x.ndim != ndim:
        raise ValueError(f"{name} must be {ndim}-d {layout}, got shape {tuple(x.shape)}")
    if not any(x.dtype == d for d in dtypes):
        names = ", ".join(jnp.dtype(d).name for d in dtypes)
        raise ValueError(f"{name} must have dtype in ({names}), got {x.dtype}")


def check_dim(name: str, x: Any, axis: int, expected: int, what: str) -> None:
    if x.shape[axis] != expected:
        raise ValueError(f"{name} has shape {tuple(x.shape)}: axis {axis} ({what}) must be {expected}, "
                         f"got {x.shape[axis]}")


def check_positive(name: str, value: Any) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


def check_compressed_attention_inputs(q, kv, kv_comp, sinks, segment_ids, window) -> tuple[int, int, int, int]:
    """The checks CSA and HCA share: q [B, T, H, D], kv [B, T, D] and kv_comp [B, S, D] in q's dtype,
    sinks [H], optional int32 segment_ids [B, T], a positive window. Returns (B, T, H, D)."""
    check_array("q", q, 4, FLOAT_DTYPES, "[B, T, H, D]")
    B, T, H, D = q.shape
    check_array("kv", kv, 3, (q.dtype,), "[B, T, D] with q's dtype")
    check_dim("kv", kv, 0, B, "batch"), check_dim("kv", kv, 1, T, "tokens"), check_dim("kv", kv, 2, D, "head dim")
    check_array("kv_comp", kv_comp, 3, (q.dtype,), "[B, S, D] with q's dtype")
    check_dim("kv_comp", kv_comp, 0, B, "batch"), check_dim("kv_comp", kv_comp, 2, D, "head dim")
    check_array("sinks", sinks, 1, FLOAT_DTYPES, "[H]")
    check_dim("sinks", sinks, 0, H, "heads")
    check_segment_ids(segment_ids, B, T)
    check_positive("window", window)
    return B, T, H, D


def check_segment_ids(segment_ids, batch: int, length: int) -> None:
    """ValueError unless segment_ids is None or int32 [batch, length]."""
    if segment_ids is not None:
        check_array("segment_ids", segment_ids, 2, (jnp.int32,), "[B, T]")
        check_dim("segment_ids", segment_ids, 0, batch, "batch")
        check_dim("segment_ids", segment_ids, 1, length, "tokens")


def gpu_compute_capability() -> int:
    """The major compute capability of this machine's first GPU (9 on Hopper); 0 without a GPU."""
    if jax.default_backend() != "gpu":
        return 0
    return int(str(getattr(jax.devices()[0], "compute_capability", "0")).split(".")[0])


def round_up(x: int, multiple: int) -> int:
    return -(-x // multiple) * multiple


def next_pow2(x: int) -> int:
    return 1 << max(x - 1, 0).bit_length()


def pad_axis(x: jax.Array, axis: int, size: int, *, before: int = 0, value: Any = 0) -> jax.Array:
    """Pads `x` along `axis` with `before` leading entries and trailing ones up to `size` in total."""
    after = size - before - x.shape[axis]
    if before == 0 and after == 0:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (before, after)
    return jnp.pad(x, widths, constant_values=value)


def window_start(segment_ids_BT: jax.Array | None, batch: int, length: int) -> jax.Array:
    """int32 [B, T]: the first raw position token t may attend to in its window.

    A segment is a maximal run of equal non-zero ids; id 0 marks padding, which no token attends to
    (a padding token's window is empty: its start is t + 1). Without segment ids everything is one
    segment starting at 0.
    """
    if segment_ids_BT is None:
        return jnp.zeros((batch, length), jnp.int32)
    t_T = jnp.arange(length, dtype=jnp.int32)
    seg = segment_ids_BT
    run_begins_BT = jnp.concatenate(
        [jnp.ones((batch, 1), bool), seg[:, 1:] != seg[:, :-1]], axis=1)
    run_start_BT = jax.lax.cummax(jnp.where(run_begins_BT, t_T, 0), axis=1)
    return jnp.where(seg != 0, run_start_BT, t_T + 1).astype(jnp.int32)


def first_entry(lo, ratio: int | None):
    """The first compressed entry a token whose segment starts at `lo` (its `window_start`) may see. Entry s
    belongs to the segment of its last pooled token (s + 1) * ratio - 1, which lies in [lo, t] iff
    s >= lo // ratio (a padding token, lo = t + 1, sees none). ratio None (CSA, whose indexer already chose
    within the segment): 0. For int32 scalars (inside kernels) and arrays."""
    return 0 if ratio is None else jax.lax.div(lo, ratio)


def window_keys_reference(kv_BTD: jax.Array, window: int, window_start_BT: jax.Array
                          ) -> tuple[jax.Array, jax.Array]:
    """The W raw keys of every token's window, gathered: keys [B, T, W, D] and visible [B, T, W]
    (slot w holds position t - W + 1 + w)."""
    T = kv_BTD.shape[1]
    pos_TW = jnp.arange(T)[:, None] - (window - 1) + jnp.arange(window)[None, :]
    visible_BTW = (pos_TW[None] >= window_start_BT[:, :, None]) & (pos_TW[None] >= 0)
    keys_BTWD = gather_rows(kv_BTD, jnp.broadcast_to(jnp.clip(pos_TW, 0, T - 1), visible_BTW.shape))
    return keys_BTWD, visible_BTW


def gather_rows(x_BSD: jax.Array, rows_BTN: jax.Array) -> jax.Array:
    """x[b, rows[b, t, n]] -> [B, T, N, D], gathered through float32 so that the gradient's scatter-add
    (thousands of terms per row at long context) accumulates in float32, not in bf16."""
    gathered = jax.vmap(lambda x_SD, rows_TN: x_SD[rows_TN])(x_BSD.astype(jnp.float32), rows_BTN)
    return gathered.astype(x_BSD.dtype)


def sink_softmax(logits_parts: list[jax.Array], sinks_H: jax.Array) -> list[jax.Array]:
    """One softmax over the concatenated last axes of float32 logits [B, T, H, N_i] (-inf = masked)
    plus a per-head sink logit that only enters the denominator; returns the probabilities per part."""
    B, T, H, _ = logits_parts[0].shape
    sink_BTH1 = jnp.broadcast_to(sinks_H.astype(jnp.float32)[:, None], (B, T, H, 1))
    probs = jax.nn.softmax(jnp.concatenate([*logits_parts, sink_BTH1], axis=-1), axis=-1)
    splits, offset = [], 0
    for part in logits_parts:
        splits.append(probs[..., offset:offset + part.shape[-1]])
        offset += part.shape[-1]
    return splits


def sink_gradient(sinks_H: jax.Array, lse_BTH: jax.Array, delta_BTH: jax.Array) -> jax.Array:
    """d loss / d sink_h = -sum_{b,t} p_sink[b,t,h] * delta[b,t,h], with p_sink = exp(sink_h - lse) and
    delta = sum_d dO * O (the sink is a logit whose value vector is zero)."""
    p_sink_BTH = jnp.exp(sinks_H.astype(jnp.float32) - lse_BTH)
    return -jnp.einsum("BTH,BTH->H", p_sink_BTH, delta_BTH).astype(sinks_H.dtype)
