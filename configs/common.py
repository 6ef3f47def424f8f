"""Training, data and optimizer defaults shared by every family's config file (the values themselves
live in `zoo.defaults`, which the library uses too)."""
from __future__ import annotations

import ml_collections

from zoo.defaults import default_config


def base_config(model: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The full config around a family's model config, with the shared defaults."""
    return default_config(model)


def small_replica_training(config: ml_collections.ConfigDict, *, batch_size: int = 32) -> ml_collections.ConfigDict:
    """The training settings every family's `small` replica uses: batch_size windows of 1024 tokens at a
    peak learning rate of 1e-3."""
    config.train.batch_size, config.train.seq_len = batch_size, 1024
    config.optimizer.learning_rate = 1e-3
    return config
