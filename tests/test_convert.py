"""Checkpoint conversion: sharded and prefixed checkpoints, redundant tensors, and clear errors."""
from __future__ import annotations

import itertools
import json
import os

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
from zoo import convert, distributed
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


def _main_fails(capsys, args, message) -> str:
    """Runs `python -m zoo.convert ARGS` in-process; asserts status 1 and one line on stderr holding
    `message`."""
    from zoo.convert.__main__ import main
    assert main([str(a) for a in args]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and message in err, err
    return err


def test_damaged_inputs_are_named_in_one_line(hf_dir, tmp_path, capsys):
    """Random bytes, a file truncated by half and invalid JSON: each error names the file."""
    src, _ = hf_dir
    weights = (src / "model.safetensors").read_bytes()
    cases = {"random": np.random.default_rng(0).bytes(len(weights)), "truncated": weights[:len(weights) // 2]}
    for name, blob in cases.items():
        bad = tmp_path / name
        bad.mkdir()
        (bad / "model.safetensors").write_bytes(blob)
        (bad / "config.json").write_text((src / "config.json").read_text())
        err = _main_fails(capsys, ["hf-to-zoo", bad, tmp_path / "out"], f"{bad}/model.safetensors")
        assert ("is not a safetensors file" if name == "random" else "truncated") in err
    bad_json = tmp_path / "bad_json"
    bad_json.mkdir()
    (bad_json / "config.json").write_text('{"model_type": "gemma4",\n')
    _main_fails(capsys, ["hf-to-zoo", bad_json, tmp_path / "out"], f"{bad_json}/config.json is not valid JSON")
    assert not (tmp_path / "out").exists()


def test_destinations_are_refused_unless_overwrite_and_written_whole(hf_dir, tmp_path, capsys, monkeypatch):
    """One rule for both directions; the output is staged beside the destination and renamed into place,
    so a conversion that fails half-way leaves no destination (and an old one untouched)."""
    from zoo.convert import __main__ as cli
    src, expected = hf_dir
    zoo_dir, hf_out = tmp_path / "zoo", tmp_path / "hf"
    assert cli.main(["hf-to-zoo", str(src), str(zoo_dir)]) == 0
    _main_fails(capsys, ["hf-to-zoo", src, zoo_dir], f"{zoo_dir} already exists; refusing to overwrite it "
                "(pass --overwrite to replace it)")
    hf_out.mkdir()
    (hf_out / "notes.txt").write_text("mine")
    _main_fails(capsys, ["zoo-to-hf", zoo_dir, hf_out], f"{hf_out} already exists; refusing to overwrite it")
    assert sorted(os.listdir(hf_out)) == ["notes.txt"]

    def full_disk(tensors, path, **kwargs):   # writes one shard, then the disk is full
        write_shards(itertools.islice(tensors, 3), path)
        raise OSError(28, "No space left on device", os.path.join(path, "model-00002.safetensors"))
    monkeypatch.setattr("zoo.convert.write_shards", full_disk)
    _main_fails(capsys, ["zoo-to-hf", zoo_dir, hf_out, "--overwrite"], "No space left on device")
    assert sorted(os.listdir(hf_out)) == ["notes.txt"]                  # the old destination is untouched
    assert sorted(os.listdir(tmp_path)) == ["hf", "zoo"]                # and the staged output is gone
    monkeypatch.undo()

    capsys.readouterr()
    assert cli.main(["zoo-to-hf", str(zoo_dir), str(hf_out), "--overwrite"]) == 0
    assert "notes.txt" not in os.listdir(hf_out) and sorted(os.listdir(tmp_path)) == ["hf", "zoo"]
    reloaded = AutoModelForCausalLM.from_pretrained(hf_out, attn_implementation="eager").eval()
    assert np.abs(hf_logits(reloaded, IDS) - expected).max() <= 1e-4
    assert cli.main(["hf-to-zoo", str(src), str(zoo_dir), "--overwrite", "--dtype=bfloat16"]) == 0
    assert zoo.load(str(zoo_dir), dtype=jnp.bfloat16).embed.table[...].dtype == jnp.bfloat16


def test_dtypes_are_taken_as_names_or_jax_numpy_dtypes(hf_dir):
    src, expected = hf_dir
    for dtype in (jnp.float32, np.float32, np.dtype("float32"), "float32"):
        assert _max_diff_dtype(src, expected, dtype) <= 1e-4
    assert zoo.from_hf(str(src), dtype=jnp.bfloat16).embed.table[...].dtype == jnp.bfloat16
    with pytest.raises(ValueError, match="unknown dtype 'float8'"):
        zoo.from_hf(str(src), dtype="float8")


def _max_diff_dtype(path, expected, dtype):
    return np.abs(np.asarray(zoo.from_hf(str(path), dtype=dtype)(jnp.asarray(IDS))) - expected).max()


def test_multi_shard_conversion_shows_progress(hf_dir, tmp_path, capsys):
    src, expected = hf_dir
    _hf_model(DENSE, seed=4).save_pretrained(tmp_path, max_shard_size="20KB")
    model = convert.from_hf(str(tmp_path), progress=True)
    err = capsys.readouterr().err
    shards = len(set(json.loads((tmp_path / "model.safetensors.index.json").read_text())["weight_map"].values()))
    assert f"reading {shards} shard(s)" in err and "tensor" in err
    assert np.abs(np.asarray(model(jnp.asarray(IDS))) - expected).max() <= 1e-4


def test_exported_run_loads_in_a_transformers_pipeline(tmp_path):
    """zoo-to-hf of a byte-level run writes generation_config.json and a tokenizer: AutoTokenizer maps
    text to its bytes and pipeline("text-generation") generates what greedy decoding of the zoo model
    gives (full forward passes, argmax)."""
    from transformers import AutoTokenizer, pipeline

    from tests.conftest import get_config
    from zoo import checkpoints
    from zoo.convert.__main__ import main
    config = get_config()
    model = zoo.build(config.model, seed=2)
    checkpoints.save_model(model, str(tmp_path / "run"), config=config)
    assert main(["zoo-to-hf", str(tmp_path / "run"), str(tmp_path / "hf")]) == 0
    assert json.loads((tmp_path / "hf" / "generation_config.json").read_text())["eos_token_id"] == \
        model.config.eos_id
    text = "def main():\n    return"
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert tokenizer(text)["input_ids"] == list(text.encode())
    ids = list(text.encode())
    forward = jax.jit(lambda x: model(x))   # one compile: causal, so padding after the ids changes nothing
    for _ in range(6):
        padded = jnp.asarray([ids + [0] * (len(text) + 6 - len(ids))])
        ids.append(int(np.argmax(np.asarray(forward(padded))[0, len(ids) - 1])))
    generator = pipeline("text-generation", model=str(tmp_path / "hf"))
    out = generator(text, max_new_tokens=6, do_sample=False, return_tensors=True, eos_token_id=None)
    assert list(out[0]["generated_token_ids"]) == ids


def test_init_from_a_converted_checkpoint(tmp_path):
    """train.py --init_from=<hf-to-zoo output> starts from its parameters (the first step's loss is the
    converted model's training loss on batch 1) with its model config; --workdir=<converted> is refused
    in one line naming --init_from."""
    from tests.conftest import MICRO_CONFIG, get_config, read_metrics, run_script
    from zoo import checkpoints, data
    from zoo.convert.__main__ import main
    hf_src = tmp_path / "hf"
    _hf_model({**DENSE, "vocab_size": 256, "vocab_size_per_layer_input": 256}, seed=5).save_pretrained(hf_src)
    assert main(["hf-to-zoo", str(hf_src), str(tmp_path / "zoo")]) == 0
    res = run_script("train.py", f"--config={MICRO_CONFIG}", f"--workdir={tmp_path}/zoo")
    assert res.returncode == 1 and res.stderr.count("\n") == 1 and "--init_from" in res.stderr, res.stderr
    res = run_script("train.py", f"--config={MICRO_CONFIG}", f"--workdir={tmp_path}/ft", f"--init_from={tmp_path}/zoo",
                     "--config.train.steps=2", "--config.train.eval_every=100")
    assert res.returncode == 0, res.stderr
    converted = checkpoints.read_config(str(tmp_path / "zoo")).model
    assert checkpoints.read_config(str(tmp_path / "ft")).model.to_dict() == converted.to_dict()
    config = get_config()
    model = zoo.load(str(tmp_path / "zoo"))
    inputs_BT, targets_BT = data.train_batch(data.load_corpus(config.data), seed=0, step=1,
                                             batch_size=config.train.batch_size, seq_len=config.train.seq_len)
    expected = float(model.train_loss(jnp.asarray(inputs_BT), jnp.asarray(targets_BT))[0])
    assert read_metrics(str(tmp_path / "ft"))[0]["loss"] == pytest.approx(expected, rel=1e-5)
