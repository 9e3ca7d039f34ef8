"""Training: CLI params, AdamW groups, warmup+cosine schedule, checkpoints, engines, the loop.

``main(argv=None)`` is what ``train.py`` runs (see :mod:`msclip_fast.training.main`).
"""
from .checkpoint import load_checkpoint, resolve_checkpoint, save_checkpoint
from .main import NonFiniteLossError, main
from .optim import create_optimizer, param_groups
from .schedule import WarmupCosine, create_scheduler

__all__ = [
    "NonFiniteLossError",
    "WarmupCosine",
    "create_optimizer",
    "create_scheduler",
    "load_checkpoint",
    "main",
    "param_groups",
    "resolve_checkpoint",
    "save_checkpoint",
]
