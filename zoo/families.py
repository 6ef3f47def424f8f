"""The model families, each one `Family` object, registered in FAMILIES (config `model.family` -> family).

A family is its block wiring (norm placement, PLE gating, residual scaling, hyper-connection streams; the
layers themselves come from `layers.kinds`), its config builder and checks, and its Hugging Face config
and state-dict mapping. Registering checks that every piece is there.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from zoo import deepseek_v4, deepseek_v4_costs, gemma4, laguna, zaya1


@dataclasses.dataclass(frozen=True)
class Family:
    """name: the config's `model.family`; block: `Block(cfg, layer_index, rngs=...)` called as
    `block(x, ctx)`; model_config: the family's config builder (its few knobs -> a model config);
    validate(cfg): fails naming the first bad setting; hf_model_types / hf_architecture: the Hugging Face
    `model_type`s read and the architecture written; from_hf_config(dict) / to_hf_config(cfg): the config
    both ways; hf_rules(cfg): the state-dict `zoo.state_dict.Rule`s; hf_ignored(cfg, name): checkpoint
    tensors accepted and dropped; hf_update_config(cfg, names): settings only the checkpoint's tensor names
    tell (optional); report_extras(cfg, context, dtype): figures only this family reports (optional)."""
    name: str
    block: type
    model_config: Callable[..., Any]
    validate: Callable[[Any], None]
    hf_model_types: tuple[str, ...]
    hf_architecture: str
    from_hf_config: Callable[[dict], Any]
    to_hf_config: Callable[[Any], dict]
    hf_rules: Callable[[Any], list]
    hf_ignored: Callable[[Any, str], bool]
    hf_update_config: Callable[[Any, Any], None] | None = None
    report_extras: Callable[[Any, int, Any], dict] | None = None

    def __post_init__(self):
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            optional = field.default is None
            if value is None and optional:
                continue
            if field.name == "hf_model_types":
                ok = isinstance(value, tuple) and value and all(isinstance(t, str) for t in value)
            elif field.name in ("name", "hf_architecture"):
                ok = isinstance(value, str) and value
            else:
                ok = callable(value)
            if not ok:
                raise TypeError(f"family {self.name!r}: {field.name} is missing or of the wrong kind ({value!r})")


def _family(module, name: str, **optional) -> Family:
    return Family(name=name, block=module.Block, model_config=module.model_config, validate=module.validate,
                  hf_model_types=module.HF_MODEL_TYPES, hf_architecture=module.HF_ARCHITECTURE,
                  from_hf_config=module.from_hf_config, to_hf_config=module.to_hf_config, hf_rules=module.hf_rules,
                  hf_ignored=module.hf_ignored, **optional)


FAMILIES: dict[str, Family] = {f.name: f for f in (
    _family(gemma4, "gemma4"),
    _family(laguna, "laguna"),
    _family(zaya1, "zaya1"),
    _family(deepseek_v4, "deepseek_v4", hf_update_config=deepseek_v4.hf_update_config,
            report_extras=deepseek_v4_costs.report_extras),
)}


def get(name: str) -> Family:
    try:
        return FAMILIES[name]
    except KeyError:
        raise ValueError(f"unknown model family {name!r}; known families: {sorted(FAMILIES)}") from None


def for_hf_model_type(model_type) -> Family:
    """The family that reads a Hugging Face `model_type`."""
    for family in FAMILIES.values():
        if model_type in family.hf_model_types:
            return family
    supported = sorted(t for f in FAMILIES.values() for t in f.hf_model_types)
    raise ValueError(f"unsupported model_type {model_type!r} in config.json; supported: {supported}")
