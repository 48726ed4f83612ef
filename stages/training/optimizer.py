"""The optimizer every training stage uses: AdamW, fused where the device has the kernel."""
from __future__ import annotations

import torch


def adamw(params, lr: float, weight_decay: float = 0.0) -> torch.optim.AdamW:
    """AdamW over `params` (tensors or param groups). The fused kernel is several times faster than
    the default foreach one, on CPU too (about 3.5x a PPO step); a device without it gets the default."""
    params = list(params)  # a generator would be spent by the first attempt
    try:
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=True)
    except (RuntimeError, ValueError):
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)


def decay_groups(model, weight_decay: float) -> list[dict]:
    """Param groups with weight decay on the trainable matrices only (not on biases and norms)."""
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
