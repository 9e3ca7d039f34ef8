"""Losses: the open_clip-compatible :class:`ClipLoss` and distributed feature gathering."""
from .clip_loss import ClipLoss
from .distributed import all_gather_with_grad, gather_features

__all__ = ["ClipLoss", "all_gather_with_grad", "gather_features"]
