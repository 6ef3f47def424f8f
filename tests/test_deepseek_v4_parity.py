"""DeepSeek-V4-like decoder against transformers' DeepseekV4ForCausalLM (fp32, eager, every parameter
perturbed, random hash tables), the round trip zoo -> HF -> transformers, and the loader on the released
format: DeepSeek's own names without the `model.` prefix, FP8 (e4m3, 128 x 128 block scales) and packed
FP4 (e2m1, a scale per 32 inputs) weights dequantised while streaming, and the multi-token-prediction
block, checked against transformers' own layers."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import optax
import pytest
import torch
from safetensors.numpy import save_file
from flax import nnx
from transformers import AutoModelForCausalLM, DeepseekV4Config, DeepseekV4ForCausalLM
from transformers.models.deepseek_v4.modeling_deepseek_v4 import DeepseekV4HyperHead, DeepseekV4RMSNorm

import zoo
from layers.attention import kernel_lowering
from tests.hf_utils import hf_logits, perturb_
from zoo.convert.safetensors_io import SafetensorsDir, dequantize
from zoo.decoder import cross_entropy
from zoo.train.trainer import make_train_step

TOL = 1e-4
CSA, HCA, SWA = "compressed_sparse_attention", "heavily_compressed_attention", "sliding_attention"
# 40 tokens: 10 CSA entries (ratio 4; each query keeps the indexer's top 3) and 5 HCA entries (ratio 8)
# per sequence, a 6-token window, two hash-routed MoE layers then learned routing, 4 mHC streams.
CONFIG = dict(
    vocab_size=64, hidden_size=32, num_hidden_layers=5, num_attention_heads=4, head_dim=16,
    partial_rotary_factor=0.5, q_lora_rank=24, o_groups=2, o_lora_rank=12, sliding_window=6,
    layer_types=[SWA, CSA, HCA, CSA, HCA], compress_rates={CSA: 4, HCA: 8},
    index_n_heads=8, index_head_dim=8, index_topk=3, n_routed_experts=4, num_experts_per_tok=2,
    moe_intermediate_size=32, mlp_layer_types=["hash_moe", "hash_moe", "moe", "moe", "moe"], hc_mult=4,
    swiglu_limit=1.5, routed_scaling_factor=1.7,
    rope_parameters={"rope_type": "yarn", "factor": 16.0, "original_max_position_embeddings": 32,
                     "beta_fast": 32.0, "beta_slow": 1.0})
# The MTP block as released: a sliding-window layer with learned routing.
MTP_CONFIG = dict(CONFIG, num_hidden_layers=1, layer_types=[SWA], mlp_layer_types=["moe"])
E2M1 = np.array([0, 0.5, 1, 1.5, 2, 3, 4, 6, -0.0, -0.5, -1, -1.5, -2, -3, -4, -6], np.float32)


def _hf_model(config: dict, seed: int):
    torch.manual_seed(seed)
    config = DeepseekV4Config(**config)
    config._attn_implementation = "eager"
    model = DeepseekV4ForCausalLM(config).eval()
    perturb_(model, seed)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, buf in model.named_buffers():
            if name.endswith("tid2eid"):   # integer tables (perturb_ skips them): distinct random experts
                buf.copy_(torch.stack([torch.randperm(config.n_routed_experts, generator=gen)[:buf.shape[1]]
                                       for _ in range(buf.shape[0])]))
    return model


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("dsv4")
    model = _hf_model(CONFIG, seed=1)
    model.save_pretrained(root / "hf")
    _hf_model(MTP_CONFIG, seed=2).save_pretrained(root / "mtp_donor")
    ids = np.random.default_rng(0).integers(0, CONFIG["vocab_size"], size=(2, 41))
    return root, ids, hf_logits(model, ids[:, :40])


def test_logits_match_transformers_and_round_trip(saved, tmp_path):
    root, ids, expected = saved
    model = zoo.from_hf(str(root / "hf"), dtype="float32")
    ours = np.asarray(nnx.jit(lambda m, x: m(x))(model, jnp.asarray(ids[:, :40])))
    assert ours.shape == expected.shape
    assert np.abs(ours - expected).max() <= TOL, np.abs(ours - expected).max()

    zoo.to_hf(model, str(tmp_path / "back"))
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "back", attn_implementation="eager").eval()
    assert type(reloaded).__name__ == "DeepseekV4ForCausalLM"
    again = hf_logits(reloaded, ids[:, :40])
    assert np.abs(again - expected).max() <= TOL, np.abs(again - expected).max()


# ---- the released formats ------------------------------------------------------------------------------

FLASH_RELEASE = dict(  # the release's config.json keys (transformers folds the legacy ones in)
    model_type="deepseek_v4", vocab_size=129280, hidden_size=4096, num_hidden_layers=43, num_attention_heads=64,
    num_key_value_heads=1, head_dim=512, qk_rope_head_dim=64, q_lora_rank=1024, o_groups=8, o_lora_rank=1024,
    sliding_window=128, compress_ratios=[0, 0] + [4, 128] * 20 + [4] + [0], rope_theta=10000,
    compress_rope_theta=160000, rope_scaling={"type": "yarn", "factor": 16, "original_max_position_embeddings":
                                              65536, "beta_fast": 32, "beta_slow": 1},
    index_n_heads=64, index_head_dim=128, index_topk=512, n_routed_experts=256, n_shared_experts=1,
    num_experts_per_tok=6, moe_intermediate_size=2048, routed_scaling_factor=1.5, scoring_func="sqrtsoftplus",
    num_hash_layers=3, swiglu_limit=10.0, hc_mult=4, hc_sinkhorn_iters=20, hc_eps=1e-6, rms_norm_eps=1e-6,
    num_nextn_predict_layers=1, tie_word_embeddings=False, max_position_embeddings=1048576)


def test_released_flash_config_is_the_flash_preset():
    """The layer pattern from `compress_ratios` (its extra trailing 0 is the MTP block), YaRN on the
    compressed layers only; and our HF config builds transformers' config without complaint."""
    from configs.deepseek_v4 import get_config
    from zoo import deepseek_v4

    ours = deepseek_v4.from_hf_config(FLASH_RELEASE)
    preset = get_config("flash").model
    for key in ("attention_types", "mtp_attention_type", "num_hash_layers", "rope_dim", "index_top_k",
                "num_experts", "top_k", "routed_scale", "hc_streams", "window", "csa_ratio", "hca_ratio"):
        assert ours[key] == preset[key], key
    assert ours.rope.to_dict() == {k: dict(v, truncate=True) if v["kind"] == "yarn" else v
                                   for k, v in preset.rope.to_dict().items()}
    hf = DeepseekV4Config(**deepseek_v4.to_hf_config(ours))
    assert hf.layer_types[:3] == [SWA, SWA, CSA] and hf.mlp_layer_types[:4] == ["hash_moe"] * 3 + ["moe"]
    assert hf.rope_parameters["compress"]["attention_factor"] == 1.0
    assert hf.rope_parameters["main"]["rope_type"] == "default"

def _pow2_scale(amax: np.ndarray, top: float) -> np.ndarray:
    return np.exp2(np.ceil(np.log2(np.maximum(amax, 1e-30) / top))).astype(np.float32)


def _quantise_fp8(w: np.ndarray, block: int = 128):
    """(e4m3 codes, UE8M0 scale per block x block tile, the dequantised float32 weight)."""
    rows, cols = w.shape
    padded = np.zeros((-(-rows // block) * block, -(-cols // block) * block), np.float32)
    padded[:rows, :cols] = w
    tiles = padded.reshape(padded.shape[0] // block, block, padded.shape[1] // block, block)
    scale = _pow2_scale(np.abs(tiles).max(axis=(1, 3)), 448.0)
    full = np.repeat(np.repeat(scale, block, 0), block, 1)[:rows, :cols]
    codes = (w / full).astype(ml_dtypes.float8_e4m3fn)
    return codes, scale.astype(ml_dtypes.float8_e8m0fnu), codes.astype(np.float32) * full


def _quantise_fp4(w: np.ndarray, group: int = 32):
    """(int8 with two e2m1 codes per byte, low nibble = even input; UE8M0 scale per `group` inputs; the
    dequantised float32 weight)."""
    rows, cols = w.shape
    scale = _pow2_scale(np.abs(w.reshape(rows, cols // group, group)).max(-1), 6.0)
    full = np.repeat(scale, group, axis=1)
    codes = np.abs((w / full)[..., None] - E2M1).argmin(-1).astype(np.uint8)
    packed = (codes[:, 0::2] | (codes[:, 1::2] << 4)).view(np.int8)
    return packed, scale.astype(ml_dtypes.float8_e8m0fnu), E2M1[codes] * full


def test_dequantize_fp8_blocks_and_fp4_nibbles():
    rng = np.random.default_rng(0)
    w = rng.normal(size=(200, 300)).astype(np.float32) * np.linspace(0.01, 3, 300, dtype=np.float32)
    codes, scale, expected = _quantise_fp8(w)
    assert scale.shape == (2, 3)
    np.testing.assert_array_equal(dequantize(codes, scale), expected)
    np.testing.assert_allclose(expected, w, rtol=0.07, atol=1e-3)
    w = rng.normal(size=(5, 96)).astype(np.float32)
    packed, scale, expected = _quantise_fp4(w)
    assert packed.shape == (5, 48) and scale.shape == (5, 3)
    np.testing.assert_array_equal(dequantize(packed, scale), expected)


def _released(tensors: dict, strip: str, prefix: str, quantised: dict, plain: dict) -> None:
    """HF-saved tensors renamed the way DeepSeek's release spells them (`strip` replaced by `prefix`),
    dense matrices in FP8 and routed experts in FP4, into `quantised`; the same tensors under their HF
    names with the dequantised values into `plain`."""
    renames = {"embed_tokens.weight": "embed.weight", "hc_head.hc_fn": "hc_head_fn",
               "hc_head.hc_base": "hc_head_base", "hc_head.hc_scale": "hc_head_scale"}
    for hf_name, value in tensors.items():
        name = hf_name.removeprefix(strip)
        name = renames.get(name, name).replace("attn.norm.", "attn.kv_norm.")
        name = prefix + name.replace("indexer.weights_proj", "indexer.scorer.weights_proj")
        if "ffn.experts." in name or name.endswith(("wq_a.weight", "wkv.weight", "wo_b.weight",
                                                     "shared_experts.w2.weight", "indexer.wq_b.weight")):
            codes, scale, value = (_quantise_fp4 if "ffn.experts." in name else _quantise_fp8)(value)
            quantised[name], quantised[name.removesuffix("weight") + "scale"] = codes, scale
        else:
            quantised[name] = value
        plain[hf_name] = value


def _save(directory, tensors: dict, config_from) -> None:
    directory.mkdir()
    save_file(tensors, str(directory / "model.safetensors"))
    (directory / "config.json").write_text((config_from / "config.json").read_text())


def test_released_format_dequantised_with_mtp(saved, tmp_path):
    root, ids, _ = saved
    main, donor = SafetensorsDir(str(root / "hf")), SafetensorsDir(str(root / "mtp_donor"))
    quantised, plain = {}, {}
    _released({n: main.get(n) for n in main.names()}, "model.", "", quantised, plain)
    donor_plain = {n: donor.get(n) for n in donor.names()}
    _released({n: v for n, v in donor_plain.items() if n.startswith("model.layers.0.")}, "model.layers.0.",
              "mtp.0.", quantised, donor_plain)
    rng = np.random.default_rng(3)
    D, n = CONFIG["hidden_size"], CONFIG["hc_mult"]
    extras = {"e_proj.weight": rng.normal(size=(D, D)) * D ** -0.5,
              "h_proj.weight": rng.normal(size=(D, D)) * D ** -0.5,
              "hc_head_fn": rng.normal(size=(n, n * D)) * (n * D) ** -0.5,
              "enorm.weight": 1 + 0.3 * rng.normal(size=D), "hnorm.weight": 1 + 0.3 * rng.normal(size=D),
              "norm.weight": 1 + 0.3 * rng.normal(size=D), "hc_head_base": 1 + 0.3 * rng.normal(size=n),
              "hc_head_scale": 1 + 0.3 * rng.normal(size=1)}
    extras = {k: v.astype(np.float32) for k, v in extras.items()}
    quantised.update({"mtp.0." + k: v for k, v in extras.items()})
    quantised["mtp.0.e_proj.weight"], quantised["mtp.0.e_proj.scale"], extras["e_proj.weight"] = \
        _quantise_fp8(extras["e_proj.weight"])
    _save(tmp_path / "released", quantised, root / "hf")
    _save(tmp_path / "plain", plain, root / "hf")
    _save(tmp_path / "donor", donor_plain, root / "mtp_donor")

    model = zoo.from_hf(str(tmp_path / "released"), dtype="float32")
    assert model.config.mtp_depth == 1
    forward = nnx.jit(lambda m, x, y: m.forward_with_mtp(x, y))
    logits, (mtp_logits,) = forward(model, jnp.asarray(ids[:, :40]), jnp.asarray(ids[:, 1:]))

    # transformers on the dequantised values: the main logits, and the MTP block as DeepSeek's reference
    # runs it: h' = layer(e_proj(enorm(embed(next))) + h_proj(hnorm(h))), logits = head(norm(hc_head(h')))
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "plain", attn_implementation="eager").eval()
    layer = AutoModelForCausalLM.from_pretrained(tmp_path / "donor", attn_implementation="eager").model.layers[0]
    captured = {}
    hf.model.layers[0].register_forward_pre_hook(lambda m, a, kw: captured.update(kw), with_kwargs=True)
    hf.model.hc_head.register_forward_pre_hook(lambda m, a: captured.update(streams=a[0]))
    expected = hf_logits(hf, ids[:, :40])
    assert np.abs(np.asarray(logits) - expected).max() <= TOL, np.abs(np.asarray(logits) - expected).max()

    t = {k: torch.from_numpy(v) for k, v in extras.items()}
    norms = {k: DeepseekV4RMSNorm(D, eps=hf.config.rms_norm_eps) for k in ("enorm", "hnorm", "norm")}
    head = DeepseekV4HyperHead(hf.config)
    with torch.no_grad():
        for k, norm in norms.items():
            norm.weight.copy_(t[k + ".weight"])
        for k in ("fn", "base", "scale"):
            getattr(head, "hc_" + k).copy_(t["hc_head_" + k])
        ahead = torch.from_numpy(ids[:, 1:]).long()
        x = (norms["enorm"](hf.model.embed_tokens(ahead)) @ t["e_proj.weight"].T)[:, :, None]
        x = x + norms["hnorm"](captured.pop("streams")) @ t["h_proj.weight"].T
        kwargs = {k: captured[k] for k in ("position_embeddings", "position_ids", "attention_mask")}
        x = layer(x, input_ids=ahead, **kwargs)
        want = hf.lm_head(norms["norm"](head(x))).numpy()
    assert np.abs(np.asarray(mtp_logits) - want).max() <= TOL, np.abs(np.asarray(mtp_logits) - want).max()

    # zoo -> HF keeps the MTP block (top-level `mtp.0.`, which transformers skips) for the way back
    zoo.to_hf(model, str(tmp_path / "back"))
    again = zoo.from_hf(str(tmp_path / "back"), dtype="float32")
    assert again.config.mtp_depth == 1
    for a, b in zip(jax.tree.leaves(nnx.state(model, nnx.Param)), jax.tree.leaves(nnx.state(again, nnx.Param))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


# ---- the Pallas kernels inside the model ------------------------------------------------------------------

def test_pallas_kernels_match_transformers_and_the_reference_gradients(saved):
    """attention_impl="pallas" runs the CSA, HCA and sliding layers through the kernels (interpret mode on
    CPU): the same logits as transformers, and the same loss gradients as the pure-JAX path."""
    root, ids, expected = saved
    inputs, targets = jnp.asarray(ids[:, :40]), jnp.asarray(ids[:, 1:41])
    models = {impl: zoo.from_hf(str(root / "hf"), dtype="float32", attention_impl=impl) for impl in ("xla", "pallas")}
    assert kernel_lowering(models["pallas"].blocks[1].attn.impl) == "pallas_gpu"
    program = str(jax.make_jaxpr(lambda x: models["pallas"](x))(inputs))
    for kernel in ("indexer_scores", "csa_forward", "hca_forward", "flash_attention_forward"):
        assert f"name={kernel}" in program, f"{kernel} is not in the model's program"
    ours = np.asarray(nnx.jit(lambda model, x: model(x))(models["pallas"], inputs))
    assert np.abs(ours - expected).max() <= TOL, np.abs(ours - expected).max()

    def grads(model):
        graphdef, state = nnx.split(model, nnx.Param)
        return jax.jit(jax.grad(lambda p: cross_entropy(nnx.merge(graphdef, p)(inputs), targets)[0]))(state)

    g_xla, g_pallas = (jax.tree.leaves(grads(models[impl])) for impl in ("xla", "pallas"))
    for a, b in zip(g_xla, g_pallas):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-4, atol=1e-6)


def test_pallas_training_steps_match_xla(saved):
    """Three training steps from the parity weights: the kernels' path trains like the pure-JAX one.
    Plain SGD, so parameter differences stay proportional to gradient differences (Adam's normalisation
    turns float32 noise in near-zero gradients into steps of ~the learning rate, in either direction)."""
    root, ids, _ = saved
    inputs, targets = jnp.asarray(ids[:, :40]), jnp.asarray(ids[:, 1:41])
    losses, tx = {}, optax.sgd(0.5)
    for impl in ("xla", "pallas"):
        graphdef, params = nnx.split(zoo.from_hf(str(root / "hf"), dtype="float32", attention_impl=impl), nnx.Param)
        params = nnx.to_pure_dict(params)
        opt_state, step = tx.init(params), make_train_step(graphdef, tx, "float32")
        losses[impl] = []
        for _ in range(3):
            params, opt_state, metrics = step(params, opt_state, inputs, targets)
            losses[impl].append(float(metrics["loss"]))
    assert losses["xla"][2] < losses["xla"][0] - 0.5, losses      # the steps did train
    np.testing.assert_allclose(losses["pallas"], losses["xla"], rtol=1e-5)
