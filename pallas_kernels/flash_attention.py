"""Dense causal flash attention (GQA/MQA, sliding window, per-head sinks, packed segments): API, pure-JAX
reference and the custom VJP over its lowerings.

    o[t, n] = sum_{s visible to t} softmax_s(scale * q[t, n] . k[s, n // G] ; sink_n) v[s, n // G]

s is visible to t iff s <= t, t - s < window (window 0 = unlimited) and both are in the same non-zero
segment (segment id 0 marks padding). The sink is a per-head logit that only enters the denominator. A
query that sees nothing (padding) gets output 0 (the XLA reference in layers/attention.py averages v there;
both are meaningless for padding and the loss masks them).

Layout: the G = N / K query heads of one kv head are folded into the rows of the matmul tiles, token
major (row r = t * G + g), so one K/V block serves every head that reads it; key blocks that hold no
visible key for a row block are skipped (`flash_blocks`). Lowerings: Triton (`flash_gpu`) and Mosaic TPU
(`flash_tpu`), both backwards also kernels (dQ walk + key-major dK/dV walk). On a Hopper GPU the forward
of 16-bit calls without sinks or segments (d 64-512) runs on Mosaic GPU instead (`flash_hopper_forward`,
in the caller's layout), and so does the backward at d 64-256 (`flash_hopper_backward`; Triton's at
d 512). The pure-JAX `flash_attention_reference` is the "xla" path.

Shapes: B batch, T tokens, S key tokens (= T), N query heads, K kv heads, G = N // K, H head dim (<= 512),
R rows.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from pallas_kernels import flash_gpu, flash_hopper_backward, flash_hopper_forward, flash_tpu
from pallas_kernels.common import (FLOAT_DTYPES, Lowering, check_array, check_block_sizes, check_dim, next_pow2,
                                   pad_axis, resolve_lowering, round_up)

_F32 = jnp.float32
_NO_SINK = -1e30       # "no sink": seeds the running max so low that it never counts
MAX_HEAD_DIM = 512
_ENGINES = {"pallas_gpu": flash_gpu, "pallas_tpu": flash_tpu}


@dataclasses.dataclass(frozen=True)
class FlashBlockSizes:
    """block_q: (token, head) rows per tile; block_kv: keys per tile. num_warps / num_stages: Triton
    launch parameters (GPU only). `backward`: other sizes for the backward kernels (None: these)."""
    block_q: int = 64
    block_kv: int = 64
    num_warps: int = 4
    num_stages: int = 2
    backward: FlashBlockSizes | None = None

    def __post_init__(self):
        check_block_sizes(self, ("block_q", "block_kv"), 8)
        if self.backward is not None and (not isinstance(self.backward, FlashBlockSizes)
                                          or self.backward.backward is not None):
            raise ValueError(f"FlashBlockSizes.backward must be a FlashBlockSizes without its own backward, "
                             f"got {self.backward!r}")

    @property
    def for_backward(self) -> FlashBlockSizes:
        return self.backward or self


def default_block_sizes(impl: str, head_dim: int, dtype=jnp.bfloat16) -> FlashBlockSizes:
    """GPU: the fastest forward+backward tiles of `benchmarks/dense_attention.py --sweep` on the H100 at
    16K tokens (docs/benchmarks.md); tiles shrink as the head dim grows (registers, shared memory: fp32 at
    d 512 with 32 x 32 tiles asks for 256 KiB). TPU: (8, 128)-aligned, untuned."""
    if impl == "pallas_tpu":
        return FlashBlockSizes(block_q=128, block_kv=128)
    if head_dim <= 128:
        return FlashBlockSizes(64, 64, num_warps=4, num_stages=2)
    if head_dim <= 256:
        return FlashBlockSizes(64, 32, num_warps=4, num_stages=2)
    if jnp.dtype(dtype).itemsize > 2:
        return FlashBlockSizes(16, 16, num_warps=4, num_stages=1)
    # bf16 d 512: the forward's best tiles; the backward's do not fit shared memory with them
    return FlashBlockSizes(64, 32, num_warps=8, num_stages=2,
                           backward=FlashBlockSizes(64, 16, num_warps=8, num_stages=2))


def flash_attention_reference(q_BTNH, k_BSKH, v_BSKH, *, window: int = 0, sinks_N=None, segment_ids_BT=None,
                              scale: float) -> jax.Array:
    """Pure JAX, float32 logits and softmax; rows that see nothing give 0 (like the kernel)."""
    B, T, N, H = q_BTNH.shape
    K = k_BSKH.shape[2]
    t, s = jnp.arange(T)[:, None], jnp.arange(T)[None, :]
    vis_BTS = jnp.broadcast_to((s <= t) & ((t - s < window) if window else True), (B, T, T))
    if segment_ids_BT is not None:
        seg = segment_ids_BT
        vis_BTS = vis_BTS & (seg[:, :, None] == seg[:, None, :]) & (seg[:, None, :] != 0)
    q_BTKGH = q_BTNH.reshape(B, T, K, N // K, H)
    logits = jnp.einsum("BTKGH,BSKH->BKGTS", q_BTKGH, k_BSKH, preferred_element_type=_F32,
                        precision=lax.Precision.HIGHEST) * scale
    logits = jnp.where(vis_BTS[:, None, None], logits, -jnp.inf)
    sink = jnp.full((N,), _NO_SINK, _F32) if sinks_N is None else sinks_N.astype(_F32)
    m = jnp.maximum(jnp.max(logits, axis=-1, keepdims=True), sink.reshape(1, K, N // K, 1, 1))
    p = jnp.exp(logits - m)
    denom = jnp.sum(p, axis=-1, keepdims=True) + jnp.exp(sink.reshape(1, K, N // K, 1, 1) - m)
    probs = p / denom
    out = jnp.einsum("BKGTS,BSKH->BTKGH", probs.astype(v_BSKH.dtype), v_BSKH, preferred_element_type=_F32,
                     precision=lax.Precision.HIGHEST)
    return out.reshape(B, T, N, H).astype(q_BTNH.dtype)


class _Prepared(NamedTuple):
    q: jax.Array       # [B, K, R, Hp]   rows r = t * G + g, padded with zeros
    k: jax.Array       # [B, K, Sp, Hp]
    v: jax.Array       # [B, K, Sp, Hp]
    qseg: jax.Array    # int32 [B, R]    segment of each row (0 for padding rows)
    kvseg: jax.Array   # int32 [B, Sp]   segment of each key (0 for padding keys)
    sinks: jax.Array   # f32 [K, R]      the sink logit of each row's head
    groups: int
    tokens: int
    segmented: bool    # whether segment ids were given (without, qseg/kvseg only mark padding)


@dataclasses.dataclass(frozen=True)
class _Config:
    lowering: Lowering
    window: int
    scale: float
    blocks: FlashBlockSizes
    head_pad: int       # padded head dim
    segmented: bool
    hopper_forward: bool = False   # the forward runs `flash_hopper_forward` (GPU lowering only)
    hopper_backward: bool = False  # the backward runs `flash_hopper_backward` (head dim <= 256)


def _to_rows(x_BTNH, K: int, R: int, Hp: int):
    B, T, N, H = x_BTNH.shape
    x = x_BTNH.reshape(B, T, K, N // K, H).transpose(0, 2, 1, 3, 4).reshape(B, K, T * (N // K), H)
    return pad_axis(pad_axis(x, 2, R), 3, Hp)


def _from_rows(x_BKR, T: int, N: int):
    """[B, K, R(, H)] rows -> [B, T, N(, H)]."""
    B, K = x_BKR.shape[:2]
    x = x_BKR[:, :, :T * (N // K)]
    x = x.reshape(B, K, T, N // K, *x.shape[3:])
    x = jnp.moveaxis(x, 1, 2)
    return x.reshape(B, T, N, *x.shape[4:])


def _prepare(cfg: _Config, blocks: FlashBlockSizes, q_BTNH, k_BTKH, v_BTKH, sinks_N, seg_BT) -> _Prepared:
    B, T, N, H = q_BTNH.shape
    K = k_BTKH.shape[2]
    G = N // K
    bq, bk = blocks.block_q, blocks.block_kv
    R, Sp, Hp = round_up(T * G, bq), round_up(T, bk), cfg.head_pad
    kv = lambda x: pad_axis(pad_axis(x.transpose(0, 2, 1, 3), 2, Sp), 3, Hp)
    qseg = pad_axis(jnp.repeat(seg_BT, G, axis=1), 1, R)
    sinks_KR = jnp.tile(sinks_N.astype(_F32).reshape(K, G), (1, R // G + 1))[:, :R]
    return _Prepared(_to_rows(q_BTNH, K, R, Hp), kv(k_BTKH), kv(v_BTKH), qseg, pad_axis(seg_BT, 1, Sp),
                     sinks_KR, G, T, cfg.segmented)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _flash(cfg: _Config, q_BTNH, k_BTKH, v_BTKH, sinks_N, seg_BT):
    return _flash_forward(cfg, q_BTNH, k_BTKH, v_BTKH, sinks_N, seg_BT)[0]


def _lse_heads_to_rows(lse_BNT, K: int):
    """[B, N, T] -> the row layout [B, K, T * G] (row t * G + g)."""
    B, N, T = lse_BNT.shape
    return lse_BNT.reshape(B, K, N // K, T).transpose(0, 1, 3, 2).reshape(B, K, T * (N // K))


def _flash_forward(cfg: _Config, q_BTNH, k_BTKH, v_BTKH, sinks_N, seg_BT):
    """o [B, T, N, H], residuals for the backward (the log-sum-exp in its backward's layout: [B, N, T] for
    Mosaic GPU's, rows [B, K, T * G] for the others)."""
    B, T, N, H = q_BTNH.shape
    K = k_BTKH.shape[2]
    if cfg.hopper_forward:
        o_BTNH, lse_BNT = flash_hopper_forward.forward(q_BTNH, k_BTKH, v_BTKH, scale=cfg.scale, window=cfg.window)
        if cfg.hopper_backward:
            return o_BTNH, (q_BTNH, k_BTKH, v_BTKH, sinks_N, seg_BT, o_BTNH, lse_BNT)
        lse_BKR = _lse_heads_to_rows(lse_BNT, K)
    else:
        p = _prepare(cfg, cfg.blocks, q_BTNH, k_BTKH, v_BTKH, sinks_N, seg_BT)
        o_rows, lse_rows = _ENGINES[cfg.lowering.impl].forward(
            p, scale=cfg.scale, window=cfg.window, blocks=cfg.blocks, interpret=cfg.lowering.interpret)
        o_BTNH = _from_rows(o_rows, T, N)[..., :H]
        lse_BKR = lse_rows[:, :, :T * (N // K)]
    return o_BTNH, (q_BTNH, k_BTKH, v_BTKH, sinks_N, seg_BT, o_BTNH, lse_BKR)


def _flash_backward(cfg: _Config, residuals, do_BTNH):
    q_BTNH, k_BTKH, v_BTKH, sinks_N, seg_BT, o_BTNH, lse = residuals
    if cfg.hopper_backward:    # no sinks here: their cotangent is zero
        dq, dk, dv = flash_hopper_backward.backward(q_BTNH, k_BTKH, v_BTKH, o_BTNH, lse, do_BTNH, scale=cfg.scale,
                                                    window=cfg.window)
        return dq, dk, dv, jnp.zeros_like(sinks_N), None
    lse_BKR = lse
    B, T, N, H = q_BTNH.shape
    K = k_BTKH.shape[2]
    blocks = cfg.blocks.for_backward
    p = _prepare(cfg, blocks, q_BTNH, k_BTKH, v_BTKH, sinks_N, seg_BT)
    R = p.q.shape[2]   # rows padded for the backward's tiles; past T * G rows are padding (do = 0)
    o_rows = _to_rows(o_BTNH, K, R, cfg.head_pad)
    lse_rows = pad_axis(lse_BKR, 2, R)
    do_rows = _to_rows(do_BTNH.astype(q_BTNH.dtype), K, R, cfg.head_pad)
    delta_rows = jnp.einsum("BKRH,BKRH->BKR", o_rows.astype(_F32), do_rows.astype(_F32))
    dq, dk, dv = _ENGINES[cfg.lowering.impl].backward(
        p, do_rows, lse_rows, delta_rows, scale=cfg.scale, window=cfg.window, blocks=blocks,
        interpret=cfg.lowering.interpret)
    kv_back = lambda x: x[:, :, :T, :H].transpose(0, 2, 1, 3)
    # d loss / d sink_n = -sum_{b,t} p_sink * delta, p_sink = exp(sink - lse) (its value vector is zero).
    p_sink = jnp.exp(p.sinks[None] - lse_rows)
    dsinks_KR = -jnp.sum(p_sink * delta_rows, axis=0)[:, :T * (N // K)]
    dsinks_N = dsinks_KR.reshape(K, T, N // K).sum(axis=1).reshape(N).astype(sinks_N.dtype)
    return (_from_rows(dq, T, N)[..., :H], kv_back(dk), kv_back(dv), dsinks_N, None)


_flash.defvjp(_flash_forward, _flash_backward)


def use_hopper_forward(lowering: Lowering, q_BTNH, *, sinks: bool, segmented: bool,
                       block_sizes: FlashBlockSizes | None) -> bool:
    """The Triton lowering's forward runs on Mosaic GPU when compiled for a Hopper GPU, no Triton tiles were
    asked for, and the call fits it."""
    return (lowering.impl == "pallas_gpu" and lowering.interpret is False and block_sizes is None
            and flash_hopper_forward.runs_on_this_device()
            and flash_hopper_forward.fits(q_BTNH, sinks=sinks, segmented=segmented))


def hopper_kernel_runs_both_ways(q_BTNH, *, sinks: bool, segmented: bool) -> bool:
    """Whether, compiled for this machine's GPU with default tiles, the call's forward and backward both run
    on Mosaic GPU (a Hopper GPU; 16-bit, head dim 64/128/256, no sinks or segments)."""
    return (flash_hopper_forward.runs_on_this_device()
            and flash_hopper_forward.fits(q_BTNH, sinks=sinks, segmented=segmented)
            and flash_hopper_backward.backward_fits(q_BTNH))


def flash_attention(q_BTNH: jax.Array, k_BSKH: jax.Array, v_BSKH: jax.Array, *, window: int = 0,
                    sinks_N: jax.Array | None = None, segment_ids_BT: jax.Array | None = None,
                    scale: float, impl: str = "auto", interpret: Any = None,
                    block_sizes: FlashBlockSizes | None = None) -> jax.Array:
    """Causal self-attention over positions 0..T-1; returns [B, T, N, H] in q's dtype.

    q [B, T, N, H]; k, v [B, T, K, H] (N a multiple of K; same dtype, float32 or bfloat16; H <= 512).
    window: keys per query including itself (0 = unlimited). sinks_N: optional per-head sink logits [N].
    segment_ids_BT: optional int [B, T]; tokens attend within equal non-zero ids, 0 marks padding (its
    output is 0). impl: "xla" (pure-JAX reference), "pallas_gpu", "pallas_tpu" or "auto" (by platform; the
    reference on CPU); a Pallas lowering off its platform runs in interpret mode unless `interpret` says
    otherwise. Logits, softmax and accumulation are float32. block_sizes: Triton/TPU tiles (None: the
    defaults, and on a Hopper GPU the Mosaic GPU forward and backward wherever they fit; given: Triton's).
    """
    check_array("q", q_BTNH, 4, FLOAT_DTYPES, "[B, T, N, H]")
    B, T, N, H = q_BTNH.shape
    check_array("k", k_BSKH, 4, (q_BTNH.dtype,), "[B, S, K, H] with q's dtype")
    check_array("v", v_BSKH, 4, (q_BTNH.dtype,), "[B, S, K, H] with q's dtype")
    K = k_BSKH.shape[2]
    for name, x in (("k", k_BSKH), ("v", v_BSKH)):
        check_dim(name, x, 0, B, "batch")
        check_dim(name, x, 1, T, "key tokens, which must equal the query tokens (causal self-attention)")
        check_dim(name, x, 2, K, "kv heads")
        check_dim(name, x, 3, H, "head dim")
    if K == 0 or N % K:
        raise ValueError(f"q has {N} heads, which is not a multiple of the {K} kv heads of k and v")
    if H > MAX_HEAD_DIM:
        raise ValueError(f"head dim {H} is over the kernel's limit of {MAX_HEAD_DIM}")
    if not isinstance(window, int) or isinstance(window, bool) or window < 0:
        raise ValueError(f"window must be an int >= 0 (0 = unlimited), got {window!r}")
    if sinks_N is not None:
        check_array("sinks_N", sinks_N, 1, FLOAT_DTYPES, "[N]")
        check_dim("sinks_N", sinks_N, 0, N, "query heads")
    if segment_ids_BT is not None:
        check_array("segment_ids_BT", segment_ids_BT, 2, (jnp.int32, jnp.int64, jnp.int16, jnp.int8), "[B, T]")
        check_dim("segment_ids_BT", segment_ids_BT, 0, B, "batch")
        check_dim("segment_ids_BT", segment_ids_BT, 1, T, "tokens")
    try:
        scale = float(scale)
    except TypeError as e:
        raise ValueError(f"scale must be a Python number, got {scale!r}") from e
    lowering = resolve_lowering(impl, interpret)
    if lowering.impl == "xla":
        return flash_attention_reference(q_BTNH, k_BSKH, v_BSKH, window=window, sinks_N=sinks_N,
                                         segment_ids_BT=segment_ids_BT, scale=scale)
    blocks = block_sizes or default_block_sizes(lowering.impl, H, q_BTNH.dtype)
    head_pad = next_pow2(max(H, 16)) if lowering.impl == "pallas_gpu" else H
    window = 0 if window >= T else window
    segmented = segment_ids_BT is not None
    hopper = use_hopper_forward(lowering, q_BTNH, sinks=sinks_N is not None, segmented=segmented,
                                block_sizes=block_sizes)
    cfg = _Config(lowering, window, scale, blocks, head_pad, segmented, hopper_forward=hopper,
                  hopper_backward=hopper and flash_hopper_backward.backward_fits(q_BTNH))
    seg = (jnp.ones((B, T), jnp.int32) if segment_ids_BT is None else segment_ids_BT.astype(jnp.int32))
    sinks = jnp.full((N,), _NO_SINK, _F32) if sinks_N is None else sinks_N
    if sinks_N is None:
        sinks = lax.stop_gradient(sinks)
    return _flash(cfg, q_BTNH, k_BSKH, v_BSKH, sinks, seg)
