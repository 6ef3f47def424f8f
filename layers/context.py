"""What a layer sees besides the residual stream, and what layers hand on to later layers.

The decoder makes one `LayerContext` per forward pass and passes it to every block; the layer kinds read
the inputs they need and write the typed hand-over fields (`kv_by_layer` for KV-shared layers,
`router_state_BTR` for accumulating routers). Nothing is looked up by string.

Cached decoding (zoo.inference) sets `caches`: layer index -> that layer's cache (a pytree of arrays from
its kind's `cache_spec`); a token mixer then runs its T tokens as the next chunk of each row (positions
lengths_B + 0..T-1, the first new_tokens_B of them real) against its cache and stores the updated cache
under the same index. A KV-shared layer reads the keys, values and key positions its source attended over.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax

from layers.partitioning import UNPARTITIONED, Partitioning

KV = tuple[jax.Array, jax.Array]   # (keys [B, S, K, H], values [B, S, K, H])


@dataclasses.dataclass
class LayerContext:
    positions_BT: jax.Array
    segment_ids_BT: jax.Array | None = None
    default_positions: bool = False             # positions are 0..T-1 in every row (enables fused kernels)
    tokens_BT: jax.Array | None = None          # the token ids the stream started from (token-routed layers)
    layer_inputs_BTLP: jax.Array | None = None  # per-layer embeddings, when the config has them
    partitioning: Partitioning = UNPARTITIONED  # how fused kernels and routed experts meet a mesh
    # handed on from layer to layer
    kv_by_layer: dict[int, KV] = dataclasses.field(default_factory=dict)   # keys/values other layers reuse
    router_state_BTR: jax.Array | None = None   # the previous layer's router state (accumulating routers)
    # cached decoding: per-layer caches (read and replaced by each token mixer), each row's cache length
    # before this chunk and its count of real tokens in the chunk, and shared key positions
    caches: dict[int, Any] | None = None
    cache_lengths_B: jax.Array | None = None
    new_tokens_B: jax.Array | None = None
    kv_positions_by_layer: dict[int, jax.Array] = dataclasses.field(default_factory=dict)
    # Memory Sparse Attention (layers.msa): the encoding pass sets msa_doc_lengths_B (one document per row)
    # and its layers hand on msa_encoded; the query pass sets msa_memory (router layer -> PooledMemory),
    # optionally the prefix tokens that do not see the memory and the tokens that route, and its layers
    # hand on msa_routing (router layer -> Routing)
    msa_doc_lengths_B: jax.Array | None = None
    msa_memory: dict[int, Any] | None = None
    msa_prefix_len_B: jax.Array | None = None
    msa_route_mask_BT: jax.Array | None = None
    msa_encoded: dict[int, Any] = dataclasses.field(default_factory=dict)
    msa_routing: dict[int, Any] = dataclasses.field(default_factory=dict)

    HANDED_ON = ("kv_by_layer", "router_state_BTR", "msa_encoded", "msa_routing")
