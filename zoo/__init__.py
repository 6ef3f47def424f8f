"""A JAX/Flax NNX model zoo for long-context decoders.

    model = zoo.from_hf(path, dtype="float32", attention_impl="xla")   # a Hugging Face checkpoint
    logits_BTV = model(input_ids_BT)
    zoo.to_hf(model, out_dir)                                           # loads in transformers
    model = zoo.load(path)                                              # a zoo checkpoint or workdir
    new_ids_BN = zoo.generate(model, prompt_ids_BT, max_new_tokens=32)  # cached decoding
    cache = zoo.init_cache(model, batch_size=1, max_len=4096)           # shapes only under jax.eval_shape
"""
from zoo.checkpoints import load
from zoo.convert import from_hf, to_hf
from zoo.inference import generate, init_cache
from zoo.models import build, build_abstract

__all__ = ["build", "build_abstract", "from_hf", "to_hf", "load", "generate", "init_cache"]
