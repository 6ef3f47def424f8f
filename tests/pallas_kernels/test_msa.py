"""Memory Sparse Attention kernels against the pure-JAX references (interpret mode for Triton, the TPU
interpreter for Mosaic): routing chunk scores and their gradients (mean and max head reduction, a short
query row), document top-k with ties, attention over [memory; own] and its gradients (partial and empty
memory, window, sinks, GQA), all at sizes that are not multiples of the blocks; the references against
direct numpy loops; one-line errors; and that both lowerings lower for their real platform."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import (MsaBlockSizes, msa_attention, msa_attention_reference, msa_chunk_scores,
                            msa_chunk_scores_reference, msa_route)
from pallas_kernels.msa import unambiguous_chunks
from tests.pallas_kernels.conftest import TOL

BLOCKS = MsaBlockSizes(block_t=8, block_c=16, block_q=16, block_kv=8)
B, T, N, K, H = 2, 21, 4, 2, 16          # T: 3 token blocks (the last partial), rows T * G = 42 -> 3 row blocks


def normal(key, shape, dtype=jnp.float32):
    return jax.random.normal(jax.random.key(key), shape, jnp.float32).astype(dtype)


def unit(x):
    return (x / jnp.linalg.norm(x.astype(jnp.float32), axis=-1, keepdims=True)).astype(x.dtype)


# ---------------------------------------------------------------------------------------------- routing
def _scores_and_grads(impl, head_reduce, valid_B):
    @jax.jit
    def run(q, k, probe):
        scores, vjp = jax.vjp(lambda q, k: msa_chunk_scores(q, k, valid_B=valid_B, head_reduce=head_reduce,
                                                            impl=impl, block_sizes=BLOCKS), q, k)
        return scores, vjp(probe)
    return run


@pytest.mark.parametrize("impl,head_reduce,dtype", [("pallas_gpu", "mean", jnp.float32),
                                                    ("pallas_gpu", "max", jnp.float32),
                                                    ("pallas_gpu", "mean", jnp.bfloat16),
                                                    ("pallas_tpu", "max", jnp.float32),
                                                    ("pallas_tpu", "mean", jnp.bfloat16)])
def test_chunk_scores_and_gradients_match_reference(impl, head_reduce, dtype, assert_close):
    """37 chunks = 3 blocks of 16 (the last partial); row 1 has 9 valid query tokens of 21."""
    q, k = unit(normal(0, (B, T, N, H), dtype)), unit(normal(1, (37, K, H), dtype))
    valid_B = jnp.array([T, 9], jnp.int32)
    probe = jnp.where(unambiguous_chunks(q, k, valid_B, head_reduce=head_reduce), normal(2, (B, 37)), 0.0)
    scores, grads = _scores_and_grads(impl, head_reduce, valid_B)(q, k, probe)
    ref, ref_grads = _scores_and_grads("xla", head_reduce, valid_B)(q, k, probe)
    assert scores.shape == (B, 37) and scores.dtype == jnp.float32
    assert_close(scores, ref, TOL[dtype], "scores")
    for name, g, r in zip(("dq", "dk"), grads, ref_grads):
        assert g.dtype == r.dtype == dtype, name
        assert_close(g, r, TOL[dtype], name)
    assert np.abs(np.asarray(grads[0][1, 9:], np.float32)).max() == 0, "a padding query got a gradient"


def test_route_ties_keep_the_lowest_document_and_scores_match():
    """Documents 1, 3 and 4 hold the same best chunk (equal scores): the top-k lists them in id order; a
    row without query tokens scores -inf everywhere. The routing loss's gradient matches the reference's."""
    q, k = unit(normal(3, (B, T, N, H))), unit(normal(4, (40, K, H)))
    doc_C = jnp.array(np.repeat(np.arange(6), [5, 8, 3, 9, 7, 8]), jnp.int32)
    best = int(np.argmax(np.asarray(msa_chunk_scores_reference(q, k)[0])))
    for first in (5, 16, 25):                       # a chunk of documents 1, 3, 4
        k = k.at[first].set(k[best])
    valid_B = jnp.array([T, 0], jnp.int32)
    route = lambda impl: jax.jit(lambda q, k: msa_route(q, k, doc_C, 6, 4, valid_B=valid_B, impl=impl,
                                                        block_sizes=BLOCKS))
    doc_BM, top_BK = route("pallas_gpu")(q, k)
    ref_BM, ref_top = route("xla")(q, k)
    np.testing.assert_allclose(doc_BM, ref_BM, rtol=1e-5, atol=1e-6)
    assert top_BK.dtype == jnp.int32 and top_BK.shape == (B, 4)
    np.testing.assert_array_equal(top_BK[0, :3], [1, 3, 4])
    np.testing.assert_array_equal(top_BK, ref_top)
    assert np.all(np.isneginf(np.asarray(doc_BM[1])))

    def info_nce(impl, q, k):     # one positive document per row, temperature 0.1
        scores_BM = msa_route(q, k, doc_C, 6, 2, impl=impl, block_sizes=BLOCKS)[0] / 0.1
        return -jnp.sum(jax.nn.log_softmax(scores_BM, axis=-1)[jnp.arange(B), jnp.array([2, 5])])

    grads = jax.jit(jax.grad(lambda q, k: info_nce("pallas_gpu", q, k), argnums=(0, 1)))(q, k)
    ref_grads = jax.grad(lambda q, k: info_nce("xla", q, k), argnums=(0, 1))(q, k)
    for g, r in zip(grads, ref_grads):
        np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-5)


def test_routing_reference_matches_a_numpy_loop():
    q, k = normal(5, (2, 5, 4, 8)), normal(6, (7, 2, 8))
    doc_C = np.array([0, 0, 1, 1, 1, 3, 3], np.int32)
    valid = np.array([5, 3])
    qn, kn = np.asarray(q, np.float64), np.asarray(k, np.float64)
    for head_reduce, reduce in (("mean", np.mean), ("max", np.max)):
        expected = np.full((2, 7), -np.inf)
        for b in range(2):
            for c in range(7):
                for t in range(valid[b]):
                    dots = [qn[b, t, n] @ kn[c, n // 2] for n in range(4)]
                    expected[b, c] = max(expected[b, c], reduce(dots))
        scores = jax.jit(msa_chunk_scores_reference, static_argnames="head_reduce")(
            q, k, valid_B=jnp.array(valid, jnp.int32), head_reduce=head_reduce)
        np.testing.assert_allclose(scores, expected, rtol=1e-5, atol=1e-6)
    doc_BM, top_BK = jax.jit(lambda q, k: msa_route(q, k, jnp.array(doc_C), 4, 3, impl="xla"))(q, k)
    chunk_BC = np.asarray(jax.jit(msa_chunk_scores_reference)(q, k))
    for b in range(2):
        per_doc = [max((s for s, d in zip(chunk_BC[b], doc_C) if d == m), default=-np.inf) for m in range(4)]
        np.testing.assert_allclose(doc_BM[b], per_doc, rtol=1e-6)
        np.testing.assert_array_equal(top_BK[b], np.argsort(-np.array(per_doc), kind="stable")[:3])


# -------------------------------------------------------------------------------------------- attention
def _attention_inputs(dtype, C=13):
    q, k, v = normal(10, (B, T, N, H), dtype), normal(11, (B, T, K, H), dtype), normal(12, (B, T, K, H), dtype)
    mem_k, mem_v = normal(13, (B, C, K, H), dtype), normal(14, (B, C, K, H), dtype)
    return q, k, v, mem_k, mem_v, normal(15, (N,))


def _attention_and_grads(impl, count_B, window, with_sinks):
    @jax.jit
    def run(q, k, v, mem_k, mem_v, sinks, probe):
        def attend(q, k, v, mem_k, mem_v, sinks):
            return msa_attention(q, k, v, mem_k, mem_v, count_B, window=window,
                                 sinks_N=sinks if with_sinks else None, impl=impl, block_sizes=BLOCKS)
        out, vjp = jax.vjp(attend, q, k, v, mem_k, mem_v, sinks)
        return out, vjp(probe.astype(out.dtype))
    return run


@pytest.mark.parametrize("impl,dtype,window,sinks", [("pallas_gpu", jnp.float32, 0, False),
                                                     ("pallas_gpu", jnp.bfloat16, 5, True),
                                                     ("pallas_tpu", jnp.float32, 5, True)])
def test_attention_and_gradients_match_reference(impl, dtype, window, sinks, assert_close):
    """13 memory chunks (2 key blocks of 8), row 0 sees 11 of them (a partial block), row 1 none; 21 own
    tokens; G = 2 query heads per kv head."""
    args = _attention_inputs(dtype)
    count_B = jnp.array([11, 0], jnp.int32)
    probe = normal(16, (B, T, N, H))
    out, grads = _attention_and_grads(impl, count_B, window, sinks)(*args, probe)
    ref, ref_grads = _attention_and_grads("xla", count_B, window, sinks)(*args, probe)
    assert out.dtype == dtype and out.shape == (B, T, N, H)
    assert_close(out, ref, TOL[dtype], "out")
    for name, g, r in zip(("dq", "dk", "dv", "dmem_k", "dmem_v", "dsinks"), grads, ref_grads):
        assert g.dtype == r.dtype, name
        assert_close(g, r, TOL[dtype], name)
    assert np.all(np.asarray(grads[3][0, 11:], np.float32) == 0) and np.all(np.asarray(grads[3][1]) == 0)


def test_attention_reference_matches_a_numpy_loop():
    q, k, v, mem_k, mem_v, sinks = _attention_inputs(jnp.float32, C=5)
    count, window, scale = np.array([5, 2]), 3, 0.3
    out = jax.jit(lambda *a: msa_attention_reference(*a, jnp.array(count, jnp.int32), window=window, sinks_N=sinks,
                                                     scale=scale))(q, k, v, mem_k, mem_v)
    qn, kn, vn, mkn, mvn, sn = (np.asarray(x, np.float64) for x in (q, k, v, mem_k, mem_v, sinks))
    expected = np.zeros(out.shape)
    for b in range(B):
        for t in range(T):
            for n in range(N):
                kv = n // (N // K)
                keys = [mkn[b, c, kv] for c in range(count[b])] + [kn[b, s, kv] for s in range(t + 1)
                                                                 if t - s < window]
                vals = [mvn[b, c, kv] for c in range(count[b])] + [vn[b, s, kv] for s in range(t + 1)
                                                                 if t - s < window]
                logits = np.array([scale * qn[b, t, n] @ key for key in keys] + [sn[n]])
                p = np.exp(logits - logits.max())
                p /= p.sum()
                expected[b, t, n] = p[:-1] @ np.array(vals)
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------------------------- errors
def test_bad_inputs_fail_with_one_line_naming_the_problem():
    q, k = normal(0, (B, T, N, H)), normal(1, (37, K, H))
    doc_C = jnp.zeros((37,), jnp.int32)
    cases = [(lambda: msa_chunk_scores(q[0], k), "q must be 4-d"),
             (lambda: msa_chunk_scores(q, k[:, :, :8]), "k has shape"),
             (lambda: msa_chunk_scores(q, jnp.zeros((0, K, H))), "memory bank is empty"),
             (lambda: msa_chunk_scores(q, normal(1, (37, 3, H))), "not a multiple of the 3 kv heads"),
             (lambda: msa_chunk_scores(q, k, head_reduce="sum"), "head_reduce must be one of"),
             (lambda: msa_route(q, k, doc_C, 4, 5), "top_k=5 is more than the 4 documents"),
             (lambda: msa_route(q, k, doc_C[:5], 4, 2), "doc_C has shape"),
             (lambda: msa_attention(*_attention_inputs(jnp.float32)[:4], normal(1, (B, 12, K, H))),
              "mem_v has shape"),
             (lambda: msa_attention(q, *_attention_inputs(jnp.float32)[1:5], jnp.zeros((3,), jnp.int32)),
              "mem_count_B has shape")]
    for call, message in cases:
        with pytest.raises(ValueError, match=message) as error:
            call()
        assert "\n" not in str(error.value)


@pytest.mark.parametrize("impl,platform", [("pallas_gpu", "cuda"), ("pallas_tpu", "tpu")], ids=["triton", "mosaic"])
def test_lowers_for_the_real_platform(impl, platform):
    """Routing (with the loss's gradient) and attention forward + backward go through the Triton / Mosaic
    lowering at Qwen3-like heads (32 q / 8 kv heads of 128, bf16). Compiling needs the device."""
    bf16 = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.bfloat16)

    def f(q, k, v, mem_k, mem_v, bank_k, doc_C):
        route = lambda q, bank_k: msa_route(q, bank_k, doc_C, 16, 4, impl=impl, interpret=False)
        loss = lambda q, bank_k: route(q, bank_k)[0].sum()
        attend = lambda *a: msa_attention(*a, window=64, impl=impl, interpret=False).sum(dtype=jnp.float32)
        return route(q, bank_k)[1], jax.grad(loss, (0, 1))(q, bank_k), jax.grad(attend, (0, 1, 2, 3, 4))(
            q, k, v, mem_k, mem_v)

    exported = jax.export.export(
        jax.jit(f), platforms=[platform],
        disabled_checks=[jax.export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")],
    )(bf16(1, 128, 32, 128), bf16(1, 128, 8, 128), bf16(1, 128, 8, 128), bf16(1, 256, 8, 128),
      bf16(1, 256, 8, 128), bf16(512, 8, 128), jax.ShapeDtypeStruct((512,), jnp.int32))
    assert ("__gpu$xla.gpu.triton" if platform == "cuda" else "tpu_custom_call") in exported.mlir_module()
