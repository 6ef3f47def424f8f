"""The registry of model families: config `model.family` -> the module that holds its block."""
from __future__ import annotations

import importlib
from types import ModuleType

FAMILIES = {"gemma4": "zoo.gemma4", "zaya1": "zoo.zaya1", "laguna": "zoo.laguna", "deepseek_v4": "zoo.deepseek_v4"}


def get(name: str) -> ModuleType:
    try:
        return importlib.import_module(FAMILIES[name])
    except KeyError:
        raise ValueError(f"unknown model family {name!r}; known families: {sorted(FAMILIES)}") from None
