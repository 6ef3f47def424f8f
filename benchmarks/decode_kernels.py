"""Checks the decode kernels' GPU lowering against the references (asserting a tolerance) and times one
decode step (T = 1) against the pure-JAX decode path the layers use without them:

  dense   Gemma-4 `1b` full-attention layer shapes (8 query heads on 2 kv heads, head dim 512) over a full
          cache of 4K / 32K / 128K slots, batch 1 and 32: ms per step and GB/s of K and V read;
  sparse  DeepSeek-V4 `flash` CSA at 128K tokens (ratio 4: 32K entries, 64 heads of dim 512, window 128,
          64 index heads of dim 128, top-512): the indexer's top-k + window + selected entries, against
          attending every compressed entry densely (the same kernel, HCA-style) and the pure-JAX path.

    python benchmarks/decode_kernels.py              # on a GPU (bfloat16)
    python benchmarks/decode_kernels.py --smoke      # tiny shapes, float32, Pallas interpret mode on CPU
"""
from __future__ import annotations

import argparse
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks._timing import median_seconds  # noqa: E402
from configs.deepseek_v4 import get_config as deepseek_v4_config  # noqa: E402
from configs.gemma4 import get_config as gemma4_config  # noqa: E402
from layers.attention import dot_product_attention  # noqa: E402
from layers.compression import top_k_entries  # noqa: E402
from layers.sparse_attention import _attend  # noqa: E402
from pallas_kernels import compressed_decode_attention, decode_attention, indexer_decode_topk  # noqa: E402

TOL = {"bfloat16": 2e-2, "float32": 2e-4}


def _check(name: str, got, want, tol: float) -> float:
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    err = float(np.max(np.abs(got - want)) / max(1.0, float(np.max(np.abs(want)))))
    assert np.isfinite(got).all() and err <= tol, f"{name}: kernel differs from the reference by {err:.2e} > {tol}"
    return err


def dense_rows(sizes, batches, dtype, iters, impl):
    """Gemma-4 1b's full-attention layer: the kernel vs layers.attention's pure-JAX path, one new token."""
    m = gemma4_config("1b").model
    i = m.attention_types.index("full")
    N, K, H = m.num_heads[i], m.num_kv_heads[i], m.head_dims[i]
    print(f"\ndense decode, Gemma-4 1b full layer: N {N}, K {K}, H {H}, T 1, {dtype}")
    print(f"{'S':>7} {'B':>3} | {'kernel ms':>9} {'GB/s':>7} | {'pure-JAX ms':>11} {'GB/s':>7} | {'speedup':>7} "
          f"{'max err':>8}")
    for S in sizes:
        for B in batches:
            ks = jax.random.split(jax.random.key(S + B), 3)
            q = jax.random.normal(ks[0], (B, 1, N, H), dtype)
            k = jax.random.normal(ks[1], (B, S, K, H), dtype)   # drawn in their dtype: no float32 copy
            v = jax.random.normal(ks[2], (B, S, K, H), dtype)
            q_pos = jnp.full((B, 1), S - 1, jnp.int32)
            kv_pos = jnp.broadcast_to(jnp.arange(S, dtype=jnp.int32), (B, S))
            kernel = jax.jit(lambda q, k, v, qp, kp: decode_attention(q, k, v, qp, kp, impl=impl))
            pure = jax.jit(lambda q, k, v, qp, kp: dot_product_attention(
                q, k, v, q_positions_BT=qp, kv_positions_BS=kp, scale=H ** -0.5, impl="xla"))
            args = (q, k, v, q_pos, kv_pos)
            err = _check(f"dense S={S} B={B}", kernel(*args), pure(*args), TOL[dtype])
            t_kernel, t_pure = median_seconds(kernel, args, iters), median_seconds(pure, args, iters)
            gb = 2 * k.size * k.dtype.itemsize / 1e9
            print(f"{S:>7} {B:>3} | {t_kernel * 1e3:>9.3f} {gb / t_kernel:>7.0f} | {t_pure * 1e3:>11.3f} "
                  f"{gb / t_pure:>7.0f} | {t_pure / t_kernel:>6.1f}x {err:>8.1e}")
            del k, v


def sparse_rows(context, batches, dtype, iters, impl, preset):
    """DeepSeek-V4 CSA decode at `context` tokens: indexer top-k + window + selected entries (kernels) vs
    every entry attended densely (the kernel with all entries visible; the pure-JAX path)."""
    m = deepseek_v4_config(preset).model
    N, H, W, ratio = m.num_heads, m.head_dim, m.window, m.csa_ratio
    NI, HI, topk = m.index_heads, m.index_dim, m.index_top_k
    C = context // ratio
    print(f"\nDeepSeek-V4 {preset} CSA decode at {context} tokens: {C} entries, N {N}, H {H}, window {W}, "
          f"indexer {NI} x {HI}, top-{topk}, T 1, {dtype}")
    print(f"{'B':>3} | {'sparse ms':>9} | {'dense kernel ms':>15} {'speedup':>7} | {'pure-JAX ms':>11} {'speedup':>7} "
          f"| {'max err':>8}")
    for B in batches:
        ks = jax.random.split(jax.random.key(B), 7)
        normal = lambda key, shape: jax.random.normal(key, shape, dtype)
        q, ring = normal(ks[0], (B, 1, N, H)), normal(ks[1], (B, W + 1, H))
        entries, index_keys = normal(ks[2], (B, C, H)), normal(ks[3], (B, C, HI))
        index_q = normal(ks[4], (B, 1, NI, HI))
        weights = jax.random.normal(ks[5], (B, 1, NI), jnp.float32) * (HI * NI) ** -0.5
        sinks = jax.random.normal(ks[6], (N,), jnp.float32)
        L = context - 1                        # the new token's position: the cache is full
        q_pos = jnp.full((B, 1), L, jnp.int32)
        slot_W = jnp.arange(W, dtype=jnp.int32)
        ring_pos = (L - 1) - jnp.mod(L - 1 - slot_W, W)   # layers.kv_cache.ring_positions, then the chunk
        win_pos = jnp.broadcast_to(jnp.concatenate([ring_pos, jnp.asarray([L], jnp.int32)]), (B, W + 1))
        args = (q, ring, win_pos, q_pos, entries, index_q, index_keys, weights, sinks)

        def sparse(q, ring, win_pos, q_pos, entries, index_q, index_keys, weights, sinks):
            idx = indexer_decode_topk(index_q, index_keys, weights, q_pos, ratio=ratio, topk=topk, impl=impl)
            return compressed_decode_attention(q, ring, win_pos, q_pos, entries, sinks, window=W, indices_BTK=idx,
                                               impl=impl), idx

        def dense(q, ring, win_pos, q_pos, entries, index_q, index_keys, weights, sinks):
            return compressed_decode_attention(q, ring, win_pos, q_pos, entries, sinks, window=W, ratio=ratio,
                                               impl=impl)

        def pure(q, ring, win_pos, q_pos, entries, index_q, index_keys, weights, sinks):
            """What layers.sparse_attention's cached path does without kernels: scores of every entry,
            lax.top_k, a [T, C] selection mask and logits over every entry."""
            dots = jnp.einsum("BTNH,BCH->BTNC", index_q, index_keys, preferred_element_type=jnp.float32)
            scores = jnp.einsum("BTNC,BTN->BTC", jax.nn.relu(dots), weights)
            visible = jnp.arange(C)[None, None] < (q_pos[..., None] + 1) // ratio
            idx = top_k_entries(jnp.where(visible, scores, -jnp.inf), topk)
            selected = jnp.zeros((B, 1, C + 1), bool).at[jnp.arange(B)[:, None, None], 0,
                                                         jnp.where(idx >= 0, idx, C)].set(True)[..., :C]
            in_window = (win_pos[:, None] <= q_pos[..., None]) & (q_pos[..., None] - win_pos[:, None] < W)
            return _attend(q, [(ring, in_window), (entries, selected)], sinks, H ** -0.5), idx

        sparse_j, dense_j, pure_j = jax.jit(sparse), jax.jit(dense), jax.jit(pure)
        (out, idx), (ref, ref_idx) = sparse_j(*args), pure_j(*args)
        same = float(np.mean(np.sort(np.asarray(idx), -1) == np.sort(np.asarray(ref_idx), -1)))
        assert same >= 0.99, f"sparse B={B}: the indexer kernel's top-k agrees with lax.top_k on {same:.3f} only"
        err = _check(f"sparse B={B}", out, ref, TOL[dtype]) if same == 1.0 else float("nan")
        dense_ref = compressed_decode_attention(q, ring, win_pos, q_pos, entries, sinks, window=W, ratio=ratio,
                                                impl="xla")
        _check(f"dense entries B={B}", dense_j(*args), dense_ref, TOL[dtype])
        t_sparse, t_dense, t_pure = (median_seconds(f, args, iters) for f in (sparse_j, dense_j, pure_j))
        print(f"{B:>3} | {t_sparse * 1e3:>9.3f} | {t_dense * 1e3:>15.3f} {t_dense / t_sparse:>6.1f}x | "
              f"{t_pure * 1e3:>11.3f} {t_pure / t_sparse:>6.1f}x | {err:>8.1e}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="4096,32768,131072", help="dense cache slots")
    parser.add_argument("--batch_sizes", default="1,32")
    parser.add_argument("--context", type=int, default=131072, help="DeepSeek-V4 tokens in the cache")
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--smoke", action="store_true", help="tiny shapes, float32, interpret mode (any platform)")
    args = parser.parse_args(argv)
    dtype, preset = "bfloat16", "flash"
    if args.smoke:
        args.sizes, args.batch_sizes, args.context, args.iters = "77", "1,2", 512, 1
        dtype, preset = "float32", "tiny"
    sizes = [int(s) for s in args.sizes.split(",")]
    batches = [int(b) for b in args.batch_sizes.split(",")]
    print(f"device: {jax.devices()[0].device_kind}")
    with jax.default_matmul_precision("highest" if dtype == "float32" else "default"):
        dense_rows(sizes, batches, dtype, args.iters, "pallas_gpu")
        sparse_rows(args.context, batches, dtype, args.iters, "pallas_gpu", preset)


if __name__ == "__main__":
    main()
