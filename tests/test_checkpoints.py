"""The zoo checkpoint layout: save_model / load round trips, dtype casting on load, clear errors."""
from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
import zoo
from tests.conftest import get_config
from zoo import checkpoints


@nnx.jit
def forward(model, tokens_BT):
    return model(tokens_BT)


@pytest.fixture(scope="module")
def model():
    return zoo.build(get_config().model, seed=3)


@pytest.fixture(scope="module")
def tokens_BT():
    return jnp.asarray(np.random.default_rng(0).integers(0, 256, size=(2, 24)), jnp.int32)


def test_round_trip_gives_identical_logits(model, tokens_BT, tmp_path):
    path = checkpoints.save_model(model, str(tmp_path / "ckpt"))
    assert sorted(os.listdir(path)) == ["checkpoints", "config.json"]
    assert os.listdir(os.path.join(path, "checkpoints")) == ["0"]
    with open(os.path.join(path, "config.json")) as f:
        saved = json.load(f)
    assert saved["model"]["d_model"] == 32 and saved["train"]["steps"] == 1000   # base_config defaults
    loaded = zoo.load(path)
    np.testing.assert_array_equal(np.asarray(forward(loaded, tokens_BT)), np.asarray(forward(model, tokens_BT)))
    assert loaded.config.to_dict() == model.config.to_dict()


def test_load_casts_while_reading_and_sets_attention_impl(model, tokens_BT, tmp_path):
    path = checkpoints.save_model(model, str(tmp_path / "ckpt"), config=get_config())
    loaded = checkpoints.load(path, dtype="bfloat16", attention_impl="auto")
    assert {x.dtype for x in jax.tree.leaves(nnx.state(loaded, nnx.Param))} == {jnp.dtype(jnp.bfloat16)}
    assert loaded.config.dtype == "bfloat16" and loaded.config.attention_impl == "auto"
    np.testing.assert_allclose(np.asarray(forward(loaded, tokens_BT)), np.asarray(forward(model, tokens_BT)), atol=0.5)


def test_save_refuses_to_overwrite(model, tmp_path):
    path = checkpoints.save_model(model, str(tmp_path / "ckpt"))
    with pytest.raises(FileExistsError, match="refusing to overwrite"):
        checkpoints.save_model(model, path)


def test_clear_errors(model, tmp_path):
    with pytest.raises(FileNotFoundError, match="no such checkpoint directory"):
        zoo.load(str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="has no config.json"):
        zoo.load(str(tmp_path / "empty"))
    checkpoints.write_config(get_config(), str(tmp_path / "no_ckpt"))
    with pytest.raises(FileNotFoundError, match="no checkpoints/ folder"):
        zoo.load(str(tmp_path / "no_ckpt"))
    os.makedirs(tmp_path / "no_ckpt" / "checkpoints")
    with pytest.raises(FileNotFoundError, match="holds no finished checkpoint"):
        zoo.load(str(tmp_path / "no_ckpt"))
    with pytest.raises(ValueError, match="unknown dtype"):
        zoo.load(str(tmp_path / "no_ckpt"), dtype="float8")


def test_mismatched_config_is_named(model, tmp_path):
    path = checkpoints.save_model(model, str(tmp_path / "ckpt"))
    config = checkpoints.read_config(path)
    config.model.d_model = 48
    checkpoints.write_config(config, path)
    with pytest.raises(ValueError, match="does not match the config's model"):
        zoo.load(path)
