"""What every kernel of the package shares, written once: choosing a lowering, checking inputs, padding,
float32-accumulating tile matmuls, the per-token window start and the compressed entries a token sees.
BlockSizes (the compressed kernels' tiles) lives here because their API and both lowerings read it.

Shapes (the repo's legend): B batch, T query tokens, S key tokens, N query heads, H head dim,
C compressed entries.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental.pallas import tpu as pltpu

# A kernel call's `impl` (the layers pick it from their own model.attention_impl: layers.attention.IMPLS).
LOWERINGS = ("xla", "pallas_gpu", "pallas_tpu", "auto")
FLOAT_DTYPES = (jnp.float32, jnp.bfloat16)
F32 = jnp.float32
# HIGHEST keeps float32 tiles in IEEE float32 (not TF32); bf16 tiles are unaffected.
HIGHEST = lax.Precision.HIGHEST


def check_block_sizes(blocks, fields, minimum: int) -> None:
    """Each of `fields` of a block-sizes dataclass is an int power of two >= `minimum` (one-line error)."""
    for field in fields:
        value = getattr(blocks, field)
        if not isinstance(value, int) or value < minimum or value & (value - 1):
            bound = f" >= {minimum}" if minimum > 1 else ""
            raise ValueError(f"{type(blocks).__name__}.{field}={value!r} must be a power of two{bound}")


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Tile sizes of the window + compressed attention kernels (tune per chip).

    block_h, block_k: forward; query heads per GPU program (the rows of its [block_h, H] x [H, block_k]
      tiles; the TPU always takes all heads) and keys per step (window blocks, compressed blocks/top-k chunks).
    block_h_dq, block_k_dq: the same for the dQ kernel (GPU). CSA's gathered rows get one atomic add per
      head block, so the largest block_h_dq that fits in shared memory is best (docs/benchmarks.md).
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
        check_block_sizes(self, ("block_h", "block_k", "block_h_dq", "block_k_dq", "block_kv_bwd", "block_rows_bwd"),
                          8)


@dataclasses.dataclass(frozen=True)
class Lowering:
    """Which kernel runs and how: impl in ("xla", "pallas_gpu", "pallas_tpu") and the `interpret`
    argument handed to pallas_call (False, True, or a pltpu.InterpretParams)."""
    impl: str
    interpret: Any = False


def resolve_lowering(impl: str, interpret: Any = None) -> Lowering:
    """"auto" picks by platform (GPU -> Triton, TPU -> Mosaic, else the reference); an explicit Pallas
    lowering off its own platform runs in interpret mode unless `interpret` says otherwise."""
    if impl not in LOWERINGS:
        raise ValueError(f"unknown impl {impl!r}; expected one of {LOWERINGS}")
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


def dot(a, b, precision=HIGHEST):
    """Tile matmul with float32 accumulation: a [M, C] . b [C, N] -> [M, N]."""
    return lax.dot_general(a, b, (((1,), (0,)), ((), ())), precision=precision, preferred_element_type=F32)


def dot_nt(a, b, precision=HIGHEST):
    """a [M, C] . b [N, C]^T -> [M, N]."""
    return lax.dot_general(a, b, (((1,), (1,)), ((), ())), precision=precision, preferred_element_type=F32)


def dot_tn(a, b, precision=HIGHEST):
    """a [C, M]^T . b [C, N] -> [M, N]."""
    return lax.dot_general(a, b, (((0,), (0,)), ((), ())), precision=precision, preferred_element_type=F32)


def tpu_precision(dtype):
    """Mosaic TPU matmul precision: float32 tiles as float32 (HIGHEST), 16-bit ones at DEFAULT."""
    return HIGHEST if dtype == F32 else lax.Precision.DEFAULT


def cdiv(x, n: int):
    """Ceil division of a non-negative traced int by a static int."""
    return lax.div(x + (n - 1), n)


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


def visible_entries(t, ratio: int, num_entries: int, div=lax.div):
    """How many compressed entries token t (>= 0) sees: min((t + 1) // ratio, C). Entry c pools tokens
    [c * ratio, (c + 1) * ratio), so it is visible once all of them are in the past. For int32 scalars
    (inside kernels; `div` lax.div) and arrays (`div` jnp.floor_divide)."""
    return jnp.minimum(div(t + 1, ratio), num_entries)


def first_entry(lo, ratio: int | None):
    """The first compressed entry a token whose segment starts at `lo` (its `window_start`) may see. Entry c
    belongs to the segment of its last pooled token (c + 1) * ratio - 1, which lies in [lo, t] iff
    c >= lo // ratio (a padding token, lo = t + 1, sees none). ratio None (CSA, whose indexer already chose
    within the segment): 0. For int32 scalars (inside kernels) and arrays."""
    return 0 if ratio is None else jax.lax.div(lo, ratio)
