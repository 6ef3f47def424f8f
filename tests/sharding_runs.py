"""Multi-device runs for tests/test_sharding.py, executed in a subprocess whose XLA_FLAGS give 8
simulated CPU devices (the flag must be set before jax starts, so it cannot run inside pytest's process).

    python tests/sharding_runs.py losses FAMILY [MESH[:REMAT]...]  -> JSON: per mesh, losses, PartitionSpecs
                                                     and the expert counts the grouped matmuls see
    python tests/sharding_runs.py expert_parallel -> JSON: expert-parallel vs plain routed experts
    python tests/sharding_runs.py resume WORKDIR      -> JSON: uninterrupted vs resharded-resume losses
    python tests/sharding_runs.py evaluate WORKDIR    -> JSON: eval.py's validation loss and embedding
                                                         table layout per mesh, and on one device
    python tests/sharding_runs.py convert WORKDIR     -> JSON: from_hf / to_hf / the CLI on fsdp=2 x tensor=4
                                                         vs one device: logits, layouts, written files
    python tests/sharding_runs.py decode DIR FAMILY...  -> JSON: prefill + decode with the cache sharded on
                                                         data=4 x tensor=2 vs one device, the cache's
                                                         layouts, and decoding on from a saved cache
"""
from __future__ import annotations

import functools
import json
import os
import shutil
import time
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from tests import conftest  # noqa: E402
from zoo import sharding  # noqa: E402
from zoo.train import trainer  # noqa: E402

STEPS, BATCH, SEQ = 3, 8, 32
MESHES = {
    "data8": dict(data=8, fsdp=1, tensor=1, expert=1),
    "fsdp8": dict(data=1, fsdp=8, tensor=1, expert=1),
    "fsdp2_tensor4": dict(data=1, fsdp=2, tensor=4, expert=1),
    "expert2_fsdp4": dict(data=1, fsdp=4, tensor=1, expert=2),
    "expert4_data2": dict(data=2, fsdp=1, tensor=1, expert=4),
    "fsdp2_expert2_tensor2": dict(data=1, fsdp=2, tensor=2, expert=2),
    "data4_tensor2": dict(data=4, fsdp=1, tensor=2, expert=1),
}


def micro_config(family: str):
    """Each family's `tiny` preset shrunk to micro size (gemma4: the tests' micro config; gemma4_moe: that
    with the MoE block of the 26B-A4B preset on its last layer)."""
    if family in ("gemma4", "gemma4_moe"):
        config = conftest.get_config()
        if family == "gemma4_moe":
            L = config.model.num_layers
            config.model.update(num_experts=4, top_k=2, expert_dim=16, moe_layers=(False,) * (L - 1) + (True,))
    elif family == "laguna":
        from configs.laguna import BYTE_IDS, get_config
        from zoo.laguna import model_config
        config = get_config("tiny")
        config.model = model_config(
            vocab_size=256, d_model=32, attention_types=("full", "sliding"), num_heads=(4, 4), num_kv_heads=2,
            moe_layers=(False, True), head_dim=8, sliding_window=8, mlp_dim=64, num_experts=4, top_k=2,
            expert_dim=32, shared_expert_dim=32, routed_scale=2.5, max_positions=512, **BYTE_IDS)
    elif family == "zaya1":
        from configs.zaya1 import BYTE_IDS, get_config
        from zoo.zaya1 import model_config
        config = get_config("tiny")
        config.model = model_config(
            vocab_size=256, d_model=32, attention_types=("cca",) * 2, num_heads=4, num_kv_heads=2, head_dim=8,
            num_experts=4, expert_dim=64, router_dim=16, max_positions=512, **BYTE_IDS)
    elif family == "deepseek_v4":
        from configs.deepseek_v4 import _pattern, get_config
        from zoo.deepseek_v4 import model_config
        config = get_config("tiny")
        config.model = model_config(
            vocab_size=256, d_model=32, attention_types=_pattern([4, 128]), num_heads=4, head_dim=16, rope_dim=8,
            q_rank=16, out_groups=2, out_rank=16, window=8, hca_ratio=16, index_heads=2, index_dim=8,
            index_top_k=4, num_experts=4, top_k=2, expert_dim=32, num_hash_layers=1, hc_streams=2,
            hc_sinkhorn_iters=4, mtp_depth=1, max_positions=512)
    else:
        raise ValueError(family)
    config.optimizer.warmup_steps = 1
    config.train.update(steps=STEPS, batch_size=BATCH, seq_len=SEQ)
    return config


def _find(tree, *names):
    """(keystr, leaf) of the first leaf whose path mentions every name."""
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        key = jax.tree_util.keystr(path)
        if all(f"'{n}'" in key for n in names):
            return key, leaf
    return None, None


def _opt_leaf(opt_state, param_key, slot="mu"):
    for path, leaf in jax.tree_util.tree_flatten_with_path(opt_state)[0]:
        key = jax.tree_util.keystr(path)
        if key.endswith(param_key) and f".{slot}" in key:
            return leaf
    raise KeyError(f"{slot} of {param_key}")


def _expert_groups(jaxpr) -> list[int]:
    """The group counts (experts) that the grouped matmuls (ragged_dot) of `jaxpr` and its sub-jaxprs
    see: E on the plain path, E / n inside an expert-parallel shard_map over n `expert` shards."""
    return sorted({eqn.invars[2].aval.shape[0] for eqn in conftest.all_eqns(jaxpr)
                   if eqn.primitive.name == "ragged_dot_general"})


def _kernel_operand_shapes(jaxpr) -> list[list[int]]:
    """The shapes of the array operands (rank >= 3) of every Pallas call in `jaxpr` and its sub-jaxprs
    (shard_map bodies, custom_vjp rules, scans): global shapes unless the kernels run per shard."""
    return sorted(map(list, {tuple(v.aval.shape) for eqn in conftest.all_eqns(jaxpr)
                             if eqn.primitive.name == "pallas_call" for v in eqn.invars if len(v.aval.shape) >= 3}))


def run(config, mesh):
    state = trainer.fresh_state(config, mesh)
    params, opt_state, s = state.params, state.opt_state, state.shardings
    step = trainer.make_train_step(state.graphdef, state.tx, "float32", s)
    rng = np.random.default_rng(0)
    batches = [rng.integers(3, config.model.vocab_size, (BATCH, SEQ + 1), dtype=np.int32) for _ in range(STEPS)]
    losses = []
    for tokens in batches:   # make_train_step's loss runs the MoE layers expert-parallel on an `expert` mesh
        inputs = (sharding.shard_batch(tokens[:, :-1], s.batch), sharding.shard_batch(tokens[:, 1:], s.batch))
        if not losses:
            jaxpr = step.trace(params, opt_state, *inputs).jaxpr.jaxpr
            expert_groups, kernel_shapes = _expert_groups(jaxpr), _kernel_operand_shapes(jaxpr)
        params, opt_state, out = step(params, opt_state, *inputs)
        losses.append(float(out["loss"]))
    specs = {}
    for label, names in (("q_proj", ("q_proj",)), ("expert_gate", ("experts", "gate_proj"))):
        key, leaf = _find(params, *names)
        if key is None or (label == "expert_gate" and leaf.ndim != 3):
            continue
        specs[label] = {"path": key, "shape": list(leaf.shape), "param": str(tuple(leaf.sharding.spec)),
                        "mu": str(tuple(_opt_leaf(opt_state, key).sharding.spec)),
                        "nu": str(tuple(_opt_leaf(opt_state, key, "nu").sharding.spec))}
    return {"losses": losses, "specs": specs, "expert_groups": expert_groups, "kernel_shapes": kernel_shapes}


def losses(family: str, meshes) -> dict:
    """One device's run, then one per mesh; a mesh named "MESH:POLICY" runs with model.remat = POLICY,
    "MESH:POLICY:IMPL" also with model.attention_impl = IMPL (and one device's run with IMPL as
    "single:IMPL")."""
    config = micro_config(family)
    one_device = jax.sharding.Mesh(np.asarray(jax.devices()[:1]).reshape(1, 1, 1, 1),
                                   ("data", "fsdp", "tensor", "expert"))
    default_impl = config.model.attention_impl
    out = {"single": run(config, one_device)}
    for impl in sorted({name.split(":")[2] for name in meshes if name.count(":") == 2}):
        config.model.attention_impl = impl
        out[f"single:{impl}"] = run(config, one_device)
    for name in meshes:
        mesh, remat, impl = (name.split(":") + ["", ""])[:3]
        config.mesh.update(MESHES[mesh])
        config.model.remat = remat or "none"
        config.model.attention_impl = impl or default_impl
        t0 = time.perf_counter()
        out[name] = run(config, None)
        out[name]["seconds"] = time.perf_counter() - t0
    return out


def expert_parallel() -> dict:
    """`sharding.expert_parallel_experts` against `layers.moe.routed_experts` on random inputs (8 experts,
    top 2, SwiGLU clamp): per mesh and token count, the largest differences of the output and of the
    gradients of a random projection of it (tokens, routing weights, the three expert weights), the inputs
    laid out by the fsdp_tensor_expert rules; 6 tokens do not split over `expert` (the psum path). Also the
    error for 6 experts on an `expert` axis of 4."""
    from layers import activations, moe

    E, K, D, F = 8, 2, 8, 6
    rules = sharding.resolve_rules("fsdp_tensor_expert")
    act = activations.get("silu")

    def loss(routed, x_MD, weights_MK, gate_EDF, up_EDF, down_EFD, experts_MK, probe_MD):
        y_MD = routed(x_MD, experts_MK, weights_MK, gate_EDF, up_EDF, down_EFD, act=act, limit=0.7)
        return jnp.einsum("MD,MD->", y_MD, probe_MD), y_MD

    out = {}
    for mesh_name, M in (("expert4_data2", 16), ("fsdp2_expert2_tensor2", 16), ("expert4_data2", 6)):
        mesh = sharding.make_mesh(MESHES[mesh_name])
        k = jax.random.split(jax.random.key(M), 7)
        args = {("batch", None): [jax.random.normal(k[0], (M, D)), jax.random.uniform(k[1], (M, K))],
                ("experts", "embed", "expert_mlp"): [jax.random.normal(k[2], (E, D, F)),
                                                     jax.random.normal(k[3], (E, D, F))],
                ("experts", "expert_mlp", "embed"): [jax.random.normal(k[4], (E, F, D))]}
        args = [jax.device_put(a, jax.sharding.NamedSharding(mesh, sharding.spec(axes, a.shape, rules, mesh)))
                for axes, arrays in args.items() for a in arrays]
        fixed = (jax.random.randint(k[5], (M, K), 0, E), jax.random.normal(k[6], (M, D)))
        ep = functools.partial(sharding.expert_parallel_experts, mesh=mesh, rules=rules)
        results = [jax.jit(jax.value_and_grad(functools.partial(loss, routed), argnums=range(5), has_aux=True))(
            *args, *fixed) for routed in (moe.routed_experts, ep)]
        (_, want_y), want_grads = results[0]
        (_, got_y), got_grads = results[1]
        out[f"{mesh_name}_M{M}"] = {
            "y": float(jnp.abs(got_y - want_y).max() / jnp.abs(want_y).max()),
            "grads": [float(jnp.abs(g - w).max() / jnp.abs(w).max()) for g, w in zip(got_grads, want_grads)]}
    try:
        sharding.expert_parallel_experts(
            jnp.ones((16, D)), jnp.zeros((16, K), jnp.int32), jnp.ones((16, K)), jnp.ones((6, D, F)),
            jnp.ones((6, D, F)), jnp.ones((6, F, D)), act=act, limit=0.0,
            mesh=sharding.make_mesh(MESHES["expert4_data2"]), rules=rules)
        out["error"] = None
    except ValueError as e:
        out["error"] = str(e)
    return out


def resume(workdir: str) -> dict:
    """Trains 4 steps as fsdp=8; then resumes a copy of that run from its step-2 checkpoint as
    fsdp=2 x tensor=4 and returns both runs' losses of steps 3 and 4."""
    config = conftest.get_config()
    config.train.update(steps=4, batch_size=8, eval_every=100, eval_batches=1, checkpoint_every=2,
                        keep_checkpoints=None)
    config.mesh.update(MESHES["fsdp8"])
    whole, part = os.path.join(workdir, "whole"), os.path.join(workdir, "resumed")
    trainer.train(config, whole)
    shutil.copytree(whole, part)
    shutil.rmtree(os.path.join(part, "checkpoints", "4"))
    config.mesh.update(MESHES["fsdp2_tensor4"])
    trainer.train(config, part)
    return {name: [r["loss"] for r in conftest.read_metrics(d) if r["step"] > 2]
            for name, d in (("whole", whole), ("resumed", part))}


def evaluate(workdir: str) -> dict:
    """Trains 2 steps as fsdp=8, then evaluates that checkpoint with eval.py's `evaluate_checkpoint` on the
    mesh of its config.json and as data=8 and fsdp=2 x tensor=4; per mesh, the validation loss and where
    the embedding table of the evaluated model lives; also one device's loss and a batch-size error."""
    from absl import flags
    from flax import nnx

    import eval as eval_py
    from zoo import checkpoints, data
    from zoo import evaluate as zoo_evaluate

    config = conftest.get_config()
    config.train.update(steps=2, batch_size=8, eval_every=100, eval_batches=2, checkpoint_every=2)
    config.mesh.update(MESHES["fsdp8"])
    trainer.train(config, workdir)
    rows = zoo_evaluate.evaluate(checkpoints.load(workdir), data.load_corpus(config.data), seq_lens=[SEQ],
                                 num_batches=2, batch_size=8)
    out = {"single": {"val_loss": rows[0]["val_loss"]}}

    real_evaluate, seen = zoo_evaluate.evaluate, {}

    def spy(model, corpus, **kwargs):   # eval.py imports zoo.evaluate.evaluate when it runs
        table_VD = nnx.to_pure_dict(nnx.state(model, nnx.Param))["embed"]["table"]
        seen.update(table_spec=str(tuple(table_VD.sharding.spec)), table_devices=len(table_VD.sharding.device_set))
        return real_evaluate(model, corpus, **kwargs)

    zoo_evaluate.evaluate = spy
    flags.FLAGS(["eval.py"])
    for name, text in (("config", ""), ("data8", "data=8"), ("fsdp2_tensor4", "fsdp=2,tensor=4")):
        seen.clear()
        t0 = time.perf_counter()
        report = eval_py.evaluate_checkpoint(workdir, [], eval_py.parse_mesh(text))
        out[name] = {"val_loss": report["val_loss"], "seconds": time.perf_counter() - t0, **seen}
    flags.FLAGS.batch_size = 6   # 6 windows over the 8 batch devices of data=8
    try:
        eval_py.evaluate_checkpoint(workdir, [], eval_py.parse_mesh("data=8"))
        out["batch_error"] = None
    except ValueError as e:
        out["batch_error"] = str(e)
    return out


def convert(workdir: str) -> dict:
    """Exports the micro Gemma 4 with to_hf, loads it back with from_hf on one device and sharded as
    fsdp=2 x tensor=4, and exports the sharded model again; also converts with the CLI's --mesh. Returns
    the logit differences, every parameter's layout vs. `state_shardings`, and whether the files match."""
    import filecmp

    import jax.numpy as jnp
    from flax import nnx

    import zoo
    from zoo import checkpoints
    from zoo.convert.__main__ import main as convert_cli

    first, second, ckpt = (os.path.join(workdir, n) for n in ("hf", "hf_from_sharded", "zoo"))
    zoo.to_hf(zoo.build(conftest.get_config().model, seed=1), first, max_shard_bytes=40_000)
    mesh = sharding.make_mesh(MESHES["fsdp2_tensor4"])
    ids = jnp.asarray(np.random.default_rng(0).integers(3, 256, (2, SEQ)), jnp.int32)
    logits = nnx.jit(lambda model, x: model(x))
    single = np.asarray(logits(zoo.from_hf(first), ids))
    t0 = time.perf_counter()
    model = zoo.from_hf(first, mesh=mesh)
    seconds = time.perf_counter() - t0
    params = nnx.state(model, nnx.Param)
    expected = {tuple(p): v.get_value() for p, v in nnx.to_flat_state(
        sharding.state_shardings(params, mesh, sharding.resolve_rules("fsdp_tensor_expert")))}
    layouts = {"/".join(map(str, p)): {"spec": str(tuple(v.get_value().sharding.spec)),
                                       "expected": str(tuple(expected[tuple(p)].spec)),
                                       "devices": len(v.get_value().sharding.device_set)}
               for p, v in nnx.to_flat_state(params)}
    sharded = np.asarray(logits(model, ids))
    zoo.to_hf(model, second, max_shard_bytes=40_000)
    files = sorted(os.listdir(first))
    convert_cli(["hf-to-zoo", first, ckpt, "--mesh", "fsdp=2,tensor=-1"])
    cfg = checkpoints.read_config(ckpt)
    from_cli = np.asarray(logits(checkpoints.load(ckpt, mesh=sharding.make_mesh(cfg.mesh)), ids))
    return {"single": single.tolist(), "sharded": sharded.tolist(), "cli": from_cli.tolist(),
            "cli_mesh": cfg.mesh.to_dict(),
            "layouts": layouts, "files": files, "seconds": seconds,
            "same_files": files == sorted(os.listdir(second)) and
            all(filecmp.cmp(os.path.join(first, f), os.path.join(second, f), shallow=False) for f in files)}


def decode(directory: str, *families: str) -> dict:
    """Per family: a prompt prefilled and decoded 3 tokens on one device, then on data=4 x tensor=2 with
    parameters and cache sharded by the same rules, then on one device again from the sharded cache saved
    after the prompt (Orbax): the logits of each, and each cache leaf's PartitionSpec on the mesh."""
    import zoo
    from zoo import checkpoints, inference

    out = {}
    B, T, steps, max_len = 4, 21, 3, 40
    for family in families:
        cfg = micro_config(family)
        rng = np.random.default_rng(0)
        prompt_BT = jnp.asarray(rng.integers(3, cfg.model.vocab_size, (B, T)), jnp.int32)
        lengths_B = jnp.asarray([21, 17, 9, 14], jnp.int32)
        feed_BN = jnp.asarray(rng.integers(3, cfg.model.vocab_size, (B, steps)), jnp.int32)
        prefill = jax.jit(lambda m, c: inference.prefill(m, c, prompt_BT, lengths_B, chunk=8))
        extend = jax.jit(lambda m, c, t: m.extend(t[:, None], c))

        def run(model, cache, logits=None, extend=extend):
            got = []
            if logits is None:
                logits, cache = prefill(model, cache)
                got.append(np.asarray(logits))
            for n in range(steps):
                logits, cache = extend(model, cache, feed_BN[:, n])
                got.append(np.asarray(logits[:, 0]))
            return got, cache

        single = zoo.build(cfg.model, seed=0)
        spec = jax.eval_shape(lambda: inference.init_cache(single, batch_size=B, max_len=max_len))
        one, _ = run(single, inference.init_cache(single, batch_size=B, max_len=max_len))

        mesh = sharding.make_mesh(MESHES["data4_tensor2"])
        rules = sharding.resolve_rules(cfg.sharding_rules)
        model = sharding.create_model(cfg.model, mesh, rules, seed=0)
        shardings = sharding.cache_shardings(spec, mesh, rules)
        cache = jax.jit(lambda: inference.init_cache(model, batch_size=B, max_len=max_len),
                        out_shardings=shardings)()
        logits, cache = jax.jit(prefill, out_shardings=(None, shardings))(model, cache)
        saved = os.path.join(directory, family)
        checkpoints.save_cache(saved, cache)
        meshed, cache = run(model, cache, logits, jax.jit(extend, out_shardings=(None, shardings)))
        layouts = {}   # PartitionSpecs without trailing Nones (replicated axes)
        for k, v in jax.tree_util.tree_flatten_with_path(cache)[0]:
            spec_axes = list(v.sharding.spec)
            while spec_axes and spec_axes[-1] is None:
                spec_axes.pop()
            layouts[jax.tree_util.keystr(k)] = str(tuple(spec_axes))
        resumed, _ = run(single, checkpoints.load_cache(saved, spec), logits)
        out[family] = {"single": [x.tolist() for x in one], "mesh": [np.asarray(logits).tolist()] +
                       [x.tolist() for x in meshed], "resumed": [x.tolist() for x in resumed],
                       "layouts": layouts}
    return out


if __name__ == "__main__":
    assert jax.device_count() == 8, "run with XLA_FLAGS=--xla_force_host_platform_device_count=8"
    mode, *args = sys.argv[1:]
    if mode == "losses":
        result = losses(args[0], args[1:] or list(MESHES))
    else:
        result = {"expert_parallel": expert_parallel, "resume": resume, "evaluate": evaluate,
                  "convert": convert, "decode": decode}[mode](*args)
    print("RESULT " + json.dumps(result))
