"""State-dict mapping rules between Hugging Face tensors and our parameter paths (used by each family's
`hf_rules` and by zoo.convert).

A rule maps a few HF tensors (usually one) to a few of our parameters (usually one) with a conversion
in each direction. The conversions use only array methods and `jnp` so `jax.eval_shape` can derive the
HF shapes a config expects (to name a wrongly-shaped tensor before converting it). An HF name "a|b"
accepts either spelling when loading and writes the first.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax.numpy as jnp

Path = tuple


@dataclasses.dataclass(frozen=True)
class Rule:
    hf: tuple[str, ...]
    ours: tuple[Path, ...]
    to_ours: Callable
    to_hf: Callable
    hf_prefix: str | None = None   # None: the checkpoint's model prefix ("model."); "": top level

    @classmethod
    def one(cls, hf: str, ours: Path, to_ours, to_hf, hf_prefix: str | None = None) -> "Rule":
        return cls((hf,), (tuple(ours),), lambda a: (to_ours(a),), lambda x: (to_hf(x),), hf_prefix)

    @classmethod
    def gate_up(cls, hf: str, gate: Path, up: Path) -> "Rule":
        """HF `gate_up_proj` [E, 2F, D] (gate rows first) <-> our gate and up [E, D, F]."""
        def to_ours(a):
            F = a.shape[1] // 2
            return a[:, :F, :].transpose(0, 2, 1), a[:, F:, :].transpose(0, 2, 1)

        def to_hf(gate_EDF, up_EDF):
            return (jnp.concatenate([gate_EDF.transpose(0, 2, 1), up_EDF.transpose(0, 2, 1)], axis=1),)
        return cls((hf,), (tuple(gate), tuple(up)), to_ours, to_hf)


def same():
    return (lambda a: a), (lambda x: x)


def transpose(axes=None):
    if axes is None:
        return (lambda a: a.T), (lambda x: x.T)
    return (lambda a: a.transpose(axes)), (lambda x: x.transpose(axes))


def linear_in(D: int, N: int, H: int):
    """HF projection into heads [N*H, D] <-> ours [D, N, H]."""
    return (lambda a: a.T.reshape(D, N, H)), (lambda x: x.reshape(D, N * H).T)


def linear_out(N: int, H: int, D: int):
    """HF projection out of heads [D, N*H] <-> ours [N, H, D]."""
    return (lambda a: a.T.reshape(N, H, D)), (lambda x: x.reshape(N * H, D).T)


def uniform(values, what: str, family: str):
    """The one value that `values` holds (None if there are none): a Hugging Face config keeps one value
    where ours may keep one per layer. Fails naming `what` when the layers differ."""
    values = set(values)
    if len(values) > 1:
        raise ValueError(f"Hugging Face {family} needs one {what} for these layers, the config has {sorted(values)}")
    return values.pop() if values else None


HF_TOKEN_IDS = (("pad_id", "pad_token_id"), ("eos_id", "eos_token_id"), ("bos_id", "bos_token_id"))


def token_ids_from_hf(hf: dict, ours=("pad_id", "eos_id", "bos_id")) -> dict:
    """Our special token ids (`ours` of pad_id, eos_id, bos_id) that a Hugging Face config gives as integers."""
    return {o: hf[t] for o, t in HF_TOKEN_IDS if o in ours and isinstance(hf.get(t), int)}
