"""`zoo.generate` token for token with transformers: greedy generation of 32 tokens from a tiny random
Hugging Face model of every family (every parameter perturbed, the parity tests' configs), after
`zoo.from_hf`, equals a greedy loop over transformers' full forward pass (no cache) and transformers'
cached `generate(do_sample=False)`. The 13-token prompts are longer than every window (4-6 tokens) and
than the compression ratios (4, 8), and no multiple of them."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import zoo
from tests import test_deepseek_v4_parity as dsv4
from tests import test_gemma4_parity as gemma4
from tests import test_laguna_parity as laguna
from tests import test_zaya1_parity as zaya1

NEW, PROMPT = 32, 13


def _hf_models():
    return {
        "gemma4": lambda: gemma4._hf_model(gemma4.DENSE, seed=1),
        "laguna": lambda: laguna._hf_model(laguna.PER_HEAD, seed=1),
        "zaya1": lambda: zaya1._hf_model(zaya1.RELEASED_SHAPE, 1, zaya1.IDS),
        "deepseek_v4": lambda: dsv4._hf_model(dsv4.CONFIG, seed=1),
    }


def _greedy_without_cache(model, ids: np.ndarray) -> np.ndarray:
    ids_t = torch.from_numpy(ids).long()
    with torch.no_grad():
        for _ in range(NEW):
            logits = model(input_ids=ids_t, use_cache=False).logits[:, -1]
            ids_t = torch.cat([ids_t, logits.argmax(-1, keepdim=True)], dim=1)
    return ids_t[:, ids.shape[1]:].numpy()


def _hf_generate(model, ids: np.ndarray) -> np.ndarray:
    model.generation_config.eos_token_id = None   # 32 tokens, whatever they are
    with torch.no_grad():
        out = model.generate(torch.from_numpy(ids).long(), max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False,
                             pad_token_id=0)
    return out[:, ids.shape[1]:].numpy()


@pytest.mark.parametrize("family", ["gemma4", "laguna", "zaya1", "deepseek_v4"])
def test_greedy_generation_matches_transformers(family, tmp_path):
    hf_model = _hf_models()[family]()
    hf_model.save_pretrained(tmp_path / "hf")
    vocab = hf_model.config.vocab_size
    ids = np.random.default_rng(3).integers(1, vocab, size=(1, PROMPT))
    want = _greedy_without_cache(hf_model, ids)

    model = zoo.from_hf(str(tmp_path / "hf"), dtype="float32")
    got = np.asarray(zoo.generate(model, ids, max_new_tokens=NEW, prefill_chunk=5))
    assert got.shape == (1, NEW) and got.dtype == np.int32
    np.testing.assert_array_equal(got, want, err_msg=f"{family}: zoo.generate vs transformers' uncached loop")
    np.testing.assert_array_equal(_hf_generate(hf_model, ids), want,
                                  err_msg=f"{family}: transformers' cached generate vs its uncached loop")
