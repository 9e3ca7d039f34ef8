"""Training: CLI params -> a frozen TrainConfig, AdamW groups, warmup+cosine schedule, engines,
one step function (exact or independent accumulation), the loop, checkpoints.

``main(argv=None)`` is what ``train.py`` runs (see :mod:`msclip_fast.training.main`).
"""
from .checkpoint import load_checkpoint, resolve_checkpoint, save_checkpoint
from .config import TrainConfig
from .loop import TrainLoop, TrainState
from .main import main
from .step import NonFiniteLossError, StepResult, exact_step, independent_step, train_step
from .optim import create_optimizer, param_groups
from .schedule import WarmupCosine, create_scheduler

__all__ = [
    "NonFiniteLossError",
    "StepResult",
    "TrainConfig",
    "TrainLoop",
    "TrainState",
    "exact_step",
    "independent_step",
    "train_step",
    "WarmupCosine",
    "create_optimizer",
    "create_scheduler",
    "load_checkpoint",
    "main",
    "param_groups",
    "resolve_checkpoint",
    "save_checkpoint",
]
