"""The training, mesh, optimizer and data defaults around a model config: what every family's preset
starts from (`configs/common.py` calls `default_config`) and what a converted checkpoint records beside
its model (`zoo.checkpoints.save_model`). It lives in `zoo/` (not `configs/`) so the library never
imports the presets, and outside `zoo/train/` because `zoo.checkpoints` needs it while the training
loop needs `zoo.checkpoints`."""
from __future__ import annotations

import ml_collections

from zoo.sharding import DEFAULT_RULES


def default_config(model: ml_collections.ConfigDict | None = None) -> ml_collections.ConfigDict:
    """The full config (`model`, `train`, `mesh`, `sharding_rules`, `optimizer`, `data`) with `model`
    (default: an empty section) and the shared defaults for the rest."""
    if model is not None and not isinstance(model, ml_collections.ConfigDict):
        raise TypeError(f"default_config takes a model ConfigDict, got {type(model).__name__}")
    c = ml_collections.ConfigDict()
    c.model = model if model is not None else ml_collections.ConfigDict()

    c.train = ml_collections.ConfigDict()
    c.train.steps = 1000
    c.train.batch_size = 16
    c.train.seq_len = 256
    c.train.log_every = 10
    c.train.eval_every = 250
    c.train.eval_batches = 8
    c.train.checkpoint_every = 250
    c.train.keep_checkpoints = 3
    c.train.seed = 0
    c.train.compute_dtype = "float32"   # "bfloat16": bf16 compute on float32 master weights

    # Device mesh (see README "Sharding"): axis sizes, one of them may be -1 (the remaining devices).
    c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1, expert=1))
    # Logical axis -> mesh axes: a preset of zoo.sharding.RULES or the table itself. The default names
    # every mesh axis, so the mesh sizes alone decide the layout (all-data by default: replicated).
    c.sharding_rules = DEFAULT_RULES

    c.optimizer = ml_collections.ConfigDict()
    c.optimizer.learning_rate = 3e-3
    c.optimizer.warmup_steps = 50
    c.optimizer.final_lr_fraction = 0.1  # cosine decay from learning_rate to this fraction of it
    c.optimizer.b1 = 0.9
    c.optimizer.b2 = 0.95
    c.optimizer.eps = 1e-8
    c.optimizer.weight_decay = 0.1      # not applied to norms, scalars and embedding tables
    c.optimizer.grad_clip = 1.0

    c.data = ml_collections.ConfigDict()
    c.data.source = "stdlib"            # "stdlib" | "text" | "tokens"
    c.data.paths = ""                   # glob(s), comma separated, for "text" and "tokens"
    c.data.tokenizer = "bytes"          # "bytes" or a Hugging Face tokenizer.json path
    c.data.token_dtype = "uint16"       # "tokens" files: raw little-endian "uint16" or "uint32" ids
    c.data.val_fraction = 0.05
    # Training mix of long-context tasks (zoo/data.py "Task mix", README "Long-context evaluation"):
    c.data.task_mix_rate = 0.0          # fraction of training windows that hold a zoo.tasks example (0: off)
    c.data.task_names = "passkey,niah_single,niah_multikey,niah_multivalue,niah_multiquery,variable_tracking,mqar"
    c.data.task_lengths = ""            # example lengths (prompt + answer), comma separated; "": whole window
    c.data.task_curriculum_steps = 0    # > 0: the lengths unlock shortest first over this many steps
    return c
