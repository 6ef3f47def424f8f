"""Memory Sparse Attention: pooling, scoring and selection against direct numpy loops, the layer and its
gradients against an independent per-token reference, the encoding pass, training, the memory bank."""
from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from layers.context import LayerContext
from layers.msa import MemorySparseAttention, PooledMemory, pool_chunks, route_scores, select_documents
from layers.rope import RopeSpec, apply_rope


def _loop_pool(x, lengths, P):
    B, L = x.shape[:2]
    C = -(-L // P)
    out, valid = np.zeros((B, C, *x.shape[2:])), np.zeros((B, C), bool)
    for b in range(B):
        for c in range(C):
            tokens = [x[b, s] for s in range(c * P, min((c + 1) * P, L)) if s < lengths[b]]
            if tokens:
                out[b, c], valid[b, c] = np.mean(tokens, axis=0), True
    return out, valid


def test_pooling_partial_chunks_and_restarts_match_a_loop():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(4, 37, 2, 3)).astype(np.float32)
    lengths = np.array([37, 16, 5, 33])   # ends mid-chunk, on a boundary, in the first chunk, mid-chunk
    got, valid = pool_chunks(jnp.asarray(x), jnp.asarray(lengths), 8)
    want, want_valid = _loop_pool(x, lengths, 8)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(valid), want_valid)
    assert want_valid.sum(1).tolist() == [5, 2, 1, 5]


def _loop_scores(q, qmask, k, valid, reduce):
    B, T, N, H = q.shape
    _, M, C, K, _ = k.shape
    unit = lambda v: v / np.linalg.norm(v)
    scores = np.full((B, M), -1e9)
    for b in range(B):
        kb = k[0] if k.shape[0] == 1 else k[b]
        for m in range(M):
            for c in range(C):
                if not valid[0 if valid.shape[0] == 1 else b, m, c]:
                    continue
                for t in range(T):
                    if not qmask[b, t]:
                        continue
                    cos = [unit(q[b, t, n]) @ unit(kb[m, c, n // (N // K)]) for n in range(N)]
                    scores[b, m] = max(scores[b, m], np.mean(cos) if reduce == "mean" else np.max(cos))
    return scores


@pytest.mark.parametrize("reduce,shared", [("mean", False), ("max", True)])
def test_scores_and_selection_match_a_loop(reduce, shared):
    rng = np.random.default_rng(1)
    B, T, N, K, H, M, C = 2, 5, 4, 2, 3, 6, 3
    q = rng.normal(size=(B, T, N, H)).astype(np.float32)
    k = rng.normal(size=(1 if shared else B, M, C, K, H)).astype(np.float32)
    valid = rng.random((k.shape[0], M, C)) < 0.7
    valid[:, 2] = False   # a document without a real chunk never wins
    qmask = rng.random((B, T)) < 0.6
    qmask[:, 0] = True
    got = np.asarray(route_scores(jnp.asarray(q), jnp.asarray(qmask), jnp.asarray(k), jnp.asarray(valid),
                                  head_reduce=reduce))
    want = _loop_scores(q, qmask, k, valid, reduce)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    top = np.asarray(select_documents(jnp.asarray(got), 3))
    np.testing.assert_array_equal(top, np.argsort(-want, axis=1, kind="stable")[:, :3])
    assert 2 not in top
    with pytest.raises(ValueError, match="top-k 7"):
        select_documents(jnp.asarray(got), 7)


# ---- the layer against an independent reference ------------------------------------------------------

ROPE = RopeSpec(kind="default", theta=100.0)


def _layer(**kw):
    return MemorySparseAttention(16, 4, 2, 8, rope=ROPE, chunk_size=4, top_k=2, query_offset=10, qk_norm=False,
                                 rngs=nnx.Rngs(params=3), **kw)


def _memory(rng, B, M=4, C=2, K=2, H=8):
    arr = lambda: jnp.asarray(rng.normal(size=(B, M, C, K, H)).astype(np.float32))
    valid = rng.random((B, M, C)) < 0.8
    valid[:, :, 0] = True
    return PooledMemory(arr(), jnp.asarray(valid), arr(), arr())


def _reference(p, x, mem: PooledMemory, prefix, route_mask, chosen_by_row=None):
    """Row by row, written differently from the layer: kv heads repeated to the query heads, cosines of
    explicitly normalised vectors, the two best documents by numpy sorting (or `chosen_by_row`), their
    real chunks gathered by boolean indexing, and one masked softmax over [chunks; own tokens]."""
    B, T, _ = x.shape
    N, K, H = 4, 2, 8
    kv_head = np.arange(N) // (N // K)
    valid = np.asarray(mem.valid_BMC)
    unit = lambda a: a / jnp.linalg.norm(a, axis=-1, keepdims=True)
    out, all_scores = [], []
    for b in range(B):
        pos = (np.arange(T) + 10 * (np.arange(T) >= prefix[b]))[None]
        q = apply_rope(jnp.einsum("td,dnh->tnh", x[b], p["q_proj"])[None], pos, ROPE)[0]
        k = apply_rope(jnp.einsum("td,dkh->tkh", x[b], p["k_proj"])[None], pos, ROPE)[0][:, kv_head]
        v = jnp.einsum("td,dkh->tkh", x[b], p["v_proj"])[:, kv_head]
        rq = unit(jnp.einsum("td,dnh->tnh", x[b], p["router_q"]))
        rk = unit(mem.router_k_BMCKH[b][:, :, kv_head])                      # [M, C, N, H]
        cos = jnp.einsum("tnh,mcnh->tnmc", rq, rk).mean(1)                   # [T, M, C]
        ok = route_mask[b][:, None, None] & valid[b][None]
        scores = jnp.where(ok, cos, -1e9).max(axis=(0, 2))
        all_scores.append(scores)
        chosen = (np.argsort(-np.asarray(scores), kind="stable")[:2] if chosen_by_row is None
                  else np.asarray(chosen_by_row[b]))
        real = np.zeros(valid.shape[1:], bool)
        real[chosen] = valid[b][chosen]
        mem_k, mem_v = mem.k_BMCKH[b][real][:, kv_head], mem.v_BMCKH[b][real][:, kv_head]   # [S, N, H]
        keys, vals = jnp.concatenate([mem_k, k]), jnp.concatenate([mem_v, v])
        S = mem_k.shape[0]
        visible = np.zeros((T, S + T), bool)
        for t in range(T):
            visible[t, :S] = t >= prefix[b]
            visible[t, S:S + t + 1] = True
        logits = jnp.einsum("tnh,snh->nts", q, keys) / np.sqrt(H)
        w = jax.nn.softmax(jnp.where(visible[None], logits, -jnp.inf), axis=-1)
        out.append(jnp.einsum("nts,snh,nhd->td", w, vals, p["o_proj"]))
    return jnp.stack(out), jnp.stack(all_scores)


def _reference_choice(p, x, mem, prefix, route_mask):
    """The documents the reference picks (from its own scores, outside any differentiation)."""
    scores = np.asarray(_reference(p, x, mem, prefix, route_mask)[1])
    return [np.argsort(-scores[b], kind="stable")[:2] for b in range(x.shape[0])]


def test_layer_and_gradients_match_an_independent_reference():
    rng = np.random.default_rng(2)
    B, T = 2, 5
    layer = _layer()
    x = jnp.asarray(rng.normal(size=(B, T, 16)).astype(np.float32))
    mem = _memory(rng, B)
    prefix = np.array([0, 2])
    route_mask = np.arange(T)[None] >= prefix[:, None]
    route_mask[1, -1] = False
    cot = jnp.asarray(rng.normal(size=(B, T, 16)).astype(np.float32))
    graphdef, state = nnx.split(layer)
    p = nnx.to_pure_dict(state)

    def ours(p, x, arrays):
        mem = PooledMemory(arrays[0], valid, arrays[1], arrays[2])
        model = nnx.merge(graphdef, _state(state, p))
        ctx = LayerContext(jnp.broadcast_to(jnp.arange(T), (B, T)), msa_memory={0: mem},
                           msa_prefix_len_B=jnp.asarray(prefix), msa_route_mask_BT=jnp.asarray(route_mask))
        y = model.mix(x, ctx)
        return jnp.sum(y * cot) + jnp.sum(ctx.msa_routing[0].doc_scores_BM ** 2), (y, ctx.msa_routing[0])

    def theirs(p, x, arrays):
        y, scores = _reference(p, x, PooledMemory(arrays[0], valid, arrays[1], arrays[2]), prefix, route_mask,
                               chosen)
        return jnp.sum(y * cot) + jnp.sum(scores ** 2), y

    valid, arrays = mem.valid_BMC, (mem.router_k_BMCKH, mem.k_BMCKH, mem.v_BMCKH)
    chosen = _reference_choice(p, x, mem, prefix, route_mask)
    (v1, (y1, routing)), g1 = jax.jit(jax.value_and_grad(ours, argnums=(0, 1, 2), has_aux=True))(p, x, arrays)
    (v2, y2), g2 = jax.jit(jax.value_and_grad(theirs, argnums=(0, 1, 2), has_aux=True))(p, x, arrays)
    np.testing.assert_allclose(np.asarray(y1), np.asarray(y2), rtol=2e-4, atol=2e-5)
    np.testing.assert_allclose(float(v1), float(v2), rtol=1e-4)
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-3, atol=2e-5)
    np.testing.assert_array_equal(np.sort(np.asarray(routing.selected_Bk), 1), np.sort(chosen, 1))
    assert float(jnp.abs(g1[0]["router_q"]).sum()) > 0   # the router learns through the scores


def _state(state, p):
    state = jax.tree.map(lambda v: v, state)
    nnx.replace_by_pure_dict(state, p)
    return state


# ---- the model level: encoding pass, training, the bank ------------------------------------------------

def _micro_config():
    from configs.msa import get_config
    c = get_config("tiny")
    m = c.model
    m.d_model, m.head_dims, m.mlp_dim = 32, (8, 8), 64
    m.msa_chunk_size, m.msa_top_k, m.msa_max_doc_len = 8, 2, 48
    c.memory.num_docs, c.memory.doc_len = 4, 40
    c.train.batch_size, c.train.steps, c.train.eval_every, c.train.eval_batches = 2, 2, 2, 1
    c.train.log_every, c.train.checkpoint_every = 1, 2
    return c


@pytest.fixture(scope="module")
def micro():
    from zoo import data, memory, models
    c = _micro_config()
    corpus = data.load_corpus(c.data)
    return c, models.build(c.model, seed=1), memory.MemoryTask.from_config(c), corpus


def test_encoding_restarts_at_every_document(micro):
    """A document's pooled chunks do not depend on its row's padding or on the other documents: each is
    encoded at its own local positions."""
    from zoo import memory
    c, model, task, corpus = micro
    rng = np.random.default_rng(4)
    docs = rng.integers(3, 256, size=(3, 40)).astype(np.int32)
    lengths = np.array([40, 19, 8], np.int32)
    together = memory.encode_documents(model, jnp.asarray(docs), jnp.asarray(lengths))[1]
    for d in range(3):
        alone_doc = np.where(np.arange(40) < lengths[d], docs[d], 7)[None]   # other padding
        alone = memory.encode_documents(model, jnp.asarray(alone_doc), jnp.asarray(lengths[d:d + 1]))[1]
        n = int(alone.valid_BC.sum())
        assert n == -(-lengths[d] // 8)
        for field in ("k_BCKH", "v_BCKH", "router_k_BCKH"):
            np.testing.assert_allclose(np.asarray(getattr(together, field)[d, :n]),
                                       np.asarray(getattr(alone, field)[0, :n]), rtol=1e-5, atol=1e-5)


def test_routing_loss_decreases_on_a_fixed_batch(micro):
    import optax
    from zoo import memory
    c, model, task, corpus = micro
    b = {k: jnp.asarray(v) for k, v in memory.batch(task, corpus.train_N, seed=0, start=0, size=2).items()}
    graphdef, state = nnx.split(model)
    params = nnx.to_pure_dict(state)
    tx = optax.adam(1e-2)

    @jax.jit
    def step(params, opt):
        def loss(params):
            return memory.memory_loss(nnx.merge(graphdef, _state(state, params)), b, routing_weight=1.0,
                                      temperature=0.1)
        (value, parts), grads = jax.value_and_grad(loss, has_aux=True)(params)
        updates, opt = tx.update(grads, opt)
        return optax.apply_updates(params, updates), opt, parts

    opt, routing = tx.init(params), []
    for _ in range(8):
        params, opt, parts = step(params, opt)
        routing.append(float(parts["loss_routing"]))
    assert all(np.isfinite(routing)) and routing[-1] < 0.5 * routing[0], routing
    assert 0.0 <= float(parts["routing_recall"]) <= 1.0


def test_training_logs_routing_recall_and_answer_accuracy(micro, tmp_path):
    from zoo.train.trainer import METRICS_FILE, train
    c = _micro_config()
    train(c, str(tmp_path), interactive=False)
    rows = [json.loads(line) for line in open(tmp_path / METRICS_FILE)]
    last = rows[-1]
    assert last["step"] == 2
    for key in ("routing_recall", "answer_accuracy", "val_loss", "loss_routing", "train_routing_recall"):
        assert key in last and np.isfinite(last[key]), key
    assert 0.0 <= last["routing_recall"] <= 1.0


def test_bank_matches_in_memory_pooling_and_round_trips(micro, tmp_path):
    """Bank queries (router keys on the device, K/V fetched from host numpy per selection) give the logits
    of the same memory held whole on the device; save/load keeps them."""
    from zoo import memory
    c, model, task, corpus = micro
    ex = memory.make_example(task, corpus.val_N, seed=3, index=0)
    docs = [ex["docs_BML"][m, :ex["doc_lengths_BM"][m]] for m in range(task.num_docs)]
    bank = memory.MemoryBank.build(model, docs, batch_size=3)
    tokens, mask = ex["inputs_BT"][None], ex["route_mask_BT"][None]
    logits, routing = bank.query(model, tokens, mask)
    graphdef, state = nnx.split(model)
    encoded = jax.jit(lambda state, d, n: memory.encode_documents(nnx.merge(graphdef, state), d, n))(
        state, jnp.asarray(ex["docs_BML"]), jnp.asarray(ex["doc_lengths_BM"]))
    whole = {i: memory.memory_from_encoded(e, task.num_docs) for i, e in encoded.items()}
    want, want_routing = jax.jit(lambda state, t, w, m: memory.query_forward(nnx.merge(graphdef, state), t, w,
                                                                             route_mask_BT=m))(
        state, jnp.asarray(tokens), whole, jnp.asarray(mask))
    np.testing.assert_allclose(np.asarray(logits), np.asarray(want), rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(np.asarray(routing[1].selected_Bk), np.asarray(want_routing[1].selected_Bk))
    assert bank.device_bytes() > 0 and bank.host_bytes() == 2 * bank.content_k[1].nbytes
    bank.save(str(tmp_path / "bank.npz"))
    again = memory.MemoryBank.load(str(tmp_path / "bank.npz"), model.config)
    np.testing.assert_array_equal(np.asarray(again.query(model, tokens, mask)[0]), np.asarray(logits))



def test_bank_query_with_reinjection_matches_the_training_forward(micro):
    """Re-injection against a bank (numpy contexts, host-fetched memory) gives the logits of the training
    forward's re-injection (jnp contexts, in-device memory) on the same documents."""
    from zoo import memory
    c, model, task, corpus = micro
    ex = memory.make_example(task, corpus.val_N, seed=3, index=1)
    docs = [ex["docs_BML"][m, :ex["doc_lengths_BM"][m]] for m in range(task.num_docs)]
    bank = memory.MemoryBank.build(model, docs, batch_size=4)
    got, routing = memory.reinjected_query(model, bank, docs, ex["inputs_BT"][None], ex["route_mask_BT"][None], 2)
    b = {k: jnp.asarray(ex[k])[None] for k in memory.BATCH_KEYS}
    graphdef, state = nnx.split(model)
    forward = jax.jit(lambda state, b, n: memory.memory_forward(nnx.merge(graphdef, state), b, reinject_docs=n),
                      static_argnums=2)
    (want, want_routing), (plain, _) = forward(state, b, 2), forward(state, b, 0)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(np.asarray(routing[1].selected_Bk), np.asarray(want_routing[1].selected_Bk))
    assert np.abs(np.asarray(want) - np.asarray(plain)).max() > 1e-3   # the re-injected text is seen

def test_bank_errors_are_one_line(micro, tmp_path):
    from zoo import memory
    c, model, task, corpus = micro
    small = memory.MemoryBank.build(model, [np.ones(5, np.int32)])
    small.save(str(tmp_path / "b.npz"))
    other = c.model.copy_and_resolve_references()
    other.msa_top_k = 1
    cases = [
        (lambda: memory.MemoryBank.build(model, [np.ones(5, np.int32), np.ones(49, np.int32)]),
         r"^document 1 has 49 tokens; documents need 1..48 \(model.msa_max_doc_len\)$"),
        (lambda: memory.MemoryBank.build(model, []), "^the memory bank is empty"),
        (lambda: small.query(model, np.ones((1, 4), np.int32)),
         r"^top-k 2 \(model.msa_top_k of layer 1\) exceeds the 1 documents in the memory bank$"),
        (lambda: memory.MemoryBank.load(str(tmp_path / "b.npz"), other),
         "^the memory bank .*b.npz was saved by another model config"),
    ]
    for call, pattern in cases:
        with pytest.raises(ValueError, match=pattern) as e:
            call()
        assert "\n" not in str(e.value)


def test_bank_size_sweep_writes_its_files(micro, tmp_path):
    from zoo import memory
    c, model, task, corpus = micro
    rows = memory.bank_sweep(model, task, corpus.val_N, sizes=[200, 600], num_queries=3, seed=0, batch_size=2)
    assert [r["bank_docs"] for r in rows][0] < rows[1]["bank_docs"]
    for r in rows:
        assert set(r) == set(memory.SWEEP_FIELDS) and 0 <= r["routing_recall"] <= 1 and r["host_bytes"] > 0
        assert r["host_bytes"] > r["device_bytes"]   # pooled K and V on the host, router keys on the device
    paths = memory.write_sweep(rows, str(tmp_path / "sweep"))
    assert all(os.path.getsize(p) > 0 for p in paths)
    assert json.load(open(paths[0])) == rows


def test_without_memory_an_msa_layer_decodes_like_its_forward_pass(micro):
    from zoo import inference
    c, model, task, corpus = micro
    tokens = jnp.asarray(np.random.default_rng(5).integers(3, 256, size=(2, 9)), jnp.int32)
    cache = inference.init_cache(model, batch_size=2, max_len=12, dtype=jnp.float32)
    graphdef, state = nnx.split(model)
    extend = jax.jit(lambda state, t, cache: nnx.merge(graphdef, state).extend(t, cache))
    first, cache = extend(state, tokens[:, :5], cache)
    rest = []
    for t in range(5, 9):
        logits, cache = extend(state, tokens[:, t:t + 1], cache)
        rest.append(logits)
    want = jax.jit(lambda state, t: nnx.merge(graphdef, state)(t))(state, tokens)
    np.testing.assert_allclose(np.asarray(jnp.concatenate([first, *rest], 1)), np.asarray(want),
                               rtol=1e-4, atol=1e-4)


def test_pallas_layer_equals_xla_layer_with_gradients():
    """attention_impl='pallas' (the msa kernels, interpret mode on CPU) gives the pure-JAX layer's output,
    routing and gradients: per-row and shared memories, a prefix and a routing mask with holes."""
    rng = np.random.default_rng(6)
    B, T = 2, 5
    x = jnp.asarray(rng.normal(size=(B, T, 16)).astype(np.float32))
    cot = jnp.asarray(rng.normal(size=(B, T, 16)).astype(np.float32))
    route_mask = jnp.asarray([[True, False, True, True, False], [False, True, True, False, True]])
    for mem, prefix in ((_memory(rng, B), jnp.asarray([0, 2])), (_memory(rng, 1), None)):
        results = []
        for impl in ("xla", "pallas"):
            graphdef, state = nnx.split(_layer(impl=impl))

            def loss(state, x, arrays):
                ctx = LayerContext(jnp.broadcast_to(jnp.arange(T), (B, T)),
                                   msa_memory={0: PooledMemory(arrays[0], mem.valid_BMC, arrays[1], arrays[2])},
                                   msa_prefix_len_B=prefix, msa_route_mask_BT=route_mask)
                y = nnx.merge(graphdef, state).mix(x, ctx)
                routing = ctx.msa_routing[0]
                return jnp.sum(y * cot) + jnp.sum(routing.doc_scores_BM ** 2), (y, routing)

            arrays = (mem.router_k_BMCKH, mem.k_BMCKH, mem.v_BMCKH)
            results.append(jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(state, x, arrays))
        ((_, (y1, r1)), g1), ((_, (y2, r2)), g2) = results
        np.testing.assert_allclose(np.asarray(y2), np.asarray(y1), rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(np.asarray(r2.doc_scores_BM), np.asarray(r1.doc_scores_BM), rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(np.asarray(r2.selected_Bk), np.asarray(r1.selected_Bk))
        for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
            np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-3, atol=1e-5)


def test_reinjected_context_matches_a_loop():
    """The selected documents' real tokens in order, then the query, padded at the end; per-token query
    arrays placed at the query's start."""
    from zoo import memory
    rng = np.random.default_rng(7)
    B, M, L, T = 3, 4, 6, 5
    docs = rng.integers(3, 256, size=(B, M, L)).astype(np.int32)
    lengths = np.array([[6, 2, 4, 1], [3, 6, 5, 2], [1, 1, 6, 4]], np.int32)
    selected = np.array([[2, 0], [1, 3], [0, 1]], np.int32)
    query = rng.integers(3, 256, size=(B, T)).astype(np.int32)
    tokens, start = memory.reinjected_context(jnp.asarray(docs), jnp.asarray(lengths), jnp.asarray(selected),
                                              jnp.asarray(query))
    for b in range(B):
        want = np.concatenate([docs[b, m, :lengths[b, m]] for m in selected[b]] + [query[b]])
        want = np.pad(want, (0, 2 * L + T - len(want)))
        np.testing.assert_array_equal(np.asarray(tokens[b]), want)
        assert int(start[b]) == sum(lengths[b, m] for m in selected[b])
    placed = np.asarray(memory.place(jnp.asarray(query > 100), start, 2 * L + T, False))
    for b in range(B):
        assert placed[b].sum() == (query[b] > 100).sum()
        np.testing.assert_array_equal(placed[b, int(start[b]):int(start[b]) + T], query[b] > 100)


def _scripted_model(micro, script: dict[str, str]):
    """Test harness: the micro model with every attention and MLP output projection zeroed (each block
    adds nothing, so the next token depends only on the current one) and embedding / LM head set so that
    token a is followed by script[a]: a real Decoder whose greedy outputs follow a known bigram table."""
    from zoo import models
    c = micro[0]
    model = models.build(c.model, seed=1)
    state = nnx.state(model, nnx.Param)
    p = nnx.to_pure_dict(state)
    for block in p["blocks"].values():
        block["attn"]["o_proj"] = jnp.zeros_like(block["attn"]["o_proj"])
        block["mlp"]["down_proj"] = jnp.zeros_like(block["mlp"]["down_proj"])
    table, head = np.zeros(p["embed"]["table"].shape, np.float32), np.zeros(p["lm_head"].shape, np.float32)
    for i, (a, b) in enumerate(script.items()):
        table[ord(a), i] = 1.0
        head[i, ord(b)] = 10.0
    p["embed"]["table"], p["lm_head"] = jnp.asarray(table), jnp.asarray(head)
    nnx.replace_by_pure_dict(state, p)
    nnx.update(model, state)
    return model


def test_memory_interleave_appends_the_named_documents_and_stops(micro):
    """Hops: the question ('?') makes the model write "10,3" -> documents 10 and 3 appended; document 3
    ends with 'x', which makes it write "7" -> document 7 appended; document 7 ends with 'z', after which
    it emits the end-of-retrieval token. With max_hops=1 only the first hop runs. Each hop's routing is the
    bank's routing of that hop's context."""
    from zoo import memory
    END = 4
    model = _scripted_model(micro, {"?": "1", "1": "0", "0": ",", ",": "3", "3": "\n", "x": "7", "7": "\n",
                                    "z": chr(END)})
    rng = np.random.default_rng(8)
    docs = [rng.integers(ord("A"), ord("Z") + 1, size=int(rng.integers(10, 30))).astype(np.int32)
            for _ in range(12)]
    docs[3][-1], docs[7][-1] = ord("x"), ord("z")
    bank = memory.MemoryBank.build(model, docs, batch_size=12)
    question = np.frombuffer(b"QUESTION?", np.uint8).astype(np.int32)
    out = memory.memory_interleave(model, bank, docs, question, end_token=END, max_hops=5)
    assert out.hop_ids == [[10, 3], [7]] and out.stop == "end"
    contexts = [question, np.concatenate([question, docs[10], docs[3]])]
    np.testing.assert_array_equal(out.context, np.concatenate([contexts[1], docs[7]]))
    contexts.append(out.context)
    assert len(out.hop_routing) == 3
    for context, routing in zip(contexts, out.hop_routing):
        want = bank.query(model, context[None])[1]
        for i, selected in routing.items():
            np.testing.assert_array_equal(selected, np.asarray(want[i].selected_Bk[0]))
    short = memory.memory_interleave(model, bank, docs, question, end_token=END, max_hops=1)
    assert short.hop_ids == [[10, 3]] and short.stop == "max_hops"
    np.testing.assert_array_equal(short.context, contexts[1])
    assert memory.parse_doc_ids(np.frombuffer(b"#3, 12;3 x5", np.uint8), 12) == [3, 5]
