"""One resolver for every dtype the zoo takes (`from_hf`, `load`, `cast`, model configs, command-line
flags): a name (`"bfloat16"`) or a JAX/numpy dtype (`jnp.bfloat16`, `np.float32`, `np.dtype("float16")`)
all mean the same, and anything else fails with a message naming what was given and what is accepted."""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np

# The parameter / compute dtypes the models support, canonical name -> JAX dtype.
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
NAMES = tuple(DTYPES)


def resolve(dtype, what: str = "dtype") -> str:
    """The canonical name of `dtype` (a name or a JAX/numpy dtype); `what` names the argument or flag in
    the error, e.g. "--dtype" or "model.dtype"."""
    if isinstance(dtype, str):
        name = dtype.strip().lower()
    else:
        try:
            name = np.dtype(dtype).name
        except TypeError:
            name = None
    if name not in DTYPES:
        raise ValueError(f"unknown {what} {dtype!r}; expected one of {list(NAMES)} or the matching "
                         "JAX/numpy dtype")
    return name


def to_jnp(dtype, what: str = "dtype"):
    """The JAX dtype of `dtype` (a name or a JAX/numpy dtype)."""
    return DTYPES[resolve(dtype, what)]
