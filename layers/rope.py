"""Rotary position embeddings.

Kinds:
- `default`: theta^(-2i/r) on the first r = fraction * head_dim dims (partial rotary when fraction < 1).
- `proportional`: the frequencies of a full-width rope, theta^(-2i/head_dim), kept for i < fraction *
  head_dim / 2 and set to zero above (those dims pass through). The exponent's denominator is the whole
  head_dim, not the rotated width.
- `none`: no rotation.
Styles: `half` pairs dim j with j + r/2 (rotate-half); `interleaved` pairs 2j with 2j + 1.
`attention_factor` scales cos and sin (YaRN-style magnitude correction; 1.0 leaves them alone).
"""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np

KINDS = ("default", "proportional", "none")
STYLES = ("half", "interleaved")


@dataclasses.dataclass(frozen=True)
class RopeSpec:
    kind: str = "default"
    theta: float = 10_000.0
    fraction: float = 1.0
    style: str = "half"
    attention_factor: float = 1.0

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"unknown rope kind {self.kind!r}; expected one of {KINDS}")
        if self.style not in STYLES:
            raise ValueError(f"unknown rope style {self.style!r}; expected one of {STYLES}")
        if not 0.0 < self.fraction <= 1.0:
            raise ValueError(f"rope fraction must be in (0, 1], got {self.fraction}")

    @classmethod
    def from_config(cls, cfg: Mapping | None) -> "RopeSpec":
        if cfg is None:
            return cls(kind="none")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(cfg) - known
        if unknown:
            raise ValueError(f"unknown rope settings {sorted(unknown)}; expected some of {sorted(known)}")
        return cls(**dict(cfg))

    def rotary_dim(self, head_dim: int) -> int:
        """Number of leading dims that take part in the rotation."""
        if self.kind == "proportional":
            return head_dim
        return 2 * int(self.fraction * head_dim // 2)

    def inv_frequencies(self, head_dim: int) -> np.ndarray:
        """Inverse frequencies [rotary_dim / 2], float32."""
        if self.kind == "none":
            return np.zeros((0,), np.float32)
        if self.kind == "proportional":
            n_rotated = int(self.fraction * head_dim // 2)
            exponent = np.arange(0, 2 * n_rotated, 2, dtype=np.float32) / np.float32(head_dim)
            rotated = (1.0 / (np.float32(self.theta) ** exponent)).astype(np.float32)
            return np.concatenate([rotated, np.zeros(head_dim // 2 - n_rotated, np.float32)])
        dim = self.rotary_dim(head_dim)
        exponent = np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim)
        return (1.0 / (np.float32(self.theta) ** exponent)).astype(np.float32)


def apply_rope(x_BTNH: jax.Array, positions_BT: jax.Array, spec: RopeSpec, *, inverse: bool = False
               ) -> jax.Array:
    """Rotates x [B, T, N, H] by the angles of `positions` [B, T]; `inverse` rotates back."""
    if spec.kind == "none":
        return x_BTNH
    head_dim = x_BTNH.shape[-1]
    inv_freq_R = jnp.asarray(spec.inv_frequencies(head_dim))
    rot = 2 * inv_freq_R.shape[0]
    angles_BTR = positions_BT.astype(jnp.float32)[..., None] * inv_freq_R
    cos_BT1R = (jnp.cos(angles_BTR) * spec.attention_factor)[:, :, None, :].astype(x_BTNH.dtype)
    sin_BT1R = (jnp.sin(angles_BTR) * spec.attention_factor)[:, :, None, :].astype(x_BTNH.dtype)
    if inverse:
        sin_BT1R = -sin_BT1R
    x_rot, x_pass = x_BTNH[..., :rot], x_BTNH[..., rot:]
    if spec.style == "half":
        x1, x2 = x_rot[..., : rot // 2], x_rot[..., rot // 2:]
        out = jnp.concatenate([x1 * cos_BT1R - x2 * sin_BT1R, x2 * cos_BT1R + x1 * sin_BT1R], axis=-1)
    else:
        x1, x2 = x_rot[..., 0::2], x_rot[..., 1::2]
        out = jnp.stack([x1 * cos_BT1R - x2 * sin_BT1R, x2 * cos_BT1R + x1 * sin_BT1R], axis=-1)
        out = out.reshape(x_rot.shape)
    return jnp.concatenate([out, x_pass], axis=-1) if x_pass.shape[-1] else out
