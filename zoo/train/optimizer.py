"""AdamW with linear warmup, cosine decay and global-norm clipping; weight decay only on matrices."""
from __future__ import annotations

import jax.numpy as jnp
import optax
from flax import nnx
from flax import traverse_util


def learning_rate_schedule(opt_cfg, total_steps: int) -> optax.Schedule:
    """The learning rate of update `count + 1` (optax passes the number of updates done so far):
    linear from peak/warmup up to the peak at `warmup_steps`, then cosine down to
    `final_lr_fraction * peak` at `total_steps`."""
    peak, final = opt_cfg.learning_rate, opt_cfg.final_lr_fraction
    warmup = max(int(opt_cfg.warmup_steps), 0)
    decay_steps = max(total_steps - warmup, 1)

    def schedule(count):
        step = jnp.asarray(count, jnp.float32) + 1.0
        progress = jnp.clip((step - warmup) / decay_steps, 0.0, 1.0)
        cosine = final + (1.0 - final) * 0.5 * (1.0 + jnp.cos(jnp.pi * progress))
        return peak * jnp.where(step <= warmup, step / max(warmup, 1), cosine)

    return schedule


def decays(param: nnx.Param) -> bool:
    """Weight decay applies to matrices and tensors, not to norms, scalars, biases (ndim < 2) or to
    tables looked up by token id (first logical axis "vocab")."""
    axes = param.get_metadata().get("axes") or ()
    return param.ndim >= 2 and (not axes or axes[0] != "vocab")


def decay_mask(model) -> dict:
    """A pure dict shaped like the model's parameters: True where weight decay applies."""
    flat = nnx.to_flat_state(nnx.state(model, nnx.Param))
    return traverse_util.unflatten_dict({tuple(path): decays(param) for path, param in flat})


def make_optimizer(config, model) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """The optimizer for `model`'s parameters (as a pure dict) and its learning-rate schedule."""
    opt = config.optimizer
    schedule = learning_rate_schedule(opt, config.train.steps)
    adamw = optax.adamw(schedule, b1=opt.b1, b2=opt.b2, eps=opt.eps, weight_decay=opt.weight_decay,
                        mask=decay_mask(model))
    if opt.grad_clip > 0:
        return optax.chain(optax.clip_by_global_norm(opt.grad_clip), adamw), schedule
    return adamw, schedule
