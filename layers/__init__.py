"""Shared Flax NNX layers. Nothing in this package knows a model family's name."""
