"""Self-speculative greedy decoding with a model's multi-token-prediction (MTP) modules (DeepSeek-V4).

Depth j (zoo.decoder.MTPModule) at position t reads h^{j-1}_t (the main model's last residual for
j = 1, else depth j-1's output at t) and the embedding of token t + j, and predicts token t + j + 1.
Each step, with token x confirmed at position p (not yet in the cache) and drafts d_1..d_k for
positions p+1..p+k (k = mtp_depth):

    verify   the main model extends the cache by [x, d_1, .., d_k] in one call: greedy g_0..g_k, g_i the
             token after position p+i
    accept   n = the number of leading drafts with d_{i+1} = g_i; emit g_0..g_n (n drafts + the main
             model's own next token), c = n + 1 tokens per row, whatever the others do
    rewind   the cache must hold x, d_1..d_n only: its lengths are reset, ring slots that rejected tokens
             overwrote come back from the snapshot taken before verification, compressed entries stay
             (one a rejected token completed is invisible until rewritten), and a compressor's pending
             window is rebuilt from the snapshot's and the verified one. Where that cannot be exact (a
             non-overlapping compressor whose window the chunk crossed needs the chunk's own tokens; a
             state of another kind; a chunk longer than a ring) the cache is rebuilt by extending the
             snapshot by the c committed tokens (a second main call, under `lax.cond`)
    draft    each depth runs over the c committed positions (its own cache advances with the main one),
             and its output at position p+n drafts the next step's tokens.

The emitted tokens are exactly plain greedy decoding's (the verify logits of accepted positions are the
main model's logits given those same tokens). Temperature sampling is not supported here.
Cache: {"main": zoo.inference's cache, "mtp": {"lengths_B", "layers": one attention cache per depth}}.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from layers import kinds
from layers.context import LayerContext
from zoo import inference
from zoo.decoder import Decoder


def _depth(model: Decoder) -> int:
    return len(model.mtp) if model.mtp is not None else 0


def init_mtp_cache(model: Decoder, *, batch_size: int, max_len: int, dtype) -> dict:
    """Empty caches of the MTP blocks' attention layers (layer indices num_layers + j)."""
    cfg, L = model.config, model.config.num_layers
    dtype = inference.resolve_cache_dtype(dtype, cfg)
    layers = tuple(jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype),
                                kinds.attention_cache(cfg, L + j, batch_size, max_len, dtype,
                                                      kind=cfg.mtp_attention_type))
                   for j in range(_depth(model)))
    return {"lengths_B": jnp.zeros((batch_size,), jnp.int32), "layers": layers}


def _mtp_extend(model: Decoder, h, mtp_cache, new_B, ahead):
    """Runs the depths one after the other over T positions from the MTP caches' lengths. `h`: the main
    residual there; `ahead(j, logits_BTV)` gives depth j's input tokens [B, T] (token t + j + 1 of row
    t), seeing depth j-1's logits (None for j = 0). Returns each depth's logits [B, T, V] and the caches
    advanced by new_B."""
    L = model.config.num_layers
    lengths_B = mtp_cache["lengths_B"]
    T = h.shape[1]
    positions_BT = lengths_B[:, None] + jnp.arange(T, dtype=jnp.int32)[None]
    compute_dtype = model.embed.table[...].dtype
    logits, layers = [], []
    for j, module in enumerate(model.mtp):
        caches = {L + j: mtp_cache["layers"][j]}
        ahead_BT = ahead(j, logits[-1] if logits else None)
        ctx = LayerContext(positions_BT, tokens_BT=ahead_BT, caches=caches, cache_lengths_B=lengths_B,
                           new_tokens_B=new_B)
        h = module(h, model.embed(ahead_BT), ctx)
        logits.append(model._logits(h, compute_dtype, module.hyper_head, module.final_norm))
        layers.append(caches[L + j])
    return logits, {"lengths_B": lengths_B + new_B, "layers": tuple(layers)}


def _draft(model: Decoder, h, known_BT, last_B, mtp_cache, new_B):
    """Advances the MTP caches over T positions and drafts from row `last_B`. known_BT [B, T]: the
    confirmed token after each position; depth j's input at row t is token t + j of the sequence
    known[0..last] followed by this step's drafts. Returns drafts [B, depth] and the caches."""
    B, T = known_BT.shape
    rows_B = jnp.arange(B)
    seq = [jnp.concatenate([known_BT, jnp.zeros((B, _depth(model)), jnp.int32)], axis=1)]
    drafts = []

    def ahead(j, logits_BTV):
        if j:   # depth j-1's draft, from its row `last`, joins the sequence after known[last]
            drafts.append(jnp.argmax(logits_BTV[rows_B, last_B], axis=-1).astype(jnp.int32))
            seq[0] = seq[0].at[rows_B, last_B + j].set(drafts[-1])
        return jax.lax.dynamic_slice_in_dim(seq[0], j, T, axis=1)

    logits, cache = _mtp_extend(model, h, mtp_cache, new_B, ahead)
    drafts.append(jnp.argmax(logits[-1][rows_B, last_B], axis=-1).astype(jnp.int32))
    return jnp.stack(drafts, axis=1), cache


RING_LEAVES = ("kv_BWH", "k_BSKH", "v_BSKH", "kv_BSKH")   # slot = position % slots (a full cache is a ring of max_len)
PENDING_LEAVES = ("pending_kv_BPF", "pending_gate_BPF")


def _rewind_ring(old_BS, new_BS, lengths_B, T, verify_B, commit_B):
    """new with the slots of positions L + commit .. L + verify - 1 (written by rejected tokens) as in old."""
    S = old_BS.shape[1]
    t_1T = jnp.arange(T)[None]
    rejected_BT = (t_1T >= commit_B[:, None]) & (t_1T < verify_B[:, None])
    slots_BT = jnp.where(rejected_BT, jnp.mod(lengths_B[:, None] + t_1T, S), S)   # S: dropped
    rows_B1 = jnp.arange(old_BS.shape[0])[:, None]
    return new_BS.at[rows_B1, slots_BT].set(old_BS[rows_B1, jnp.minimum(slots_BT, S - 1)], mode="drop")


def _rewind_pending(old_BP, new_BP, lengths_B, verify_B, commit_B, ratio: int, overlap: bool):
    """A compressor's pending window at L + commit from the one at L (old) and at L + verify (new): row r
    holds position w0 - O + r (w0 = R floor(length / R), O = R if overlapping); rows at or past the
    length are never read. Returns it and whether every needed row was found (else the chunk's tokens
    between L and the new window's start are needed, which neither holds)."""
    R, O = ratio, ratio if overlap else 0
    w0 = lambda n_B: n_B - jnp.mod(n_B, R)
    target_B = lengths_B + commit_B
    pos_BP = (w0(target_B) - O)[:, None] + jnp.arange(O + R)[None]
    new_start_B1 = (w0(lengths_B + verify_B) - O)[:, None]
    old_start_B1 = (w0(lengths_B) - O)[:, None]
    from_new_BP = pos_BP >= new_start_B1
    take = lambda a_BP, rows_BP: jnp.take_along_axis(a_BP, jnp.clip(rows_BP, 0, O + R - 1)[..., None], axis=1)
    out_BP = jnp.where(from_new_BP[..., None], take(new_BP, pos_BP - new_start_B1), take(old_BP, pos_BP - old_start_B1))
    needed_BP = pos_BP < target_B[:, None]
    missing_BP = needed_BP & ~from_new_BP & (pos_BP >= lengths_B[:, None])
    return out_BP, ~jnp.any(missing_BP, axis=1)


def _rewind(cfg, old: dict, new: dict, T: int, verify_B, commit_B):
    """The main cache after L + commit tokens, from the cache before verification (`old`, lengths L) and
    after the verify_B tokens of a chunk of T (`new`), where that is exact without running the model:
    rings get back the slots rejected tokens overwrote, compressed entries stay (one completed by a
    rejected token is invisible until its window completes again and rewrites it), pending windows are
    rebuilt from both. Returns it and, per row, whether it is exact (a leaf of another kind, a chunk longer
    than a ring, or a pending window that needs the chunk's middle tokens make it not)."""
    lengths_B = old["lengths_B"]
    exact_B = jnp.ones_like(commit_B, dtype=bool)
    layers = []
    for i, (old_l, new_l) in enumerate(zip(old["layers"], new["layers"])):
        kind = cfg.attention_types[i]
        ratio = kinds.option(cfg, f"{kind}_ratio", i) if kind in ("csa", "hca") else 0

        def leaf(path, o, n):
            nonlocal exact_B
            names = [getattr(k, "key", None) for k in path]
            if any(name in RING_LEAVES for name in names):
                if o.shape[1] < T:
                    exact_B = exact_B & False
                return _rewind_ring(o, n, lengths_B, T, verify_B, commit_B)
            if "entries_BCH" in names:
                return n
            if names[-1] in PENDING_LEAVES and ratio:
                out, ok_B = _rewind_pending(o, n, lengths_B, verify_B, commit_B, ratio, kind == "csa")
                exact_B = exact_B & ok_B
                return out
            exact_B = exact_B & False   # a state this rewind does not know
            return n

        layers.append(jax.tree_util.tree_map_with_path(leaf, old_l, new_l))
    return {"lengths_B": lengths_B + commit_B, "layers": tuple(layers)}, exact_B


def prefill(model: Decoder, cache: dict, prompt_BT, prompt_lengths_B, *, chunk: int):
    """Prefills the main and MTP caches with each row's prompt and drafts after the first new token.
    Returns (the first new token [B], drafts [B, depth], cache)."""
    B, T = prompt_BT.shape
    steps = -(-T // chunk)
    pad = lambda a: jnp.pad(a, [(0, 0), (0, steps * chunk - a.shape[1])]).reshape(B, steps, chunk).transpose(1, 0, 2)
    lengths_B = jnp.asarray(prompt_lengths_B, jnp.int32)
    depth = _depth(model)
    # token t + j (j = 1..depth) of each prompt position, 0 where the prompt has none yet
    ahead_BTD = jnp.stack([jnp.where(jnp.arange(T)[None] + j < lengths_B[:, None],
                                     jnp.pad(prompt_BT[:, j:], [(0, 0), (0, j)]), 0) for j in range(1, depth + 1)], -1)
    ahead_SBCD = jnp.pad(ahead_BTD, [(0, 0), (0, steps * chunk - T), (0, 0)]).reshape(
        B, steps, chunk, depth).transpose(1, 0, 2, 3)

    def step(carry, inputs):
        cache, last_BV, last_h = carry
        s, tokens_BC, ahead_BCD = inputs
        new_B = jnp.clip(lengths_B - s * chunk, 0, chunk)
        logits_BCV, h, main = model.extend(tokens_BC, cache["main"], new_B, return_hidden=True)
        # the MTP caches stop one short: the last prompt position needs the first new token
        _, mtp = _mtp_extend(model, h, cache["mtp"], jnp.clip(lengths_B - 1 - s * chunk, 0, chunk),
                             lambda j, _: ahead_BCD[:, :, j])
        at_B = jnp.clip(new_B - 1, 0, chunk - 1)
        here = lambda a: jnp.take_along_axis(a, at_B.reshape((B, 1) + (1,) * (a.ndim - 2)), axis=1)[:, 0]
        ends_B = new_B > 0
        last_BV = jnp.where(ends_B[:, None], here(logits_BCV), last_BV)
        last_h = jnp.where(ends_B.reshape((B,) + (1,) * (h.ndim - 2)), here(h), last_h)
        return ({"main": main, "mtp": mtp}, last_BV, last_h), None

    h_shape = jax.eval_shape(
        lambda: model.extend(prompt_BT[:, :1], cache["main"], lengths_B * 0, return_hidden=True)[1])
    init = (cache, jnp.zeros((B, model.vocab_size), jnp.float32), jnp.zeros(h_shape.shape[:1] + h_shape.shape[2:],
                                                                           h_shape.dtype))
    (cache, last_BV, last_h), _ = jax.lax.scan(step, init, (jnp.arange(steps), pad(prompt_BT), ahead_SBCD))
    first_B = jnp.argmax(last_BV, axis=-1).astype(jnp.int32)
    drafts_BK, mtp = _draft(model, last_h[:, None], first_B[:, None], jnp.zeros((B,), jnp.int32), cache["mtp"],
                            jnp.ones((B,), jnp.int32))
    return first_B, drafts_BK, {"main": cache["main"], "mtp": mtp}


def decode(model: Decoder, cache: dict, first_B, drafts_BK, *, max_new_tokens: int, stop_tokens=(), pad_id: int = 0
           ) -> tuple[jax.Array, dict]:
    """The greedy tokens [B, max_new_tokens] (first_B first) and counts over the loop (int32 scalars):
    drafts proposed and accepted, tokens emitted (all rows), main-model calls (verifications and
    re-runs), rewinds (steps where a row rejected a draft), re-runs (rewinds that had to extend the
    snapshot again) and steps."""
    B, K = drafts_BK.shape
    N = max_new_tokens
    stops = jnp.asarray(stop_tokens or (-1,), jnp.int32)
    out_BX = jnp.full((B, N + K + 1), pad_id, jnp.int32).at[:, 0].set(first_B)
    zero = jnp.int32(0)
    counts = {"drafted": zero, "accepted": zero, "emitted": zero, "main_calls": zero, "rewinds": zero,
              "reruns": zero, "steps": zero}

    def done(count_B, out_BX):
        stopped_B = jnp.any(jnp.isin(out_BX, stops) & (jnp.arange(N + K + 1)[None] < count_B[:, None]), axis=1)
        return (count_B >= N) | stopped_B

    def cond(state):
        return ~jnp.all(done(state[3], state[4]))

    def body(state):
        cache, x_B, drafts_BK, count_B, out_BX, counts = state
        live_B = ~done(count_B, out_BX)
        tokens_BT = jnp.concatenate([x_B[:, None], drafts_BK], axis=1)
        T = K + 1
        verify_B = jnp.where(live_B, T, 0)
        logits_BTV, h, verified = model.extend(tokens_BT, cache["main"], verify_B, return_hidden=True)
        g_BT = jnp.argmax(logits_BTV, axis=-1).astype(jnp.int32)
        n_B = jnp.sum(jnp.cumprod(drafts_BK == g_BT[:, :K], axis=1), axis=1).astype(jnp.int32)
        commit_B = jnp.where(live_B, n_B + 1, 0)
        rewound, exact_B = _rewind(model.config, cache["main"], verified, T, verify_B, commit_B)
        rerun = jnp.any((commit_B != verify_B) & ~exact_B)
        main = jax.lax.cond(rerun, lambda: model.extend(tokens_BT, cache["main"], commit_B)[1],
                            lambda: rewound)
        slots_BT = jnp.where(jnp.arange(T)[None] < commit_B[:, None], count_B[:, None] + jnp.arange(T)[None],
                             N + K + 1)
        out_BX = out_BX.at[jnp.arange(B)[:, None], slots_BT].set(g_BT, mode="drop")
        new_drafts_BK, mtp = _draft(model, h, g_BT, jnp.maximum(commit_B - 1, 0), cache["mtp"], commit_B)
        x_B = jnp.where(live_B, g_BT[jnp.arange(B), n_B], x_B)
        counts = {"drafted": counts["drafted"] + K * jnp.sum(live_B, dtype=jnp.int32),
                  "accepted": counts["accepted"] + jnp.sum(jnp.where(live_B, n_B, 0)),
                  "emitted": counts["emitted"] + jnp.sum(commit_B),
                  "main_calls": counts["main_calls"] + 1 + rerun.astype(jnp.int32),
                  "rewinds": counts["rewinds"] + jnp.any(commit_B != verify_B).astype(jnp.int32),
                  "reruns": counts["reruns"] + rerun.astype(jnp.int32),
                  "steps": counts["steps"] + 1}
        return {"main": main, "mtp": mtp}, x_B, new_drafts_BK, count_B + commit_B, out_BX, counts

    state = (cache, first_B, drafts_BK, jnp.ones((B,), jnp.int32), out_BX, counts)
    _, _, _, _, out_BX, counts = jax.lax.while_loop(cond, body, state)
    out_BN = out_BX[:, :N]
    after_stop_BN = jnp.cumsum(jnp.isin(out_BN, stops), axis=1) - jnp.isin(out_BN, stops) > 0
    return jnp.where(after_stop_BN, pad_id, out_BN), counts


@functools.partial(jax.jit, static_argnames=("graphdef", "chunk", "max_len", "max_new_tokens", "stop_tokens",
                                             "pad_id", "cache_dtype"))
def _generate(graphdef, state, prompt_BT, prompt_lengths_B, *, chunk, max_len, max_new_tokens, stop_tokens, pad_id,
              cache_dtype):
    model = nnx.merge(graphdef, state)
    B = prompt_BT.shape[0]
    dtype = cache_dtype or model.embed.table[...].dtype
    cache = {"main": inference.init_cache(model, batch_size=B, max_len=max_len, dtype=dtype),
             "mtp": init_mtp_cache(model, batch_size=B, max_len=max_len, dtype=dtype)}
    first_B, drafts_BK, cache = prefill(model, cache, prompt_BT, prompt_lengths_B, chunk=chunk)
    return decode(model, cache, first_B, drafts_BK, max_new_tokens=max_new_tokens, stop_tokens=stop_tokens,
                  pad_id=pad_id)


def generate_mtp(model: Decoder, prompt_ids, *, max_new_tokens: int, stop_tokens=(), prompt_lengths=None,
                 max_len: int | None = None, prefill_chunk: int = 256, pad_id: int = 0, cache_dtype=None,
                 return_stats: bool = False):
    """Greedy new token ids [B, N], equal to `zoo.generate(..., temperature=0)`'s, drafted by the model's
    MTP modules and verified by the main model. With `return_stats`, also {"acceptance_rate": accepted /
    drafted, "tokens_per_main_call" and "tokens_per_step" (tokens each row gains per main-model call and
    per step, the first token from the prefill not counted), and the raw counts} (host numbers)."""
    if _depth(model) == 0:
        raise ValueError("speculative decoding needs a model with MTP modules (model.mtp_depth > 0)")
    K = _depth(model)
    args, static = inference.prepare_generate(model, prompt_ids, max_new_tokens=max_new_tokens,
                                              stop_tokens=stop_tokens, prompt_lengths=prompt_lengths,
                                              max_len=max_len, prefill_chunk=prefill_chunk, pad_id=pad_id,
                                              cache_dtype=cache_dtype)
    graphdef, state, prompt_BT, lengths_B, _ = args
    needed = int(np.max(np.asarray(lengths_B))) + max_new_tokens + K   # verification runs K tokens ahead
    tokens_BN, counts = _generate(graphdef, state, prompt_BT, lengths_B, chunk=static["chunk"],
                                  max_len=max(static["max_len"], needed), max_new_tokens=max_new_tokens,
                                  stop_tokens=static["stop_tokens"], pad_id=pad_id, cache_dtype=static["cache_dtype"])
    if not return_stats:
        return tokens_BN
    c = {k: int(v) for k, v in counts.items()}
    rows = int(np.asarray(lengths_B).shape[0])
    return tokens_BN, dict(c, acceptance_rate=c["accepted"] / max(c["drafted"], 1),
                           tokens_per_main_call=c["emitted"] / max(rows * c["main_calls"], 1),
                           tokens_per_step=c["emitted"] / max(rows * c["steps"], 1))
