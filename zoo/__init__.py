"""A JAX/Flax NNX model zoo for long-context decoders.

    model = zoo.from_hf(path, dtype="float32", attention_impl="xla")   # a Hugging Face checkpoint
    logits_BTV = model(input_ids_BT)
    zoo.to_hf(model, out_dir)                                           # loads in transformers
    model = zoo.load(path)                                              # a zoo checkpoint or workdir
"""
from zoo.checkpoints import load
from zoo.convert import from_hf, to_hf
from zoo.models import build, build_abstract

__all__ = ["build", "build_abstract", "from_hf", "to_hf", "load"]
