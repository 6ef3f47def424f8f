"""Checkpoint conversion: sharded and prefixed checkpoints, redundant tensors, and clear errors."""
from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

import zoo
from tests.hf_utils import hf_logits
from tests.test_distributed import run_processes
from tests.test_gemma4_parity import DENSE, _hf_model
from zoo import distributed
from zoo.convert.safetensors_io import SafetensorsDir, write_shards

IDS = np.random.default_rng(3).integers(0, DENSE["vocab_size"], size=(1, 11))


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("hf")
    model = _hf_model(DENSE, seed=4)
    model.save_pretrained(path)
    return path, hf_logits(model, IDS)


def _rewrite(src, dst, rename=lambda n: n, extra=(), drop=(), reshape=None, config=None):
    """Copies a checkpoint with renamed, extra, dropped or reshaped tensors."""
    tensors = SafetensorsDir(str(src))

    def items():
        for name in tensors.names():
            if name in drop:
                continue
            array = tensors.get(name)
            if reshape and name == reshape[0]:
                array = array[: reshape[1]]
            yield rename(name), array
        yield from extra
    write_shards(items(), str(dst))
    hf = json.loads((src / "config.json").read_text())
    (dst / "config.json").write_text(json.dumps(config(hf) if config else hf))


def _max_diff(path, expected):
    return np.abs(np.asarray(zoo.from_hf(str(path))(jnp.asarray(IDS))) - expected).max()


def test_sharded_checkpoint(hf_dir, tmp_path):
    src, expected = hf_dir
    _hf_model(DENSE, seed=4).save_pretrained(tmp_path, max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    assert _max_diff(tmp_path, expected) <= 1e-4


def test_multimodal_prefix_and_redundant_shared_kv(hf_dir, tmp_path):
    src, expected = hf_dir
    redundant = [("model.language_model.layers.5.self_attn.k_proj.weight", np.ones((64, 48), np.float32)),
                 ("model.language_model.layers.5.self_attn.v_proj.weight", np.ones((64, 48), np.float32))]
    _rewrite(src, tmp_path, rename=lambda n: n.replace("model.", "model.language_model.", 1), extra=redundant,
             config=lambda hf: {"model_type": "gemma4", "text_config": hf})
    assert _max_diff(tmp_path, expected) <= 1e-4


def test_to_hf_writes_shards_that_transformers_loads(hf_dir, tmp_path):
    src, expected = hf_dir
    zoo.to_hf(zoo.from_hf(str(src)), str(tmp_path), max_shard_bytes=30_000)
    assert len(json.loads((tmp_path / "model.safetensors.index.json").read_text())["weight_map"]) > 10
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").eval()
    assert np.abs(hf_logits(reloaded, IDS) - expected).max() <= 1e-4


def test_bfloat16_load_errs_no_more_than_transformers_in_bfloat16(hf_dir):
    src, expected = hf_dir
    model = zoo.from_hf(str(src), dtype="bfloat16")
    assert model.embed.table[...].dtype == jnp.bfloat16
    ours_err = np.abs(np.asarray(model(jnp.asarray(IDS))) - expected).max()
    hf_bf16 = AutoModelForCausalLM.from_pretrained(src, dtype=torch.bfloat16, attn_implementation="eager").eval()
    hf_err = np.abs(hf_logits(hf_bf16, IDS) - expected).max()
    assert ours_err <= 1.5 * hf_err + 0.05, (ours_err, hf_err)


def test_other_model_type_is_refused(hf_dir, tmp_path):
    src, _ = hf_dir
    _rewrite(src, tmp_path, config=lambda hf: {**hf, "model_type": "llama"})
    with pytest.raises(ValueError, match="unsupported model_type 'llama'"):
        zoo.from_hf(str(tmp_path))


def test_missing_tensor_is_named(hf_dir, tmp_path):
    src, _ = hf_dir
    _rewrite(src, tmp_path, drop={"model.layers.2.mlp.up_proj.weight"})
    with pytest.raises(ValueError, match="lacks tensor 'model.layers.2.mlp.up_proj.weight'"):
        zoo.from_hf(str(tmp_path))


def test_wrongly_shaped_tensor_is_named(hf_dir, tmp_path):
    src, _ = hf_dir
    _rewrite(src, tmp_path, reshape=("model.layers.1.self_attn.q_proj.weight", 100))
    with pytest.raises(ValueError, match=r"'model.layers.1.self_attn.q_proj.weight' has shape \(100, 48\)"):
        zoo.from_hf(str(tmp_path))


def test_missing_directory_and_config(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such checkpoint directory"):
        zoo.from_hf(str(tmp_path / "nope"))
    with pytest.raises(FileNotFoundError, match="has no config.json"):
        zoo.from_hf(str(tmp_path))


def test_safetensors_round_trip_keeps_dtypes(tmp_path):
    import ml_dtypes
    arrays = {"a": np.arange(6, dtype=np.float32).reshape(2, 3),
              "b": np.linspace(-2, 2, 5).astype(ml_dtypes.bfloat16), "c": np.array([1, -2], np.int64)}
    write_shards(arrays.items(), str(tmp_path), max_shard_bytes=16)
    back = SafetensorsDir(str(tmp_path))
    assert sorted(back.names()) == ["a", "b", "c"]
    for k, v in arrays.items():
        np.testing.assert_array_equal(back.get(k), v)
        assert back.get(k).dtype == v.dtype
    torch_loaded = {}
    from safetensors.torch import load_file
    for f in sorted(tmp_path.glob("*.safetensors")):
        torch_loaded.update(load_file(f))
    assert torch_loaded["b"].dtype == torch.bfloat16


def test_command_line_round_trip(hf_dir, tmp_path):
    import subprocess
    import sys
    src, expected = hf_dir
    for direction, a, b in (("hf-to-zoo", src, tmp_path / "zoo"), ("zoo-to-hf", tmp_path / "zoo", tmp_path / "hf")):
        run = subprocess.run([sys.executable, "-m", "zoo.convert", direction, str(a), str(b)],
                             capture_output=True, text=True, timeout=300)
        assert run.returncode == 0, run.stderr
    ours = np.asarray(zoo.load(str(tmp_path / "zoo"))(jnp.asarray(IDS)))
    assert np.abs(ours - expected).max() <= 1e-4
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", attn_implementation="eager").eval()
    assert np.abs(hf_logits(reloaded, IDS) - expected).max() <= 1e-4
    bad = subprocess.run([sys.executable, "-m", "zoo.convert", "hf-to-zoo", str(tmp_path / "nope"), str(tmp_path / "x")],
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode == 1 and bad.stderr.strip().count("\n") == 0 and "no such checkpoint directory" in bad.stderr


@pytest.mark.parametrize("mesh, message", [("model=2", "--mesh: unknown mesh axis 'model'"),
                                           ("fsdp=two", "--mesh: a mesh must look like"),
                                           ("fsdp=16", "needs 16 devices")])
def test_command_line_refuses_a_bad_mesh(hf_dir, tmp_path, capsys, mesh, message):
    from zoo.convert.__main__ import main
    src, _ = hf_dir
    assert main(["hf-to-zoo", str(src), str(tmp_path / "zoo"), "--mesh", mesh]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.strip().count("\n") == 0 and message in err, err
    assert not (tmp_path / "zoo").exists()


def test_command_line_takes_the_distributed_flags(hf_dir, tmp_path, monkeypatch, capsys):
    from zoo.convert.__main__ import main
    src, _ = hf_dir
    calls = []
    monkeypatch.setattr(jax.distributed, "initialize", lambda **kwargs: calls.append(kwargs))
    assert main(["hf-to-zoo", str(src), str(tmp_path / "zoo"), "--distributed"]) == 0
    assert calls == [{}] and (tmp_path / "zoo" / "config.json").exists()

    def refuse(**kwargs):
        raise RuntimeError("connection refused\nto host0:1234")
    monkeypatch.setattr(jax.distributed, "initialize", refuse)
    args = ["--coordinator_address=host0:1234", "--num_processes=2", "--process_id=1"]
    assert main(["zoo-to-hf", str(tmp_path / "zoo"), str(tmp_path / "hf"), *args]) == 1
    assert capsys.readouterr().err == ("error: jax.distributed.initialize(coordinator_address='host0:1234', "
                                       "num_processes=2, process_id=1) failed: connection refused to host0:1234\n")
    assert not (tmp_path / "hf").exists()


def test_to_hf_writes_nothing_on_other_processes(hf_dir, tmp_path, monkeypatch):
    src, _ = hf_dir
    model = zoo.from_hf(str(src))
    monkeypatch.setattr(distributed, "is_primary", lambda: False)
    zoo.to_hf(model, str(tmp_path / "hf"))
    assert not (tmp_path / "hf").exists()


def test_command_line_round_trip_on_two_processes(hf_dir, tmp_path):
    """A real two-process CPU job with the model sharded over both processes' devices (fsdp=2): hf-to-zoo
    saves each process's shards, zoo-to-hf gathers every tensor across them; process 0 writes."""
    src, expected = hf_dir
    for direction, a, b in (("hf-to-zoo", src, tmp_path / "zoo"), ("zoo-to-hf", tmp_path / "zoo", tmp_path / "hf")):
        results = run_processes(["-m", "zoo.convert", direction, str(a), str(b), "--mesh=fsdp=2"])
        for returncode, _, stderr in results:
            assert returncode == 0, stderr
        assert [f"wrote {b}" in out for _, out, _ in results] == [True, False]
    assert json.loads((tmp_path / "zoo" / "config.json").read_text())["mesh"]["fsdp"] == 2
    ours = np.asarray(zoo.load(str(tmp_path / "zoo"))(jnp.asarray(IDS)))
    assert np.abs(ours - expected).max() <= 1e-4
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", attn_implementation="eager").eval()
    assert np.abs(hf_logits(reloaded, IDS) - expected).max() <= 1e-4
