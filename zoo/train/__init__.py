"""Training: AdamW with warmup and cosine decay, a resumable jitted loop, metrics and checkpoints."""
from zoo.train.optimizer import decay_mask, learning_rate_schedule, make_optimizer
from zoo.train.trainer import NonFiniteLoss, Result, TrainState, enable_compilation_cache, train

__all__ = ["train", "Result", "NonFiniteLoss", "make_optimizer", "learning_rate_schedule", "decay_mask",
           "enable_compilation_cache", "TrainState"]
