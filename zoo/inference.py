"""Decoding: each layer kind's cache, chunked prefill, a jitted decode loop, sampling and `generate`.

The cache is a pytree of fixed-shape arrays: {"lengths_B": int32 [B] (tokens cached per row), "layers": one
entry per layer, as its attention kind describes it (layers.kinds.attention_cache; `{}` for a KV-shared
layer)}. Prefill and decode run the model's own blocks (`Decoder.extend`): a prompt goes in as chunks of
`prefill_chunk` tokens, then one token per step inside a `lax.while_loop`, so a (batch, max_len, chunk)
compiles once. Rows advance by their own counts: a prompt shorter than the longest one stops feeding
when it ends, and a row that sampled a stop token stops consuming.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental import io_callback

from layers import kinds
from zoo import dtypes
from zoo.decoder import Decoder


def cache_spec(config, *, batch_size: int, max_len: int, dtype=jnp.float32) -> dict:
    """The cache's shapes and dtypes (jax.ShapeDtypeStruct leaves), from a model config alone."""
    if batch_size < 1 or max_len < 1:
        raise ValueError(f"batch_size and max_len must be >= 1, got {batch_size} and {max_len}")
    dtype = resolve_cache_dtype(dtype, config)
    layers = tuple(kinds.attention_cache(config, i, batch_size, max_len, dtype) for i in range(config.num_layers))
    return {"lengths_B": jax.ShapeDtypeStruct((batch_size,), jnp.int32), "layers": layers}


# A float8 cache stores entries in the model's native cache precision (fp8 with block scales, bf16 RoPE
# part, fp4 index keys: layers.kv_cache.packed_spec); only the kinds that define one take it.
FP8_CACHE, FP8_KINDS = "float8_e4m3fn", ("swa", "csa", "hca")


def resolve_cache_dtype(dtype, config=None) -> jnp.dtype:
    """The cache's dtype: a parameter dtype (zoo.dtypes) or "float8_e4m3fn" (for a config whose every
    attention kind is one of FP8_KINDS)."""
    if isinstance(dtype, str) and dtype.strip().lower() == FP8_CACHE or (
            not isinstance(dtype, str) and np.dtype(dtype) == np.dtype(jnp.float8_e4m3fn)):
        kinds_used = set(config.attention_types) if config is not None else set()
        if config is not None and config.get("mtp_depth", 0):
            kinds_used.add(config.mtp_attention_type)
        if not kinds_used <= set(FP8_KINDS):
            raise ValueError(f"cache dtype {FP8_CACHE} needs every attention kind to be one of {FP8_KINDS} "
                             f"(DeepSeek-V4 layers), got {sorted(kinds_used - set(FP8_KINDS))}")
        return jnp.dtype(jnp.float8_e4m3fn)
    try:
        return jnp.dtype(dtypes.to_jnp(dtype, "cache dtype"))
    except ValueError:
        raise ValueError(f"unknown cache dtype {dtype!r}; expected one of {list(dtypes.NAMES) + [FP8_CACHE]}"
                         ) from None


def cache_dtype_name(dtype, config=None) -> str:
    """`resolve_cache_dtype`'s canonical name (a hashable static argument)."""
    return resolve_cache_dtype(dtype, config).name


def init_cache(model_or_config, *, batch_size: int, max_len: int, dtype=None) -> dict:
    """An empty cache for `batch_size` rows of up to `max_len` tokens (zeros; under `jax.eval_shape` only
    shapes), for a model, its model config or a full config. `dtype` defaults to the model's parameter
    dtype (a config's `dtype`)."""
    config = model_or_config.config if isinstance(model_or_config, Decoder) else model_or_config
    if "model" in config:   # a full config (train/data/model sections)
        config = config.model
    if dtype is None:
        dtype = _param_dtype(model_or_config) if isinstance(model_or_config, Decoder) else config.get("dtype", "float32")
    spec = cache_spec(config, batch_size=batch_size, max_len=max_len, dtype=dtype)
    return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), spec)


def cache_bytes(cache) -> int:
    """Bytes of a cache (or its spec), per-row lengths included."""
    return int(sum(np.prod(x.shape) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(cache)))


# Leaves that hold keys, values or compressed entries (k_eq_v layers: one kv_BSKH), or their packed parts
# (what zoo.analysis's kv_cache_bytes counts); every other leaf is per-sequence state: row lengths, a
# compressor's pending window, CCA's convolution inputs.
KV_LEAVES = ("k_BSKH", "v_BSKH", "kv_BSKH", "kv_BWH", "entries_BCH", "values_fp8", "scales_e8m0", "rope_bf16",
             "codes_fp4x2")


def cache_bytes_by_part(cache) -> dict[str, int]:
    """{"kv": bytes of keys/values/entries, "state": the rest} of a cache or its spec."""
    parts = {"kv": 0, "state": 0}
    for path, leaf in jax.tree_util.tree_flatten_with_path(cache)[0]:
        name = getattr(path[-1], "key", None)
        parts["kv" if name in KV_LEAVES else "state"] += int(np.prod(leaf.shape)) * jnp.dtype(leaf.dtype).itemsize
    return parts


def layer_cache_bytes(cache) -> list[int]:
    """Bytes each layer's entry holds."""
    return [cache_bytes(layer) for layer in cache["layers"]]


def _param_dtype(model: Decoder):
    return model.embed.table[...].dtype


# ---- sampling --------------------------------------------------------------------------------------------

def sample(logits_BV: jax.Array, key: jax.Array, *, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0
           ) -> jax.Array:
    """int32 [B]: greedy (temperature 0: the first maximal logit) or a draw from softmax(logits / T) kept
    to the top_k most likely tokens (0: all) and the smallest set whose probability reaches top_p."""
    if temperature == 0.0:
        return jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
    logits_BV = logits_BV.astype(jnp.float32) / temperature
    if top_k:
        kth_B1 = jax.lax.top_k(logits_BV, top_k)[0][:, -1:]
        logits_BV = jnp.where(logits_BV < kth_B1, -jnp.inf, logits_BV)
    if top_p < 1.0:
        sorted_BV = jnp.sort(logits_BV, axis=-1)[:, ::-1]
        probs_BV = jax.nn.softmax(sorted_BV, axis=-1)
        before_BV = jnp.cumsum(probs_BV, axis=-1) - probs_BV      # mass of the more likely tokens
        keep_BV = before_BV < top_p                               # the most likely token always stays
        cutoff_B1 = jnp.min(jnp.where(keep_BV, sorted_BV, jnp.inf), axis=-1, keepdims=True)
        logits_BV = jnp.where(logits_BV < cutoff_B1, -jnp.inf, logits_BV)
    return jax.random.categorical(key, logits_BV, axis=-1).astype(jnp.int32)


# ---- prefill and decode ----------------------------------------------------------------------------------

def prefill(model: Decoder, cache: dict, prompt_BT: jax.Array, prompt_lengths_B: jax.Array, *, chunk: int
            ) -> tuple[jax.Array, dict]:
    """Runs each row's first prompt_lengths_B tokens of prompt_BT into the cache, `chunk` tokens per
    step of a `lax.scan` (memory bounded by the chunk). Returns the logits [B, V] at each row's last
    prompt token and the cache."""
    B, T = prompt_BT.shape
    steps = -(-T // chunk)
    tokens_SBC = jnp.pad(prompt_BT, [(0, 0), (0, steps * chunk - T)]).reshape(B, steps, chunk).transpose(1, 0, 2)
    lengths_B = jnp.asarray(prompt_lengths_B, jnp.int32)
    V = model.vocab_size

    def step(carry, inputs):
        cache, last_BV = carry
        s, tokens_BC = inputs
        new_B = jnp.clip(lengths_B - s * chunk, 0, chunk)
        logits_BCV, cache = model.extend(tokens_BC, cache, new_B)
        at_B = jnp.clip(new_B - 1, 0, chunk - 1)
        here_BV = jnp.take_along_axis(logits_BCV, at_B[:, None, None], axis=1)[:, 0]
        last_BV = jnp.where((new_B > 0)[:, None], here_BV, last_BV)
        return (cache, last_BV), None

    (cache, last_BV), _ = jax.lax.scan(step, (cache, jnp.zeros((B, V), jnp.float32)),
                                       (jnp.arange(steps), tokens_SBC))
    return last_BV, cache


def decode(model: Decoder, cache: dict, logits_BV: jax.Array, key: jax.Array, *, max_new_tokens: int,
           stop_tokens: tuple[int, ...] = (), pad_id: int = 0, on_token=None, **sampling) -> jax.Array:
    """Samples max_new_tokens tokens per row, the first from `logits_BV`, each next one from the model
    run one token further inside a `lax.while_loop`; after a stop token a row emits `pad_id` and its
    cache no longer grows. `on_token(tokens_B)` (optional) receives each step's tokens on the host, in
    order, as they are produced. Returns int32 [B, N]."""
    return decode_with_cache(model, cache, logits_BV, key, max_new_tokens=max_new_tokens, stop_tokens=stop_tokens,
                             pad_id=pad_id, on_token=on_token, **sampling)[0]


def decode_with_cache(model: Decoder, cache: dict, logits_BV: jax.Array, key: jax.Array, *, max_new_tokens: int,
                      stop_tokens: tuple[int, ...] = (), pad_id: int = 0, on_token=None, **sampling
                      ) -> tuple[jax.Array, dict]:
    """`decode`'s tokens [B, N] and the cache after them. Without `on_token` the loop never returns to
    the host between steps."""
    B = logits_BV.shape[0]
    stops = jnp.asarray(stop_tokens or (-1,), jnp.int32)

    def emit(n, logits_BV, done_B, out_BN, key):
        key, draw = jax.random.split(key)
        token_B = jnp.where(done_B, pad_id, sample(logits_BV, draw, **sampling))
        if on_token is not None:
            io_callback(on_token, None, token_B, ordered=True)
        return token_B, done_B | jnp.isin(token_B, stops), out_BN.at[:, n].set(token_B), key

    def cond(state):
        n, done_B = state[0], state[3]
        return (n < max_new_tokens) & ~jnp.all(done_B)

    def body(state):   # feed the last token (rows that stopped feed nothing), sample the next
        n, cache, token_B, done_B, out_BN, key = state
        logits_B1V, cache = model.extend(token_B[:, None], cache, (~done_B).astype(jnp.int32))
        token_B, done_B, out_BN, key = emit(n, logits_B1V[:, 0], done_B, out_BN, key)
        return n + 1, cache, token_B, done_B, out_BN, key

    token_B, done_B, out_BN, key = emit(0, logits_BV, jnp.zeros((B,), bool),
                                        jnp.full((B, max_new_tokens), pad_id, jnp.int32), key)
    state = jax.lax.while_loop(cond, body, (jnp.int32(1), cache, token_B, done_B, out_BN, key))
    return state[4], state[1]


# Prefill and decode as separate jitted programs over a donated cache (updated in place, never copied):
# what a benchmark times. Each compiles once per (graph, shapes, static options).
@functools.partial(jax.jit, static_argnames=("graphdef", "chunk"), donate_argnames=("cache",))
def prefill_program(graphdef, state, cache, prompt_BT, prompt_lengths_B, *, chunk):
    """`prefill` of a split model: (logits [B, V] at each row's last prompt token, cache)."""
    return prefill(nnx.merge(graphdef, state), cache, prompt_BT, prompt_lengths_B, chunk=chunk)


@functools.partial(jax.jit, static_argnames=("graphdef", "max_new_tokens", "stop_tokens", "pad_id", "temperature",
                                             "top_k", "top_p"), donate_argnames=("cache",))
def decode_program(graphdef, state, cache, logits_BV, key, *, max_new_tokens, stop_tokens=(), pad_id=0, temperature=0.0,
           top_k=0, top_p=1.0):
    """`decode_with_cache` of a split model, with no host callback: (tokens [B, N], cache)."""
    return decode_with_cache(nnx.merge(graphdef, state), cache, logits_BV, key, max_new_tokens=max_new_tokens,
                             stop_tokens=stop_tokens, pad_id=pad_id, temperature=temperature, top_k=top_k,
                             top_p=top_p)


@functools.partial(jax.jit, static_argnames=("graphdef", "chunk", "max_len", "max_new_tokens", "stop_tokens",
                                             "pad_id", "temperature", "top_k", "top_p", "cache_dtype", "on_token"))
def _generate(graphdef, state, prompt_BT, prompt_lengths_B, key, *, chunk, max_len, max_new_tokens, stop_tokens,
              pad_id, temperature, top_k, top_p, cache_dtype, on_token=None):
    model = nnx.merge(graphdef, state)
    cache = init_cache(model, batch_size=prompt_BT.shape[0], max_len=max_len, dtype=cache_dtype)
    logits_BV, cache = prefill(model, cache, prompt_BT, prompt_lengths_B, chunk=chunk)
    return decode(model, cache, logits_BV, key, max_new_tokens=max_new_tokens, stop_tokens=stop_tokens,
                  pad_id=pad_id, on_token=on_token, temperature=temperature, top_k=top_k, top_p=top_p)


def generate(model: Decoder, prompt_ids, *, max_new_tokens: int, temperature: float = 0.0, top_k: int = 0,
             top_p: float = 1.0, seed: int = 0, stop_tokens=(), prompt_lengths=None, max_len: int | None = None,
             prefill_chunk: int = 256, pad_id: int = 0, cache_dtype=None, on_token=None) -> jax.Array:
    """The new token ids [B, N] (int32) after each prompt: greedy at temperature 0, else sampled
    (top_k, top_p), reproducible for a seed. prompt_ids: [B, T] or [T] ids (a list works);
    `prompt_lengths` [B] gives each row's own length (default: all T; rows are left-aligned). A row that
    emits one of `stop_tokens` stops; `pad_id` fills its remaining slots. `max_len` (the cache's length;
    default prompt + new tokens) bounds both. `on_token(tokens_B)` streams each step's tokens to the host."""
    args, static = prepare_generate(model, prompt_ids, max_new_tokens=max_new_tokens, temperature=temperature,
                                    top_k=top_k, top_p=top_p, seed=seed, stop_tokens=stop_tokens,
                                    prompt_lengths=prompt_lengths, max_len=max_len, prefill_chunk=prefill_chunk,
                                    pad_id=pad_id, cache_dtype=cache_dtype, on_token=on_token)
    return GENERATE(*args, **static)


# The jitted generation program: `GENERATE.lower(*args, **static).compile()` compiles it ahead of a timed run
# (generate.py), the compiled program then taking args[1:] (the graph definition is static).
GENERATE = _generate


def prepare_generate(model: Decoder, prompt_ids, *, max_new_tokens: int, temperature: float = 0.0,
                     top_k: int = 0, top_p: float = 1.0, seed: int = 0, stop_tokens=(), prompt_lengths=None,
                     max_len: int | None = None, prefill_chunk: int = 256, pad_id: int = 0, cache_dtype=None,
                     on_token=None) -> tuple[tuple, dict]:
    """Checks `generate`'s input (a ValueError naming the first problem) and returns the arguments and
    static options of the jitted program."""
    prompt_BT = np.asarray(prompt_ids)
    if prompt_BT.ndim == 1:
        prompt_BT = prompt_BT[None]
    if prompt_BT.ndim != 2 or prompt_BT.shape[1] == 0:
        raise ValueError(f"prompt_ids must be a non-empty [batch, time] array of token ids, got shape "
                         f"{prompt_BT.shape}")
    if not np.issubdtype(prompt_BT.dtype, np.integer):
        raise ValueError(f"prompt_ids must be integer token ids, got dtype {prompt_BT.dtype}")
    B, T = prompt_BT.shape
    lengths_B = np.full((B,), T) if prompt_lengths is None else np.asarray(prompt_lengths).reshape(-1)
    if lengths_B.shape != (B,) or lengths_B.min() < 1 or lengths_B.max() > T:
        raise ValueError(f"prompt_lengths must give each of the {B} rows a length in [1, {T}], got {lengths_B}")
    real_BT = np.arange(T)[None] < lengths_B[:, None]
    V = model.vocab_size
    if ((prompt_BT < 0) | (prompt_BT >= V))[real_BT].any():
        bad = prompt_BT[real_BT & ((prompt_BT < 0) | (prompt_BT >= V))][0]
        raise ValueError(f"prompt token id {bad} is outside the vocabulary [0, {V})")
    if max_new_tokens <= 0:
        raise ValueError(f"max_new_tokens must be positive, got {max_new_tokens}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must lie in (0, 1], got {top_p}")
    if not 0 <= top_k <= V:
        raise ValueError(f"top_k must lie in [0, vocab size {V}], got {top_k}")
    if prefill_chunk < 1:
        raise ValueError(f"prefill_chunk must be >= 1, got {prefill_chunk}")
    needed = int(lengths_B.max()) + max_new_tokens - 1   # the last token sampled is never fed back
    max_len = needed if max_len is None else max_len
    if int(lengths_B.max()) > max_len:
        raise ValueError(f"the prompt has {int(lengths_B.max())} tokens, more than max_len={max_len}")
    if needed > max_len:
        raise ValueError(f"prompt ({int(lengths_B.max())}) + max_new_tokens ({max_new_tokens}) - 1 = {needed} "
                         f"tokens do not fit max_len={max_len}")
    graphdef, state = nnx.split(model)
    prompt_BT = np.where(real_BT, prompt_BT, pad_id).astype(np.int32)
    args = (graphdef, state, jnp.asarray(prompt_BT), jnp.asarray(lengths_B, jnp.int32), jax.random.key(seed))
    static = dict(chunk=min(prefill_chunk, T), max_len=max_len, max_new_tokens=max_new_tokens,
                  stop_tokens=tuple(int(t) for t in stop_tokens), pad_id=pad_id, temperature=float(temperature),
                  top_k=int(top_k), top_p=float(top_p), on_token=on_token,
                  cache_dtype=None if cache_dtype is None else cache_dtype_name(cache_dtype, model.config))
    return args, static
