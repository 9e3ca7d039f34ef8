"""Learning-rate schedule: linear warmup then cosine decay to 0, stepped once per optimizer step."""
from __future__ import annotations

import math

import torch


class WarmupCosine:
    """Multiplier of the peak lr at optimizer step ``s`` (0-based; the lr used BY step s).

    ``s < warmup``: ``(s + 1) / warmup``; afterwards ``0.5 * (1 + cos(pi * (s - warmup) /
    (total - warmup)))``, clamped at 0 past ``total``. A callable object (not a lambda) so
    that ``LambdaLR.state_dict()`` can hold it.
    """

    def __init__(self, warmup: int, total: int):
        if total < 1:
            raise ValueError(f"total steps must be >= 1, got {total}")
        if warmup < 0:
            raise ValueError(f"warmup must be >= 0, got {warmup}")
        self.warmup = warmup
        self.total = total

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return (step + 1) / self.warmup
        decay = max(self.total - self.warmup, 1)
        progress = min((step - self.warmup) / decay, 1.0)
        return 0.5 * (1.0 + math.cos(math.pi * progress))


def create_scheduler(optimizer: torch.optim.Optimizer, warmup: int, total: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Per-step LambdaLR applying :class:`WarmupCosine` to every group's own peak lr
    (so shared-parameter groups keep their ``lr_share`` ratio)."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, WarmupCosine(warmup, total))
