"""The dense flash attention kernel (pallas_kernels/flash_attention.py) against layers.attention's
reference: forward and gradients (q, k, v, sinks) on random inputs, both lowerings in interpret mode (the
TPU one under the TPU interpreter, which fills unwritten memory with NaN), window, GQA/MQA, sinks,
segments, odd lengths, fp32 and bf16; the Hopper (Mosaic GPU) forward's plumbing into the Triton backward
on CPU, and the kernel itself where a Hopper GPU runs the tests; the dispatch table; JAX's TPU splash
attention through our wrapper (layers.attention.splash_attention) under the TPU interpreter; and the
Gemma-4, Laguna and ZAYA1 parity models giving the same logits with attention_impl="pallas" as with
"xla"."""
from __future__ import annotations

import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from layers import attention
from layers.attention import attention_backend, attention_mask, dot_product_attention, reference_attention, \
    splash_attention
from pallas_kernels import FlashBlockSizes, flash_attention
from pallas_kernels import flash_hopper_backward, flash_hopper_forward
from pallas_kernels.common import Lowering
from tests.conftest import all_eqns

flash_module = importlib.import_module("pallas_kernels.flash_attention")

B = 2
SMALL = {"pallas_gpu": FlashBlockSizes(block_q=16, block_kv=16),
         "pallas_tpu": FlashBlockSizes(block_q=16, block_kv=8)}


def _inputs(T, N, K, H, dtype, seed=0):
    ks = jax.random.split(jax.random.PRNGKey(seed), 5)
    q = jax.random.normal(ks[0], (B, T, N, H), jnp.float32).astype(dtype)
    k = jax.random.normal(ks[1], (B, T, K, H), jnp.float32).astype(dtype)
    v = jax.random.normal(ks[2], (B, T, K, H), jnp.float32).astype(dtype)
    sinks = jax.random.normal(ks[3], (N,), jnp.float32)
    cotangent = jax.random.normal(ks[4], (B, T, N, H), jnp.float32)
    return q, k, v, sinks, cotangent


def _segments(T):
    """Row 0: two packed documents; row 1: one document then padding (id 0)."""
    cut = T // 2 + 1
    return jnp.array([[1] * cut + [2] * (T - cut), [3] * (T - 4) + [0] * 4], jnp.int32)


def _check(impl, *, T, N, K, H, window, use_sinks, use_segments, dtype, tol, blocks="small"):
    q, k, v, sinks, cot = _inputs(T, N, K, H, dtype)
    seg = _segments(T) if use_segments else None
    sinks = sinks if use_sinks else None
    pos = jnp.broadcast_to(jnp.arange(T), (B, T))
    mask = attention_mask(pos, pos, window=window, q_segment_ids_BT=seg, kv_segment_ids_BS=seg)
    real = jnp.ones((B, T, 1, 1), bool) if seg is None else (seg != 0)[:, :, None, None]
    scale = H ** -0.5

    def ours(q, k, v, s):
        return flash_attention(q, k, v, window=window, sinks_N=s, segment_ids_BT=seg, scale=scale, impl=impl,
                               block_sizes=SMALL[impl] if blocks == "small" else blocks)

    def ref(q, k, v, s):
        return reference_attention(q, k, v, mask, scale=scale, sinks_N=s)

    out = ours(q, k, v, sinks)
    assert out.shape == q.shape and out.dtype == q.dtype
    assert bool(jnp.all(jnp.isfinite(out.astype(jnp.float32)))), "unwritten or NaN outputs"
    expected = ref(q, k, v, sinks)
    diff = jnp.where(real, out.astype(jnp.float32) - expected.astype(jnp.float32), 0)
    assert float(jnp.max(jnp.abs(diff))) <= tol, float(jnp.max(jnp.abs(diff)))
    if seg is not None:   # a token that sees nothing (padding) gets 0
        assert float(jnp.max(jnp.abs(jnp.where(real, 0, out.astype(jnp.float32))))) == 0.0

    def loss(fn):
        return lambda *a: jnp.sum(jnp.where(real, fn(*a).astype(jnp.float32) * cot, 0))

    argnums = (0, 1, 2, 3) if use_sinks else (0, 1, 2)
    args = (q, k, v, sinks)
    got = jax.grad(loss(ours), argnums=argnums)(*args)
    want = jax.grad(loss(ref), argnums=argnums)(*args)
    for name, g, w in zip("qkvs", got, want):
        g32, w32 = g.astype(jnp.float32), w.astype(jnp.float32)
        assert bool(jnp.all(jnp.isfinite(g32))), f"d{name} has NaNs"
        err = float(jnp.max(jnp.abs(g32 - w32)) / (1.0 + float(jnp.max(jnp.abs(w32)))))
        assert err <= tol * (10 if name == "s" else 1), f"d{name}: {err}"


# (T, N, K, H, window, sinks, segments): GQA with odd T and a window, MQA with sinks and segments, MHA
# with an odd head dim, a window longer than the sequence; without segments, blocks seen whole (no mask) in
# full causal attention and inside a window.
CASES = [(37, 6, 2, 16, 7, False, False), (29, 4, 1, 24, 0, True, True), (21, 3, 3, 8, 5, True, True),
         (19, 4, 2, 16, 40, False, True), (70, 4, 2, 16, 0, True, False), (70, 2, 1, 16, 33, False, False)]


@pytest.mark.parametrize("T,N,K,H,window,sinks,segments", CASES)
def test_gpu_lowering_fp32(T, N, K, H, window, sinks, segments):
    _check("pallas_gpu", T=T, N=N, K=K, H=H, window=window, use_sinks=sinks, use_segments=segments,
           dtype=jnp.float32, tol=1e-5)


@pytest.mark.parametrize("T,N,K,H,window,sinks,segments", CASES[:2])
def test_tpu_lowering_fp32(T, N, K, H, window, sinks, segments):
    _check("pallas_tpu", T=T, N=N, K=K, H=H, window=window, use_sinks=sinks, use_segments=segments,
           dtype=jnp.float32, tol=1e-5)


def _kernel_grids(jaxpr) -> dict[str, tuple]:
    """Pallas call name -> grid, over `jaxpr` and its sub-jaxprs."""
    return {eqn.params["name"]: tuple(eqn.params["grid_mapping"].grid) for eqn in all_eqns(jaxpr)
            if eqn.primitive.name == "pallas_call"}


@pytest.mark.parametrize("impl,blocks,grids", [
    # GPU grids (B, K, blocks): 111 rows / 16 forward; 111 rows / 32 for dq, 37 keys / 8 for dk, dv
    ("pallas_gpu", FlashBlockSizes(16, 16, backward=FlashBlockSizes(32, 8, num_warps=8)),
     {"flash_attention_forward": (B, 2, 7), "flash_attention_dq": (B, 2, 4), "flash_attention_dkv": (B, 2, 5)}),
    # TPU grids (B, K, outer blocks, inner blocks)
    ("pallas_tpu", FlashBlockSizes(16, 8, backward=FlashBlockSizes(32, 16)),
     {"flash_attention_forward": (B, 2, 7, 5), "flash_attention_dq": (B, 2, 4, 3),
      "flash_attention_dkv": (B, 2, 3, 4)})])
def test_backward_tiles_of_their_own(impl, blocks, grids):
    """Backward kernels with other tiles than the forward's: 111 (token, head) rows pad to 112 rows
    forward and to 128 backward, so the forward's residuals are re-padded."""
    _check(impl, T=37, N=6, K=2, H=16, window=7, use_sinks=True, use_segments=True, dtype=jnp.float32,
           tol=1e-5, blocks=blocks)
    q, k = jnp.ones((B, 37, 6, 16)), jnp.ones((B, 37, 2, 16))
    loss = lambda q, k, v: flash_attention(q, k, v, scale=0.25, impl=impl, block_sizes=blocks).sum()
    assert _kernel_grids(jax.make_jaxpr(jax.grad(loss, argnums=(0, 1, 2)))(q, k, k).jaxpr) == grids


def test_backward_block_sizes_are_checked():
    with pytest.raises(ValueError, match="backward"):
        FlashBlockSizes(16, 16, backward=FlashBlockSizes(16, 16, backward=FlashBlockSizes()))


@pytest.mark.parametrize("impl", ["pallas_gpu", "pallas_tpu"])
def test_bf16(impl):
    _check(impl, T=23, N=4, K=2, H=16, window=6, use_sinks=True, use_segments=True, dtype=jnp.bfloat16,
           tol=2e-2)


def _reference_with_lse(q, k, v, *, scale, window):
    """(o, lse [B, N, T]) in float32 from the definition."""
    T, N = q.shape[1], q.shape[2]
    k_full, v_full = (jnp.repeat(x.astype(jnp.float32), N // k.shape[2], axis=2) for x in (k, v))
    s = jnp.einsum("BTNH,BSNH->BNTS", q.astype(jnp.float32), k_full, precision="highest") * scale
    t, key = jnp.arange(T)[:, None], jnp.arange(T)[None, :]
    s = jnp.where((key <= t) & ((t - key < window) if window else True), s, -jnp.inf)
    lse = jax.nn.logsumexp(s, axis=-1)
    o = jnp.einsum("BNTS,BSNH->BTNH", jnp.exp(s - lse[..., None]), v_full, precision="highest")
    return o.astype(q.dtype), lse


def test_hopper_forward_feeds_the_triton_backward(monkeypatch):
    """The Mosaic GPU forward hands its output and [B, N, T] log-sum-exp to the Triton backward. Its kernel
    needs a Hopper GPU (no interpreter runs it), so here the definition stands in for it and the Triton
    backward (interpreted) must still give the reference gradients: the residual plumbing is what is tested."""
    calls = []

    def stand_in(q, k, v, *, scale, window):
        calls.append((scale, window))
        return _reference_with_lse(q, k, v, scale=scale, window=window)

    monkeypatch.setattr(flash_hopper_forward, "forward", stand_in)
    monkeypatch.setattr(flash_module, "use_hopper_forward", lambda *a, **kw: True)
    _check("pallas_gpu", T=37, N=6, K=2, H=16, window=7, use_sinks=False, use_segments=False,
           dtype=jnp.float32, tol=1e-5)
    assert calls and all(c == (0.25, 7) for c in calls)


def _backward_from_residuals(q, k, v, o, lse, do, *, scale, window):
    """dq, dk, dv from the forward's output and [B, N, T] log-sum-exp, by the flash-attention backward's
    formulas written out in float32 (P = exp(S - lse), dS = P (dP - rowsum(O dO)))."""
    T, G = q.shape[1], q.shape[2] // k.shape[2]
    f32 = lambda x: x.astype(jnp.float32)
    k_full, v_full = (jnp.repeat(f32(x), G, axis=2) for x in (k, v))
    s = jnp.einsum("BTNH,BSNH->BNTS", f32(q), k_full, precision="highest") * scale
    t, key = jnp.arange(T)[:, None], jnp.arange(T)[None, :]
    p = jnp.where((key <= t) & ((t - key < window) if window else True), jnp.exp(s - lse[..., None]), 0)
    dp = jnp.einsum("BTNH,BSNH->BNTS", f32(do), v_full, precision="highest")
    ds = p * (dp - jnp.einsum("BTNH,BTNH->BNT", f32(o), f32(do))[..., None])
    dq = jnp.einsum("BNTS,BSNH->BTNH", ds, k_full, precision="highest") * scale
    per_head = lambda x: x.reshape(*x.shape[:2], k.shape[2], G, x.shape[-1]).sum(3)
    dk = per_head(jnp.einsum("BNTS,BTNH->BSNH", ds, f32(q), precision="highest")) * scale
    dv = per_head(jnp.einsum("BNTS,BTNH->BSNH", p, f32(do), precision="highest"))
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype)


@pytest.mark.parametrize("H", [64, 256])
def test_hopper_backward_gets_the_forwards_residuals(H, monkeypatch):
    """At head dim 64-256 the Mosaic GPU backward takes the forward's output and [B, N, T] log-sum-exp
    directly. Stand-ins (the definition forward, the written-out formulas backward) replace both kernels,
    which need a Hopper GPU; the gradients must match the reference's, so the residuals must arrive in the
    layout the backward reads."""
    calls = []

    def forward(q, k, v, *, scale, window):
        return _reference_with_lse(q, k, v, scale=scale, window=window)

    def backward(q, k, v, o, lse, do, *, scale, window):
        calls.append(lse.shape)
        return _backward_from_residuals(q, k, v, o, lse, do, scale=scale, window=window)

    monkeypatch.setattr(flash_hopper_forward, "forward", forward)
    monkeypatch.setattr(flash_hopper_backward, "backward", backward)
    monkeypatch.setattr(flash_module, "use_hopper_forward", lambda *a, **kw: True)
    _check("pallas_gpu", T=37, N=6, K=2, H=H, window=7, use_sinks=False, use_segments=False,
           dtype=jnp.float32, tol=1e-5)
    assert calls and all(shape == (B, 6, 37) for shape in calls)


def test_use_hopper_forward_rules(monkeypatch):
    compiled = Lowering("pallas_gpu", interpret=False)
    q = jnp.zeros((1, 8, 4, 128), jnp.bfloat16)
    fits = lambda lowering=compiled, q=q, sinks=False, segmented=False, block_sizes=None: \
        flash_module.use_hopper_forward(lowering, q, sinks=sinks, segmented=segmented, block_sizes=block_sizes)
    assert fits() == flash_hopper_forward.runs_on_this_device()   # False on CPU
    monkeypatch.setattr(flash_hopper_forward, "runs_on_this_device", lambda: True)
    assert fits() and fits(q=q[..., :64]) and fits(q=jnp.zeros((1, 8, 4, 256), jnp.float16))
    assert fits(q=jnp.zeros((1, 8, 4, 512), jnp.bfloat16))
    assert not fits(Lowering("pallas_gpu", interpret=True)) and not fits(Lowering("pallas_tpu"))
    assert not fits(sinks=True) and not fits(segmented=True) and not fits(block_sizes=FlashBlockSizes())
    assert not fits(q=q.astype(jnp.float32)) and not fits(q=q[..., :96])
    assert not fits(q=jnp.zeros((1, 8, 4, 320), jnp.bfloat16))
    hopper = flash_hopper_forward
    kv = [jnp.zeros((1, 64, 1, 128), jnp.bfloat16)] * 2
    with pytest.raises(ValueError, match="cluster=4 must divide the 6 query heads per kv head"):
        hopper.forward(jnp.zeros((1, 64, 6, 128), jnp.bfloat16), *kv, scale=1.0, window=0, cluster=4)
    with pytest.raises(ValueError, match="cluster=2 x heads_per_program=2 must divide the 6 query heads"):
        hopper.forward(jnp.zeros((1, 64, 6, 128), jnp.bfloat16), *kv, scale=1.0, window=0, heads_per_program=2)
    with pytest.raises(ValueError, match="heads_per_program > 1 takes head dim <= 128"):
        hopper.forward(jnp.zeros((1, 64, 4, 256), jnp.bfloat16), *[x.repeat(2, -1) for x in kv], scale=1.0,
                       window=0, heads_per_program=2)
    # two heads per program on sliding-window layers whose clusters leave an even number of heads
    assert hopper.default_heads_per_program(4096, 8, 128, window=512, cluster=2) == 2     # Laguna sliding
    assert hopper.default_heads_per_program(4096, 8, 128, window=0, cluster=2) == 1       # full causal
    assert hopper.default_heads_per_program(512, 8, 128, window=512, cluster=2) == 1      # window >= T
    assert hopper.default_heads_per_program(4096, 6, 128, window=512, cluster=2) == 1     # 3 heads per cluster
    assert hopper.default_heads_per_program(4096, 8, 256, window=512, cluster=2) == 1     # head dim 256


@pytest.mark.skipif(not flash_hopper_forward.runs_on_this_device(), reason="the kernel needs a Hopper GPU")
@pytest.mark.parametrize("T,N,K,H,window,cluster,heads_per_program", [
    (300, 6, 2, 128, 0, None, None), (300, 6, 2, 128, 100, None, None), (256, 4, 1, 64, 0, None, None),
    (200, 2, 1, 256, 64, None, None), (130, 8, 8, 128, 0, None, None), (200, 2, 1, 512, 0, None, None),
    (256, 4, 2, 512, 100, None, None), (256, 8, 2, 512, 100, 4, None), (300, 8, 1, 128, 100, 4, None),
    (200, 8, 2, 256, 0, 1, None), (384, 8, 1, 128, 0, 2, 4), (1000, 16, 2, 128, 300, None, None)])
def test_hopper_forward_on_gpu(T, N, K, H, window, cluster, heads_per_program, monkeypatch):
    """Compiled on a Hopper GPU: output and log-sum-exp against the definition (query heads sharing K/V loads
    in clusters of 1, 2 and 4; by default two heads per program on the windowed d-128 calls with an even
    number of heads per cluster, four where asked), and gradients through `flash_attention`'s backward
    (Mosaic GPU's at d 64-256, Triton's at 512) against the reference."""
    q, k, v, _, _ = _inputs(T, N, K, H, jnp.bfloat16)
    o, lse = flash_hopper_forward.forward(q, k, v, scale=H ** -0.5, window=window, cluster=cluster,
                                          heads_per_program=heads_per_program)
    o_ref, lse_ref = _reference_with_lse(q, k, v, scale=H ** -0.5, window=window)
    assert float(jnp.max(jnp.abs(o.astype(jnp.float32) - o_ref.astype(jnp.float32)))) <= 2e-2
    assert float(jnp.max(jnp.abs(lse - lse_ref))) <= 1e-4
    calls = []
    real_forward = flash_hopper_forward.forward
    monkeypatch.setattr(flash_hopper_forward, "forward",
                        lambda *a, **kw: calls.append(1) or real_forward(*a, **kw))
    _check("pallas_gpu", T=T, N=N, K=K, H=H, window=window, use_sinks=False, use_segments=False,
           dtype=jnp.bfloat16, tol=2e-2, blocks=None)
    assert calls, "the Mosaic GPU forward did not run"


@pytest.mark.skipif(not flash_hopper_forward.runs_on_this_device(), reason="the kernel needs a Hopper GPU")
@pytest.mark.parametrize("T,N,K,H,window,cluster", [
    (384, 4, 2, 128, 0, None), (300, 6, 2, 128, 100, None), (256, 4, 1, 64, 0, None), (130, 8, 8, 128, 0, None),
    (500, 8, 2, 128, 192, 4), (384, 4, 2, 256, 0, None), (300, 6, 2, 256, 100, None), (500, 8, 1, 256, 192, 4)])
def test_hopper_backward_on_gpu(T, N, K, H, window, cluster):
    """Compiled on a Hopper GPU: the Mosaic GPU backward's dq, dk, dv from the kernel forward's residuals
    against the written-out formulas on the definition's output and log-sum-exp."""
    q, k, v, _, do = _inputs(T, N, K, H, jnp.bfloat16)
    do = do.astype(jnp.bfloat16)
    o, lse = flash_hopper_forward.forward(q, k, v, scale=H ** -0.5, window=window)
    got = flash_hopper_backward.backward(q, k, v, o, lse, do, scale=H ** -0.5, window=window, cluster=cluster)
    o_ref, lse_ref = _reference_with_lse(q, k, v, scale=H ** -0.5, window=window)
    want = _backward_from_residuals(q, k, v, o_ref, lse_ref, do, scale=H ** -0.5, window=window)
    for name, g, w in zip("qkv", got, want):
        assert g.shape == w.shape and g.dtype == jnp.bfloat16
        g32, w32 = g.astype(jnp.float32), w.astype(jnp.float32)
        err = float(jnp.max(jnp.abs(g32 - w32)) / (1.0 + float(jnp.max(jnp.abs(w32)))))
        assert err <= 2e-2, f"d{name}: {err}"
    with pytest.raises(ValueError, match="head dim"):
        flash_hopper_backward.backward(*(x[..., :32] for x in (q, k, v, o)), lse, do[..., :32], scale=1.0,
                                       window=window)


@pytest.mark.parametrize("bq,bk,groups,tokens,window", [(16, 16, 2, 70, 0), (16, 16, 1, 70, 33), (64, 32, 8, 200, 0),
                                                       (32, 64, 3, 150, 100), (16, 8, 4, 41, 17)])
def test_blocks_seen_whole_need_no_mask(bq, bk, groups, tokens, window):
    """The kernels skip the mask on the blocks of `whole_key_blocks` / `whole_row_blocks`: every key of those
    blocks must be visible to every real row of the block they pair with; the masked rest covers the walk."""
    from pallas_kernels.flash_blocks import key_block_range, row_block_range, whole_key_blocks, whole_row_blocks
    n_rows, n_keys = -(-tokens * groups // bq), -(-tokens // bk)
    visible = lambda t, s: s <= t < tokens and (not window or t - s < window)
    kw = dict(bq=bq, bk=bk, groups=groups, window=window)
    unmasked = 0
    for i in range(n_rows):
        lo, hi = map(int, key_block_range(i, tokens=tokens, **kw))
        a, b = map(int, whole_key_blocks(i, lo, hi, **kw))
        assert lo <= a <= b <= hi
        rows = [t for t in range(i * bq // groups, (i * bq + bq - 1) // groups + 1) if t < tokens]
        assert all(visible(t, s) for j in range(a, b) for s in range(j * bk, j * bk + bk) for t in rows)
        unmasked += b - a
    for j in range(n_keys):
        lo, hi = map(int, row_block_range(j, tokens=tokens, n_row_blocks=n_rows, **kw))
        a, b = map(int, whole_row_blocks(j, lo, hi, **kw))
        assert lo <= a <= b <= hi
        for i in range(a, b):
            rows = [t for t in range(i * bq // groups, (i * bq + bq - 1) // groups + 1) if t < tokens]
            assert all(visible(t, s) for s in range(j * bk, j * bk + bk) for t in rows)
        unmasked += b - a
    assert unmasked > 0   # the shapes above all have blocks seen whole


def test_window_skips_blocks_so_cost_is_flat_in_length():
    from pallas_kernels.flash_blocks import key_block_range
    visited = [int(np.subtract(*key_block_range(i, bq=64, bk=64, groups=8, tokens=65536, window=512)[::-1]))
               for i in (100, 4000, 8000)]
    assert visited == [visited[0]] * 3 and visited[0] <= 512 // 64 + 2


@pytest.mark.parametrize("bad,message", [
    (dict(k=jnp.ones((B, 9, 3, 8)), v=jnp.ones((B, 9, 3, 8))), "multiple of the 3 kv heads"),
    (dict(v=jnp.zeros((B, 7, 2, 8))), "key tokens"),
    (dict(sinks_N=jnp.zeros((3,))), "sinks_N"),
    (dict(segment_ids_BT=jnp.zeros((B, 8), jnp.int32)), "segment_ids_BT"),
    (dict(window=-1), "window"),
    (dict(q=jnp.zeros((B, 9, 4, 520)), k=jnp.zeros((B, 9, 2, 520)), v=jnp.zeros((B, 9, 2, 520))), "512"),
])
def test_bad_input_names_the_problem(bad, message):
    args = dict(q=jnp.ones((B, 9, 4, 8)), k=jnp.ones((B, 9, 2, 8)), v=jnp.ones((B, 9, 2, 8)))
    args.update(bad)
    q, k, v = args.pop("q"), args.pop("k"), args.pop("v")
    with pytest.raises(ValueError, match=message):
        flash_attention(q, k, v, scale=1.0, impl="pallas_gpu", **args)


def test_dispatch_table_on_cpu():
    q, k = jnp.ones((1, 8, 4, 16)), jnp.ones((1, 8, 2, 16))
    assert attention_backend("xla", q, k, default_positions=True) == "reference"
    assert attention_backend("auto", q, k, default_positions=True) == "reference"
    assert attention_backend("pallas", q, k, default_positions=True) == "flash"
    assert attention_backend("pallas", q, k, default_positions=False) == "reference"
    with pytest.raises(ValueError, match="softcap"):
        attention_backend("pallas", q, k, softcap=50.0, default_positions=True)


def test_dispatch_table_on_gpu(monkeypatch):
    """The GPU rows of the table, read with jax.default_backend() reporting "gpu" (shapes only)."""
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    monkeypatch.setattr(attention, "cudnn_max_head_dim", lambda: 128)   # before Hopper
    shaped = lambda B, T, N, H, dtype=jnp.bfloat16: jax.ShapeDtypeStruct((B, T, N, H), dtype)
    auto = lambda q, k, **kw: attention_backend("auto", q, k, default_positions=True, **kw)
    assert auto(shaped(1, 4096, 8, 128), shaped(1, 4096, 2, 128)) == "cudnn"
    assert auto(shaped(1, 4096, 8, 128), shaped(1, 4096, 2, 128), sinks_N=jnp.zeros(8)) == "flash"
    assert auto(shaped(1, 4096, 8, 256), shaped(1, 4096, 1, 256), window=512) == "flash"
    # head_dim 512, full causal: our kernel's value and XLA's gradient while its float32 logits fit 8 GiB
    assert auto(shaped(8, 4096, 8, 512), shaped(8, 4096, 1, 512)) == "flash_xla_vjp"   # 4 GiB of logits
    assert auto(shaped(8, 4096, 8, 512), shaped(8, 4096, 1, 512), sinks_N=jnp.zeros(8)) == "reference"
    assert auto(shaped(1, 65536, 8, 512), shaped(1, 65536, 1, 512)) == "flash"    # 128 GiB
    assert auto(shaped(1, 4096, 8, 512), shaped(1, 4096, 1, 512), window=1024) == "flash"
    assert auto(shaped(1, 4096, 8, 128), shaped(1, 4096, 2, 128), segment_ids_BT=jnp.ones((1, 4096))) == "flash"
    # from Hopper on, cuDNN also takes head_dim 256, on calls of at least CUDNN_WIDE_HEAD_MIN_TOKENS tokens
    monkeypatch.setattr(attention, "cudnn_max_head_dim", lambda: 256)
    assert auto(shaped(1, 4096, 8, 256), shaped(1, 4096, 1, 256), window=512) == "flash"
    assert auto(shaped(4, 4096, 8, 256), shaped(4, 4096, 1, 256), window=512) == "cudnn"
    assert auto(shaped(1, 16384, 8, 256), shaped(1, 16384, 2, 256), window=1024) == "cudnn"
    assert auto(shaped(4, 4096, 8, 512), shaped(4, 4096, 1, 512), window=1024) == "flash"
    # sliding-window layers that our Hopper kernel runs both ways (16-bit, head dim 64/128/256) leave cuDNN
    laguna_sliding = dict(q=shaped(1, 4096, 64, 128), k=shaped(1, 4096, 8, 128), window=512)
    assert auto(**laguna_sliding) == "cudnn"      # not on a Hopper GPU
    monkeypatch.setattr(flash_hopper_forward, "runs_on_this_device", lambda: True)
    assert auto(**laguna_sliding) == "flash"
    assert auto(shaped(1, 4096, 64, 128), shaped(1, 4096, 8, 128)) == "cudnn"                 # full causal
    assert auto(shaped(1, 512, 64, 128), shaped(1, 512, 8, 128), window=512) == "cudnn"       # window >= T
    assert auto(shaped(4, 4096, 8, 256), shaped(4, 4096, 1, 256), window=512) == "flash"      # head dim 256
    assert auto(shaped(1, 16384, 8, 256), shaped(1, 16384, 2, 256), window=1024) == "flash"
    assert auto(shaped(1, 16384, 8, 256), shaped(1, 16384, 2, 256)) == "cudnn"                # full causal


def test_kernel_value_with_reference_gradient():
    """"flash_xla_vjp": the value comes from our kernel (its forward alone in the program), the gradient
    from the reference (no kernel in the differentiated program), both equal to the reference's."""
    q, k, v, _, cot = _inputs(T=24, N=4, K=2, H=32, dtype=jnp.float32)
    pos = jnp.broadcast_to(jnp.arange(24), (B, 24))
    attend = lambda backend: lambda q, k, v: attention._fused_attention(backend, q, k, v, None, None, window=0,
                                                                       scale=0.2)
    mask = attention_mask(pos, pos)
    want = reference_attention(q, k, v, mask, scale=0.2)
    got = attend("flash_xla_vjp")(q, k, v)
    np.testing.assert_allclose(got, want, atol=1e-5)
    np.testing.assert_allclose(got, attend("flash")(q, k, v), atol=1e-6)
    loss = lambda fn: lambda q, k, v: jnp.sum(fn(q, k, v) * cot)
    grads = jax.grad(loss(attend("flash_xla_vjp")), argnums=(0, 1, 2))(q, k, v)
    want_grads = jax.grad(loss(lambda q, k, v: reference_attention(q, k, v, mask, scale=0.2)), argnums=(0, 1, 2))(
        q, k, v)
    for g, w in zip(grads, want_grads):
        np.testing.assert_allclose(g, w, atol=1e-5)
    assert set(_kernel_grids(jax.make_jaxpr(attend("flash_xla_vjp"))(q, k, v).jaxpr)) == {"flash_attention_forward"}
    assert not _kernel_grids(jax.make_jaxpr(jax.grad(loss(attend("flash_xla_vjp"))))(q, k, v).jaxpr)


def test_dispatch_table_on_tpu(monkeypatch):
    """The TPU rows of the table, read with jax.default_backend() reporting "tpu" (shapes only)."""
    monkeypatch.setattr(jax, "default_backend", lambda: "tpu")
    shaped = lambda B, T, N, H, dtype=jnp.bfloat16: jax.ShapeDtypeStruct((B, T, N, H), dtype)
    auto = lambda q, k, **kw: attention_backend("auto", q, k, default_positions=True, **kw)
    assert auto(shaped(1, 4096, 8, 256), shaped(1, 4096, 1, 256), window=512) == "splash"
    assert auto(shaped(1, 640, 8, 512), shaped(1, 640, 1, 512)) == "splash"
    assert auto(shaped(1, 4000, 8, 256), shaped(1, 4000, 1, 256)) == "flash"      # T % 128
    assert auto(shaped(1, 4096, 8, 64), shaped(1, 4096, 2, 64)) == "flash"        # head_dim % 128
    assert auto(shaped(1, 4096, 8, 128), shaped(1, 4096, 2, 128), sinks_N=jnp.zeros(8)) == "flash"
    assert auto(shaped(1, 4096, 8, 128), shaped(1, 4096, 2, 128), segment_ids_BT=jnp.ones((1, 4096))) == "flash"
    assert auto(shaped(1, 4096, 8, 128), shaped(1, 4096, 2, 128), softcap=50.0) == "reference"
    assert attention_backend("auto", shaped(1, 4096, 8, 128), shaped(1, 4096, 2, 128)) == "reference"
    assert attention_backend("pallas", shaped(1, 4096, 8, 128), shaped(1, 4096, 2, 128),
                             default_positions=True) == "flash"


# (T, window, dtype, tol): splash runs in blocks of 128 here (5 x 5 and 3 x 3; T = 640 once failed: a
# 512-block must divide T), so causal skips future blocks and window 77 also whole blocks on the left; GQA
# 4 q / 2 kv heads, head_dim 128, batch 2. The bf16 error is mostly splash having no logit scale: q * scale
# is rounded to bf16 before the kernel.
SPLASH_CASES = [(640, 77, jnp.float32, 1e-5), (384, 0, jnp.bfloat16, 1e-2)]


@pytest.mark.parametrize("T,window,dtype,tol", SPLASH_CASES)
def test_splash_attention_under_tpu_interpreter(T, window, dtype, tol):
    """Our splash_attention wrapper (layout, scale, window, GQA) against the reference, forward and
    d(q, k, v), under the TPU interpreter (which fills unwritten memory with NaN)."""
    from jax.experimental.pallas import tpu as pltpu
    q, k, v, _, cot = _inputs(T, 4, 2, 128, dtype, seed=5)
    pos = jnp.broadcast_to(jnp.arange(T), (B, T))
    mask = attention_mask(pos, pos, window=window)
    scale = 0.3    # not head_dim ** -0.5, so a dropped or doubled scale shows

    def ours(q, k, v):
        return splash_attention(q, k, v, window=window, scale=scale, interpret=pltpu.InterpretParams())

    def ref(q, k, v):   # float32 throughout on the same (rounded) inputs
        f32 = lambda x: x.astype(jnp.float32)
        return reference_attention(f32(q), f32(k), f32(v), mask, scale=scale)

    out = ours(q, k, v)
    assert out.shape == q.shape and out.dtype == q.dtype
    assert bool(jnp.all(jnp.isfinite(out.astype(jnp.float32)))), "unwritten or NaN outputs"
    expected = ref(q, k, v)
    err = float(jnp.max(jnp.abs(out.astype(jnp.float32) - expected)) / (1.0 + jnp.max(jnp.abs(expected))))
    assert err <= tol, err

    loss = lambda fn: lambda *a: jnp.sum(fn(*a).astype(jnp.float32) * cot)
    got = jax.grad(loss(ours), argnums=(0, 1, 2))(q, k, v)
    want = jax.grad(loss(ref), argnums=(0, 1, 2))(q, k, v)
    for name, g, w in zip("qkv", got, want):
        g32, w32 = g.astype(jnp.float32), w.astype(jnp.float32)
        assert g.dtype == dtype and bool(jnp.all(jnp.isfinite(g32))), f"d{name} has NaNs"
        err = float(jnp.max(jnp.abs(g32 - w32)) / (1.0 + float(jnp.max(jnp.abs(w32)))))
        assert err <= tol, f"d{name}: {err}"


def test_dot_product_attention_pallas_matches_xla():
    T = 13
    q, k, v, sinks, _ = _inputs(T, 4, 2, 8, jnp.float32, seed=3)
    pos = jnp.broadcast_to(jnp.arange(T), (B, T))
    seg = _segments(T)
    kw = dict(q_positions_BT=pos, kv_positions_BS=pos, window=4, q_segment_ids_BT=seg, kv_segment_ids_BS=seg,
              scale=0.5, sinks_N=sinks, default_positions=True)
    got = dot_product_attention(q, k, v, impl="pallas", **kw)
    want = dot_product_attention(q, k, v, impl="xla", **kw)
    real = (seg != 0)[:, :, None, None]
    assert float(jnp.max(jnp.abs(jnp.where(real, got - want, 0)))) <= 1e-5


# ---- family level: the parity models, "pallas" (interpret mode) against "xla" ------------------------------

def _same_logits(path, ids, **call):
    import zoo
    from flax import nnx
    run = nnx.jit(lambda m, ids_BT: m(ids_BT, **call))
    xla = np.asarray(run(zoo.from_hf(str(path), dtype="float32", attention_impl="xla"), jnp.asarray(ids)))
    pallas = np.asarray(run(zoo.from_hf(str(path), dtype="float32", attention_impl="pallas"), jnp.asarray(ids)))
    assert np.isfinite(pallas).all()
    assert np.abs(pallas - xla).max() <= 1e-4, np.abs(pallas - xla).max()


def test_gemma4_pallas_matches_xla(tmp_path):
    from tests.test_gemma4_parity import DENSE, _hf_model
    _hf_model(DENSE, seed=1).save_pretrained(tmp_path)
    _same_logits(tmp_path, np.random.default_rng(0).integers(0, DENSE["vocab_size"], size=(2, 17)))


def test_laguna_pallas_matches_xla(tmp_path):
    from tests.test_laguna_parity import PER_HEAD, SEQ, _hf_model
    _hf_model(PER_HEAD, seed=1).save_pretrained(tmp_path)
    _same_logits(tmp_path, np.random.default_rng(0).integers(0, PER_HEAD["vocab_size"], size=(2, SEQ)))


def test_zaya1_pallas_matches_xla(tmp_path):
    from tests.test_zaya1_parity import IDS, ODD_SHAPE, _hf_model
    _hf_model(ODD_SHAPE, 1, IDS).save_pretrained(tmp_path)
    _same_logits(tmp_path, IDS)
