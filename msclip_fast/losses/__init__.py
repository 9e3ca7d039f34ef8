"""Losses: the open_clip-compatible :class:`ClipLoss` and :class:`SigLipLoss`, distributed
feature gathering and neighbour exchange."""
from .clip_loss import ClipLoss
from .distributed import all_gather_with_grad, gather_features
from .siglip_loss import SigLipLoss

__all__ = ["ClipLoss", "SigLipLoss", "all_gather_with_grad", "gather_features"]
