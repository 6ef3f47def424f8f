"""Device meshes and logical-axis sharding rules.

Layers name the axes of their weights logically (`axes=("embed", "mlp")`); this module maps those names
to mesh axes with a small rule table that lives in the config (`config.sharding_rules`), in the style of
big_vision and the Flax NNX Gemma example. Modules never see a mesh.

Mesh axes: `data` (pure data parallel), `fsdp` (batch AND parameter/optimizer sharding), `tensor`
(heads, MLP width, vocab), `expert` (routed experts; also splits the batch outside the experts).
`partitioning(mesh, rules)` is what a model call on the mesh passes to its layers (`layers.partitioning`):
fused kernels on each device's slice, MoE experts expert-parallel (each `expert` shard only its own).
"""
from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence

import jax
import numpy as np
from flax import nnx
from jax._src import config as jax_config
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from layers import moe
from layers.partitioning import UNPARTITIONED, Partitioning
from zoo.models import build, build_abstract

MESH_AXES = ("data", "fsdp", "tensor", "expert")
BATCH = ("data", "fsdp", "expert")

# Logical axis -> mesh axes, as data. Activations use `batch`; every other name is a weight axis.
_BASE = (("batch", BATCH),)
RULES = {
    "data": _BASE,
    "fsdp": _BASE + (("embed", ("fsdp",)), ("experts", ("fsdp",))),
    "fsdp_tensor": _BASE + (
        ("embed", ("fsdp",)), ("vocab", ("tensor",)), ("q_heads", ("tensor",)), ("kv_heads", ("tensor",)),
        ("mlp", ("tensor",)), ("expert_mlp", ("tensor",)), ("layer_embed", ("tensor",)),
        ("experts", ("fsdp",))),
    "fsdp_tensor_expert": _BASE + (
        ("embed", ("fsdp",)), ("vocab", ("tensor",)), ("q_heads", ("tensor",)), ("kv_heads", ("tensor",)),
        ("mlp", ("tensor",)), ("expert_mlp", ("tensor",)), ("layer_embed", ("tensor",)),
        ("experts", ("expert",))),
}


DEFAULT_RULES = "fsdp_tensor_expert"   # names every mesh axis: the mesh sizes alone decide the layout


def rules_preset(name: str) -> tuple:
    try:
        return RULES[name]
    except KeyError:
        raise ValueError(f"unknown sharding rules preset {name!r}; expected one of {sorted(RULES)}") from None


def resolve_rules(rules) -> tuple:
    """`config.sharding_rules` as a rule table: a preset name from RULES, or the table itself
    (pairs of logical axis -> mesh axes; lists, as read back from config.json, are accepted)."""
    if isinstance(rules, str):
        return rules_preset(rules)
    table = []
    for name, axes in rules:
        axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
        bad = [a for a in axes if a not in MESH_AXES]
        if bad:
            raise ValueError(f"sharding rule {name!r} names unknown mesh axes {bad}; expected {MESH_AXES}")
        table.append((name, axes))
    return tuple(table)


def parse_mesh(text: str) -> dict[str, int]:
    """Mesh axis sizes from a `--mesh` command-line value: "data=2,fsdp=4" -> {"data": 2, "fsdp": 4} (axes
    not named are left out: size 1 to `make_mesh`; one size may be -1). Errors name the flag."""
    mesh = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, _, size = part.partition("=")
        if name not in MESH_AXES:
            raise ValueError(f"--mesh: unknown mesh axis {name!r} in {text!r}; expected one of {MESH_AXES}")
        try:
            mesh[name] = int(size)
        except ValueError:
            raise ValueError(f"--mesh: a mesh must look like data=2,fsdp=4 (sizes, one may be -1), got {text!r}"
                             ) from None
    return mesh


def make_mesh(mesh_cfg, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A mesh with axes (data, fsdp, tensor, expert); one size may be -1 (the remaining devices)."""
    devices = list(devices if devices is not None else jax.devices())
    sizes = [int(mesh_cfg.get(a, 1)) for a in MESH_AXES]
    unknown = set(mesh_cfg) - set(MESH_AXES)
    if unknown:
        raise ValueError(f"unknown mesh axes {sorted(unknown)}; expected {MESH_AXES}")
    if sizes.count(-1) > 1:
        raise ValueError("at most one mesh axis may be -1")
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if len(devices) % known:
            raise ValueError(f"{len(devices)} devices do not split into a mesh with fixed axes of size {known}")
        sizes[sizes.index(-1)] = len(devices) // known
    if math.prod(sizes) != len(devices):
        raise ValueError(f"mesh {dict(zip(MESH_AXES, sizes))} needs {math.prod(sizes)} devices, "
                         f"{len(devices)} are available")
    return Mesh(np.asarray(devices).reshape(sizes), MESH_AXES)


def spec(axes: Sequence[str | None], shape: Sequence[int], rules, mesh: Mesh) -> PartitionSpec:
    """The partition spec of an array with logical `axes`: each dim takes the mesh axes its rule names,
    skipping axes of size 1, axes already used, and axes whose size does not divide the dim."""
    table = dict(rules)
    used: set[str] = set()
    out = []
    for name, dim in zip(axes, shape):
        chosen = []
        for axis in table.get(name, ()) if name else ():
            size = mesh.shape[axis]
            if size > 1 and axis not in used and dim % (math.prod(mesh.shape[a] for a in chosen) * size) == 0:
                chosen.append(axis)
        used.update(chosen)
        out.append(tuple(chosen) if len(chosen) > 1 else (chosen[0] if chosen else None))
    return PartitionSpec(*out)


def state_shardings(state: nnx.State, mesh: Mesh, rules) -> nnx.State:
    """NamedShardings for every variable of `state` (by its `axes` metadata; replicated without)."""
    def one(var):
        axes = getattr(var, "axes", None) or (None,) * len(var.shape)
        return var.replace(NamedSharding(mesh, spec(axes, var.shape, rules, mesh)))
    return jax.tree.map(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


# A decoding cache leaf's axes, read from its name's shape suffix (the repo's legend): B is the batch,
# K the kv heads; its other axes (slots, head dim, packed channels) stay whole on every device.
_CACHE_AXES = {"B": "batch", "K": "kv_heads"}


def cache_shardings(cache, mesh: Mesh, rules):
    """NamedShardings for a decoding cache (`zoo.init_cache`, arrays or shape structs) laid out like
    the parameters: rows over the `batch` rule's mesh axes, kv heads over the `kv_heads` rule's (so each
    device caches the heads its attention computes), the rest replicated. A leaf whose name carries no
    shape suffix (e.g. `lengths_B` does) is split on its leading, batch axis only."""
    table = resolve_rules(rules)

    def one(path, leaf):
        suffix = str(getattr(path[-1], "key", "")).rsplit("_", 1)[-1]
        if len(suffix) != leaf.ndim or not suffix.startswith("B"):
            suffix = "B" + "." * (leaf.ndim - 1) if leaf.ndim else ""
        return NamedSharding(mesh, spec([_CACHE_AXES.get(c) for c in suffix], leaf.shape, table, mesh))
    return jax.tree_util.tree_map_with_path(one, cache)


def batch_sharding(mesh: Mesh, rules, ndim: int = 2) -> NamedSharding:
    """Sharding of a [batch, ...] input: batch over the mesh axes of the `batch` rule."""
    batch_axes = tuple(a for a in dict(rules).get("batch", ()) if mesh.shape[a] > 1)
    return NamedSharding(mesh, PartitionSpec(batch_axes or None, *([None] * (ndim - 1))))


def shard_batch(batch: np.ndarray, batch_sharding: NamedSharding) -> jax.Array:
    """A host batch (the same global batch on every process) as a global array laid out by
    `batch_sharding`; each process only transfers the slices its devices hold."""
    batch = np.asarray(batch)
    return jax.make_array_from_callback(batch.shape, batch_sharding, lambda index: batch[index])


def check_batch_splits(batch_size: int, batch_sharding: NamedSharding, name: str) -> None:
    """Fails, naming the setting `name`, unless `batch_size` splits evenly over the devices of the batch
    axes of `batch_sharding`."""
    axes = batch_sharding.spec[0] or ()
    mesh = batch_sharding.mesh
    ways = math.prod(mesh.shape[a] for a in ((axes,) if isinstance(axes, str) else axes))
    if int(batch_size) % ways:
        raise ValueError(f"{name} {batch_size} does not split over the {ways} devices of the batch axes "
                         f"{batch_sharding.spec[0]} of mesh {dict(mesh.shape)}")


def create_model(cfg, mesh: Mesh, rules, *, seed: int = 0):
    """A randomly initialised model whose parameters are created already sharded (never whole on one
    device)."""
    graphdef, abstract = nnx.split(build_abstract(cfg))
    shardings = state_shardings(abstract, mesh, rules)
    # On GPU the default threefry lowering unrolls into one large kernel per weight (minutes to compile
    # for a ~1B model); the kernel lowering draws the same numbers and compiles in seconds.
    with jax_config.threefry_gpu_kernel_lowering(True):
        state = jax.jit(lambda: nnx.split(build(cfg, seed=seed))[1], out_shardings=shardings)()
    return nnx.merge(graphdef, state)


def partitioning(mesh: Mesh | None, rules) -> Partitioning:
    """How a model call on `mesh` (parameters laid out by `rules`, a table or preset name) reaches its
    devices; pass it as `model(tokens, partitioning=...)` where a jitted step is traced.

    Fused kernels (attention through cuDNN, splash or our Pallas kernels; the DeepSeek-V4 CSA, HCA and
    indexer kernels) run in a shard_map, each device on its slice of the batch and heads
    (`per_shard_on_mesh`), instead of XLA gathering their operands around one opaque call. MoE layers
    compute their routed experts with `expert_parallel_experts` when the rules split the experts over the
    mesh axis `expert` of size > 1 (otherwise XLA gathers whatever expert weights are sharded). None or a
    one-device mesh: `UNPARTITIONED`."""
    if mesh is None or mesh.size == 1:
        return UNPARTITIONED
    rules = resolve_rules(rules)
    experts = (functools.partial(expert_parallel_experts, mesh=mesh, rules=rules)
               if mesh.shape["expert"] > 1 and "expert" in dict(rules).get("experts", ()) else None)
    return Partitioning(per_shard=functools.partial(per_shard_on_mesh, mesh=mesh, rules=rules),
                        routed_experts=experts)


def per_shard_on_mesh(fn: Callable, in_axes, out_axes, *, mesh: Mesh, rules) -> Callable:
    """`fn` in a shard_map over `mesh`: each argument split over the mesh axes its logical axes take
    (`spec`; None for an argument that is None). Arrays sharing a logical axis of one size split it alike,
    so a kernel sees matching slices; each axis of the result is split as the arguments split that name
    (whole if none of them has it)."""
    def call(*args):
        in_specs, split = [], {}
        for a, axes in zip(args, in_axes, strict=True):
            in_specs.append(PartitionSpec() if a is None else spec(axes, a.shape, rules, mesh))
            if a is not None:
                for name, entry in zip(axes, in_specs[-1]):
                    split.setdefault(name, entry)
        out_spec = PartitionSpec(*(split.get(name) if name else None for name in out_axes))
        return jax.shard_map(fn, mesh=mesh, in_specs=tuple(in_specs), out_specs=out_spec, check_vma=False)(*args)
    return call


def _mesh_axes(entry) -> tuple[str, ...]:
    """The mesh axes of one PartitionSpec entry (None, a name, or a tuple of names)."""
    return () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)


def expert_parallel_experts(x_MD: jax.Array, experts_MK: jax.Array, weights_MK: jax.Array,
                            gate_EDF: jax.Array, up_EDF: jax.Array, down_EFD: jax.Array, *,
                            act: Callable[[jax.Array], jax.Array], limit: float, impl: str = "auto",
                            mesh: Mesh, rules) -> jax.Array:
    """`layers.moe.routed_experts` with each shard of the mesh axis `expert` (size n) computing only its own
    E / n experts, in one shard_map over the whole mesh:

    1. each shard all-gathers, over `expert`, the tokens of its `expert` group and their routing;
    2. it runs its E / n experts on the (token, expert) pairs routed to them (`routed_experts` with the ids
       shifted by its first expert: the grouped matmul sees E / n groups; other pairs add nothing);
    3. `psum_scatter` over `expert` sums the shards' partial outputs and hands each shard its own tokens.

    Tokens are split as the batch is (the `batch` rule); when they do not split over `expert` (a batch too
    small), every shard holds them all (step 1 only marks them as varying over `expert`, so that their
    gradients add up over the shards) and step 3 is a psum. Expert weights enter split over `expert` on E
    and whole on the embed dim (XLA all-gathers an `fsdp`-split embed dim before the shard_map). Their
    `expert_mlp` dim F stays split over the mesh axes its rule names that do not split the tokens (`tensor`
    in the presets): each shard holds a slice of F, and the down projection's partial sums add up with a
    psum over those axes (F split over token axes is gathered).
    """
    E, _, F = gate_EDF.shape
    n = mesh.shape["expert"]
    if E % n:
        raise ValueError(f"expert parallelism: {E} experts do not split over the {n} devices of mesh axis "
                         f"'expert'; choose an expert axis size that divides {E}")
    token_axes = _mesh_axes(spec(("batch", None), x_MD.shape, rules, mesh)[0])
    gathered = "expert" in token_axes
    f_axes = tuple(a for a in _mesh_axes(spec(("expert_mlp",), (F,), rules, mesh)[0])
                   if a not in token_axes and a != "expert")
    tokens = PartitionSpec(token_axes or None, None)
    f = f_axes or None

    def shard(x_MD, experts_MK, weights_MK, gate_EDF, up_EDF, down_EFD):
        routed = (x_MD, experts_MK, weights_MK)
        if gathered:   # step 1: the tokens of this shard's `expert` group, with their routing
            x_MD, experts_MK, weights_MK = (jax.lax.all_gather(a, "expert", tiled=True) for a in routed)
        else:
            x_MD, experts_MK, weights_MK = jax.lax.pcast(routed, "expert", to="varying")
        first = jax.lax.axis_index("expert") * gate_EDF.shape[0]   # step 2
        y_MD = moe.routed_experts(x_MD, experts_MK - first, weights_MK, gate_EDF, up_EDF, down_EFD, act=act,
                                  limit=limit, impl=impl)
        y_MD = jax.lax.psum_scatter(y_MD, "expert", tiled=True) if gathered else jax.lax.psum(y_MD, "expert")
        return jax.lax.psum(y_MD, f_axes) if f_axes else y_MD

    return jax.shard_map(shard, mesh=mesh, out_specs=tokens,
                         in_specs=(tokens, tokens, tokens, PartitionSpec("expert", None, f),
                                   PartitionSpec("expert", None, f), PartitionSpec("expert", f, None))
                         )(x_MD, experts_MK, weights_MK, gate_EDF, up_EDF, down_EFD)
