"""Rotary position embeddings.

Kinds:
- `default`: theta^(-2i/r) on the first r = fraction * head_dim dims (partial rotary when fraction < 1).
- `proportional`: the frequencies of a full-width rope, theta^(-2i/head_dim), kept for i < fraction *
  head_dim / 2 and set to zero above (those dims pass through). The exponent's denominator is the whole
  head_dim, not the rotated width.
- `yarn`: YaRN (arXiv:2309.00071) on the first r = fraction * head_dim dims: frequencies that turn fewer
  than `beta_slow` times over `original_max_positions` are divided by `factor` (interpolated), those that
  turn more than `beta_fast` times are kept (extrapolated), with a linear ramp between (over frequency
  index i in [0, r/2), the ramp bounds found from r, theta and the two betas; `truncate` rounds them
  outwards to whole dims). `attention_factor` defaults to 0.1 ln(factor) + 1.
- `none`: no rotation.
Styles: `half` pairs dim j with j + r/2 (rotate-half); `interleaved` pairs 2j with 2j + 1.
`attention_factor` scales cos and sin (YaRN-style magnitude correction; 1.0 leaves them alone); left
unset it is 1.0, or YaRN's default for `yarn`.
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np

KINDS = ("default", "proportional", "yarn", "none")
STYLES = ("half", "interleaved")
YARN_SETTINGS = ("factor", "original_max_positions", "beta_fast", "beta_slow", "truncate")


@dataclasses.dataclass(frozen=True)
class RopeSpec:
    kind: str = "default"
    theta: float = 10_000.0
    fraction: float = 1.0
    style: str = "half"
    attention_factor: float | None = None
    # kind "yarn" only (YARN_SETTINGS)
    factor: float = 1.0
    original_max_positions: int = 0
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    truncate: bool = True

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"unknown rope kind {self.kind!r}; expected one of {KINDS}")
        if self.style not in STYLES:
            raise ValueError(f"unknown rope style {self.style!r}; expected one of {STYLES}")
        if not 0.0 < self.fraction <= 1.0:
            raise ValueError(f"rope fraction must be in (0, 1], got {self.fraction}")
        if self.kind == "yarn":
            if self.factor <= 0 or self.original_max_positions <= 0:
                raise ValueError(f"yarn rope needs factor > 0 and original_max_positions > 0, got "
                                 f"factor={self.factor}, original_max_positions={self.original_max_positions}")
        else:
            defaults = {f.name: f.default for f in dataclasses.fields(self)}
            yarn_only = [k for k in YARN_SETTINGS if getattr(self, k) != defaults[k]]
            if yarn_only:
                raise ValueError(f"rope settings {sorted(yarn_only)} apply to kind 'yarn' only, not {self.kind!r}")
        if self.attention_factor is None:
            default = yarn_mscale(self.factor) if self.kind == "yarn" else 1.0
            object.__setattr__(self, "attention_factor", default)

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
        theta_pow = (np.float32(self.theta) ** exponent).astype(np.float32)   # theta^(2i/r) = 1 / inv_freq
        if self.kind == "yarn":
            return self._yarn(theta_pow, dim)
        return (1.0 / theta_pow).astype(np.float32)

    def _yarn(self, theta_pow: np.ndarray, dim: int) -> np.ndarray:
        """1 / (factor * theta_pow) (interpolated) below the ramp, 1 / theta_pow (extrapolated) above it,
        linear in the frequency index between the dims that turn beta_fast and beta_slow times."""
        def dim_turning(rotations: float) -> float:  # the dim whose wavelength fits `rotations` times
            return (dim * math.log(self.original_max_positions / (rotations * 2 * math.pi))
                    / (2 * math.log(self.theta)))

        low, high = dim_turning(self.beta_fast), dim_turning(self.beta_slow)
        if self.truncate:
            low, high = math.floor(low), math.ceil(high)
        low, high = max(low, 0), min(high, dim - 1)
        if low == high:
            high += 0.001  # no zero-width ramp
        ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - np.float32(low)) / np.float32(high - low), 0, 1)
        extrapolated = (1 - ramp).astype(np.float32)
        inv_extrapolation = (1.0 / theta_pow).astype(np.float32)
        inv_interpolation = (1.0 / (np.float32(self.factor) * theta_pow)).astype(np.float32)
        return (inv_interpolation * (1 - extrapolated) + inv_extrapolation * extrapolated).astype(np.float32)


def yarn_mscale(factor: float) -> float:
    """YaRN's magnitude correction of cos and sin: 0.1 ln(factor) + 1 (1 for factor <= 1)."""
    return 1.0 if factor <= 1 else 0.1 * math.log(factor) + 1.0


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


def apply_rope_tail(x_BTNH: jax.Array, positions_BT: jax.Array, spec: RopeSpec, rope_dim: int, *,
                    inverse: bool = False) -> jax.Array:
    """`spec` on the LAST `rope_dim` dims of every head (layout [no rotation | rotation]); `spec`'s
    fraction then applies within those dims."""
    keep, rot = x_BTNH[..., :-rope_dim], x_BTNH[..., -rope_dim:]
    return jnp.concatenate([keep, apply_rope(rot, positions_BT, spec, inverse=inverse)], axis=-1)
