"""Per-iteration learning rate: linear warmup then cosine decay (as microsoft/SimMIM)."""

from __future__ import annotations

import math


def get_lr(step: int, *, total: int, warmup: int, base_lr: float, warmup_lr: float, min_lr: float) -> float:
    """Learning rate for optimiser step ``step`` (0-based) of ``total``."""
    if step < warmup:
        return warmup_lr + (base_lr - warmup_lr) * step / warmup
    decay_steps = max(1, total - warmup)
    progress = min(1.0, (step - warmup) / decay_steps)
    return min_lr + (base_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))
