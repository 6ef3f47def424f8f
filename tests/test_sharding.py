"""Sharded training on 8 simulated CPU devices reproduces one device, for every family and several
meshes; MoE layers run expert-parallel on meshes with an `expert` axis; parameters and optimizer state
carry the intended PartitionSpecs; checkpoints restore across mesh shapes, also for sharded evaluation;
Hugging Face conversion loads and writes sharded models. The multi-device work runs in subprocesses
(tests/sharding_runs.py) because `--xla_force_host_platform_device_count` must be set before jax starts;
they all start at once when the first test needs one, so the two CPU cores compile in parallel."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile

import jax
import pytest
from jax.sharding import Mesh, PartitionSpec as P
import numpy as np

from tests.conftest import ROOT, SUBPROCESS_ENV
from tests.sharding_runs import BATCH, MESHES
from zoo import sharding

HELPER = os.path.join(ROOT, "tests", "sharding_runs.py")
ENV = {**SUBPROCESS_ENV, "XLA_FLAGS": (SUBPROCESS_ENV.get("XLA_FLAGS", "") +
                                       " --xla_force_host_platform_device_count=8").strip(),
       "JAX_PLATFORMS": "cpu"}
# At least three meshes per family; MoE ones also expert-parallel. "MESH:REMAT": with that remat;
# "MESH:REMAT:IMPL": also with that attention_impl (pallas: the kernels in interpret mode, per shard).
FAMILY_MESHES = {
    "gemma4": ("data8", "fsdp8", "fsdp2_tensor4"),
    "gemma4_moe": ("fsdp2_expert2_tensor2:dots",),   # Gemma 4 with the 26B-A4B MoE block
    "laguna": ("data8", "fsdp2_tensor4", "fsdp2_expert2_tensor2:full", "fsdp2_expert2_tensor2::pallas"),
    "zaya1": ("data8", "fsdp8", "fsdp2_tensor4", "expert4_data2"),
    "deepseek_v4": ("data8", "fsdp8", "expert2_fsdp4:dots", "fsdp2_tensor4::pallas"),
}
EXPERT_SHARDS = {"expert2_fsdp4": 2, "expert4_data2": 4, "fsdp2_expert2_tensor2": 2}   # the `expert` axis
NUM_EXPERTS = 4   # every MoE micro config
RTOL = 1e-5
DECODE_FAMILIES = ("gemma4", "zaya1", "deepseek_v4")   # grouped-query, CCA, and compressed caches


@pytest.fixture(scope="module")
def runs():
    """Every helper run, started together; each test waits for its own."""
    tmp = tempfile.TemporaryDirectory()
    commands = {f: ["losses", f, *meshes] for f, meshes in FAMILY_MESHES.items()}
    commands["expert_parallel"] = ["expert_parallel"]
    commands["resume"] = ["resume", tmp.name]
    commands["evaluate"] = ["evaluate", os.path.join(tmp.name, "evaluate")]
    commands["convert"] = ["convert", os.path.join(tmp.name, "convert")]
    commands["decode"] = ["decode", tmp.name, *DECODE_FAMILIES]
    procs = {k: subprocess.Popen([sys.executable, HELPER, *args], cwd=ROOT, env=ENV, stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True) for k, args in commands.items()}
    cache = {}

    def get(key):
        if key not in cache:
            out, err = procs[key].communicate(timeout=600)
            assert procs[key].returncode == 0, err[-3000:]
            line = [x for x in out.splitlines() if x.startswith("RESULT ")][-1]
            cache[key] = json.loads(line[len("RESULT "):])
        return cache[key]

    yield get
    for p in procs.values():
        if p.poll() is None:
            p.kill()
            p.communicate()
    tmp.cleanup()


@pytest.mark.parametrize("family", list(FAMILY_MESHES))
def test_sharded_losses_match_one_device(runs, family):
    result = runs(family)
    single = np.asarray(result["single"]["losses"])
    assert np.all(np.isfinite(single))
    for mesh in FAMILY_MESHES[family]:
        mesh_name, _, impl = (mesh.split(":") + ["", ""])[:3]
        if impl:   # against one device with the same kernels; on the mesh each kernel sees its batch slice
            one = result[f"single:{impl}"]
            np.testing.assert_allclose(one["losses"], single, rtol=RTOL, err_msg=f"{family}: {impl} kernels")
            ways = int(np.prod([MESHES[mesh_name][a] for a in sharding.BATCH]))
            assert one["kernel_shapes"] and {s[0] for s in one["kernel_shapes"]} == {BATCH}, one["kernel_shapes"]
            assert {s[0] for s in result[mesh]["kernel_shapes"]} == {BATCH // ways}, result[mesh]["kernel_shapes"]
        np.testing.assert_allclose(result[mesh]["losses"], single, rtol=RTOL, err_msg=f"{family} on {mesh}")
        for name, s in result[mesh]["specs"].items():   # optimizer moments live where their parameter does
            assert s["mu"] == s["param"] == s["nu"], (family, mesh, name, s)


def test_partition_specs_of_named_params(runs):
    """Laguna micro: q_proj [embed 32, q_heads 4, head_dim 8]; experts gate [experts 4, embed 32, mlp 32];
    the other MoE families' expert weights split over `expert` too."""
    laguna = runs("laguna")
    expected = {
        "single": {"q_proj": (None, None, None), "expert_gate": (None, None, None)},
        "data8": {"q_proj": (None, None, None), "expert_gate": (None, None, None)},
        "fsdp2_tensor4": {"q_proj": ("fsdp", "tensor", None), "expert_gate": (None, "fsdp", "tensor")},
        "fsdp2_expert2_tensor2:full": {"q_proj": ("fsdp", "tensor", None),
                                       "expert_gate": ("expert", "fsdp", "tensor")},
    }
    for mesh, specs in expected.items():
        for name, spec in specs.items():
            assert laguna[mesh]["specs"][name]["param"] == str(spec), (mesh, name, laguna[mesh]["specs"][name])
    gemma = runs("gemma4")   # micro q_proj [32, 2 heads, 16]: 2 heads do not split 4 ways, so stay whole
    assert gemma["fsdp8"]["specs"]["q_proj"]["param"] == str(("fsdp", None, None))
    assert gemma["fsdp2_tensor4"]["specs"]["q_proj"]["param"] == str(("fsdp", None, None))
    expert_gates = {"gemma4_moe": {"fsdp2_expert2_tensor2:dots": ("expert", "fsdp", "tensor")},
                    "zaya1": {"expert4_data2": ("expert", None, None)},
                    "deepseek_v4": {"expert2_fsdp4:dots": ("expert", "fsdp", None)}}
    for family, specs in expert_gates.items():
        for mesh, spec in specs.items():
            assert runs(family)[mesh]["specs"]["expert_gate"]["param"] == str(spec), (family, mesh)


def test_moe_layers_run_expert_parallel(runs):
    """On a mesh whose `expert` axis has n > 1 devices, every grouped matmul of the training step (forward
    and backward) sees E / n experts: each shard computes only its own. The plain path, which gathers the
    expert weights, would show all E, as on the other meshes."""
    for family, meshes in FAMILY_MESHES.items():
        if family == "gemma4":   # dense
            continue
        result = runs(family)
        assert result["single"]["expert_groups"] == [NUM_EXPERTS], family
        for mesh in meshes:
            n = EXPERT_SHARDS.get(mesh.partition(":")[0], 1)
            assert result[mesh]["expert_groups"] == [NUM_EXPERTS // n], (family, mesh, result[mesh]["expert_groups"])


def test_expert_parallel_matches_routed_experts(runs):
    """`sharding.expert_parallel_experts` vs. `layers.moe.routed_experts` on random inputs, on expert=4 x
    data=2 and fsdp=2 x expert=2 x tensor=2 (expert_mlp split over tensor), also with 6 tokens that do not
    split over `expert`: the output and every gradient agree (relative to their largest entry); experts
    that do not split over the `expert` axis are refused naming both numbers."""
    result = runs("expert_parallel")
    for case in ("expert4_data2_M16", "fsdp2_expert2_tensor2_M16", "expert4_data2_M6"):
        assert max(result[case]["y"], *result[case]["grads"]) <= RTOL, (case, result[case])
    assert "6 experts do not split over the 4 devices of mesh axis 'expert'" in result["error"], result["error"]


def test_resume_on_a_different_mesh(runs):
    """4 steps as fsdp=8 vs. resuming the step-2 checkpoint as fsdp=2 x tensor=4: same losses."""
    result = runs("resume")
    assert len(result["whole"]) == len(result["resumed"]) == 2
    np.testing.assert_allclose(result["resumed"], result["whole"], rtol=RTOL)


def test_sharded_evaluation_matches_one_device(runs):
    """eval.py on a fsdp=8 checkpoint, on its config's mesh and with --mesh data=8 and fsdp=2 x tensor=4:
    one device's validation loss, the parameters restored into their shardings (micro embedding table
    [vocab 256, embed 32]: replicated over data, split over fsdp and tensor), and a batch that does not
    split over the batch axes refused by name."""
    result = runs("evaluate")
    expected = {"config": "(None, 'fsdp')", "data8": "(None, None)", "fsdp2_tensor4": "('tensor', 'fsdp')"}
    for mesh, spec in expected.items():
        np.testing.assert_allclose(result[mesh]["val_loss"], result["single"]["val_loss"], rtol=RTOL, err_msg=mesh)
        assert result[mesh]["table_spec"] == spec and result[mesh]["table_devices"] == 8, (mesh, result[mesh])
    assert "--batch_size 6 does not split over the 8 devices" in result["batch_error"], result["batch_error"]


def test_sharded_hf_conversion(runs):
    """from_hf onto fsdp=2 x tensor=4 places every parameter in its `state_shardings` layout (micro
    embedding table [vocab 256, embed 32], MLP gate [embed 32, mlp 64], q_proj [32, 2 heads, 16]: 2 heads
    do not split 4 ways) and gives one device's logits (the sharded sums add in another order: tolerance
    relative to the logits' scale); to_hf of the sharded model writes the same files; the CLI's --mesh
    writes a checkpoint that records its mesh and loads back to the same logits."""
    result = runs("convert")
    layouts = result["layouts"]
    assert len(layouts) > 40 and all(v["spec"] == v["expected"] and v["devices"] == 8 for v in layouts.values()), \
        {k: v for k, v in layouts.items() if v["spec"] != v["expected"] or v["devices"] != 8}
    expected = {"embed/table": "('tensor', 'fsdp')", "blocks/0/mlp/gate_proj": "('fsdp', 'tensor')",
                "blocks/0/attn/q_proj": "('fsdp', None, None)", "final_norm/scale": "(None,)"}
    for name, spec in expected.items():
        assert layouts[name]["spec"] == spec, (name, layouts[name])
    single = np.asarray(result["single"])
    for name in ("sharded", "cli"):
        np.testing.assert_allclose(result[name], single, rtol=RTOL, atol=RTOL * np.abs(single).max(), err_msg=name)
    assert result["same_files"] and "model.safetensors.index.json" in result["files"], result["files"]
    assert result["cli_mesh"] == {"data": 1, "fsdp": 2, "tensor": -1, "expert": 1}


def test_spec_rules_on_one_device_mesh():
    """In-process (one device): every rule set leaves everything replicated; rule tables are data."""
    mesh = Mesh(np.asarray(jax.devices()[:1]).reshape(1, 1, 1, 1), sharding.MESH_AXES)
    for name in sharding.RULES:
        rules = sharding.resolve_rules(name)
        assert sharding.spec(("embed", "q_heads", "head_dim"), (32, 4, 8), rules, mesh) == P(None, None, None)
    table = sharding.resolve_rules([["embed", ["fsdp"]], ["mlp", "tensor"]])
    assert table == (("embed", ("fsdp",)), ("mlp", ("tensor",)))
    with pytest.raises(ValueError, match="unknown mesh axes"):
        sharding.resolve_rules([["embed", ["model"]]])
    with pytest.raises(ValueError, match="unknown sharding rules preset"):
        sharding.resolve_rules("nope")
    with pytest.raises(ValueError, match="needs 8 devices"):
        sharding.make_mesh({"fsdp": 8}, devices=jax.devices()[:1])


def test_sharded_cache_decodes_as_one_device(runs):
    """The decoding cache sharded by the parameters' rules (zoo.sharding.cache_shardings: rows over
    `data`, kv heads over `tensor`) gives one device's logits through prefill and decode, keeps its layout
    across steps, and, saved with Orbax on the mesh, resumes decoding on one device."""
    result = runs("decode")
    for family in DECODE_FAMILIES:
        got = result[family]
        for name in ("mesh", "resumed"):
            ref = got["single"] if name == "mesh" else got["single"][1:]
            for a, b in zip(ref, got[name], strict=True):
                np.testing.assert_allclose(np.asarray(b), np.asarray(a), atol=1e-4, err_msg=f"{family} {name}")
        layouts = got["layouts"]
        assert layouts["['lengths_B']"] == "('data',)", family
        assert all(spec.startswith("('data'") for spec in layouts.values()), (family, layouts)
    # ZAYA1's micro config has 2 kv heads: its K and V caches split over tensor=2 as its kv projections do
    assert result["zaya1"]["layouts"]["['layers'][0]['k_BSKH']"] == "('data', None, 'tensor')"
    # Gemma 4's micro config has 1 kv head: nothing to split, so the heads stay whole
    assert result["gemma4"]["layouts"]["['layers'][0]['k_BSKH']"] == "('data',)"
