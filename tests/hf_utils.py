"""Helpers for parity tests against transformers: perturbed random models and logits."""
from __future__ import annotations

import numpy as np
import torch


def perturb_(model: torch.nn.Module, seed: int = 0) -> None:
    """Gives every persistent parameter and buffer a random value: HF init leaves norms at 1 and some
    tensors at 0, which would hide mistakes. Matrices get N(0, 1/fan_in), vectors 1 + N(0, 0.3^2)."""
    gen = torch.Generator().manual_seed(seed)
    seen = set()
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if t.data_ptr() in seen or not t.is_floating_point():
                continue
            seen.add(t.data_ptr())
            noise = torch.randn(t.shape, generator=gen, dtype=torch.float32)
            if t.ndim >= 2:
                t.copy_(noise * t.shape[-1] ** -0.5)
            else:
                t.copy_(1.0 + 0.3 * noise)


def hf_logits(model: torch.nn.Module, ids: np.ndarray, **kwargs) -> np.ndarray:
    with torch.no_grad():
        out = model(input_ids=torch.from_numpy(ids).long(), **kwargs)
    return out.logits.float().numpy()
