"""A JAX/Flax NNX model zoo for long-context decoders.

    model = zoo.from_hf(path, dtype="float32", attention_impl="xla")   # a Hugging Face checkpoint
    logits_BTV = model(input_ids_BT)
    zoo.to_hf(model, out_dir)                                           # loads in transformers
    model = zoo.load(path)                                              # a zoo checkpoint or workdir
"""
from zoo.models import build, build_abstract


def from_hf(path, *, dtype="float32", attention_impl="xla", mesh=None, rules="fsdp_tensor_expert"):
    from zoo.convert import from_hf as _from_hf
    return _from_hf(path, dtype=dtype, attention_impl=attention_impl, mesh=mesh, rules=rules)


def to_hf(model, path, **kwargs):
    from zoo.convert import to_hf as _to_hf
    return _to_hf(model, path, **kwargs)


def load(path, *, dtype="float32", attention_impl=None):
    from zoo.checkpoints import load as _load
    return _load(path, dtype=dtype, attention_impl=attention_impl)


__all__ = ["build", "build_abstract", "from_hf", "to_hf", "load"]
