"""AdamW parameter groups: weight decay only where it belongs, separate lr/wd for shared weights."""
from __future__ import annotations

import logging

import torch
import torch.nn as nn

logger = logging.getLogger(__name__)

# group name -> (is shared, gets weight decay)
GROUPS = {
    "decay": (False, True),
    "no_decay": (False, False),
    "shared_decay": (True, True),
    "shared_no_decay": (True, False),
}


def param_groups(model: nn.Module, lr: float, wd: float, lr_share: float, wd_share: float) -> list[dict]:
    """Split trainable parameters of ``model`` into up to four named AdamW groups.

    No weight decay on ``model.no_weight_decay_names()`` (gains, biases, norms, embeddings,
    logit_scale, logit_bias; MS-CLIP / CLIP practice); ``model.shared_parameter_names()`` (weights used by
    both towers) get ``lr_share`` / ``wd_share`` (the official MS-CLIP configs set them apart).
    Frozen parameters (``requires_grad=False``, e.g. a locked tower) are left out. Empty groups
    are dropped. Each group dict has ``name``, ``params``, ``lr``, ``weight_decay`` and
    ``param_names`` (list[str], same order as ``params``).

    Falls back to "1-d tensors and names ending in 'bias' get no decay" when the model lacks
    ``no_weight_decay_names`` (and to "nothing shared" without ``shared_parameter_names``).
    """
    if hasattr(model, "no_weight_decay_names"):
        no_wd = set(model.no_weight_decay_names())
    else:
        no_wd = {n for n, p in model.named_parameters() if p.ndim < 2 or n.endswith("bias")}
    shared = set(model.shared_parameter_names()) if hasattr(model, "shared_parameter_names") else set()
    names = {n for n, _ in model.named_parameters()}
    for what, s in (("no_weight_decay_names", no_wd), ("shared_parameter_names", shared)):
        unknown = s - names
        if unknown:
            raise ValueError(f"model.{what}() names unknown parameters: {sorted(unknown)[:5]}")
    buckets: dict[str, list[tuple[str, torch.nn.Parameter]]] = {g: [] for g in GROUPS}
    for n, p in model.named_parameters():  # named_parameters() yields each shared tensor once
        if not p.requires_grad:
            continue
        is_shared, decays = n in shared, n not in no_wd
        key = ("shared_" if is_shared else "") + ("decay" if decays else "no_decay")
        buckets[key].append((n, p))
    groups = []
    for key, items in buckets.items():
        if not items:
            continue
        is_shared, decays = GROUPS[key]
        groups.append(
            {
                "name": key,
                "params": [p for _, p in items],
                "param_names": [n for n, _ in items],
                "lr": lr_share if is_shared else lr,
                "weight_decay": (wd_share if is_shared else wd) if decays else 0.0,
            }
        )
    if not groups:
        raise ValueError("the model has no trainable parameters (both towers locked?)")
    for g in groups:
        logger.info("param group %s: %d tensors, %d params, lr %g, wd %g", g["name"], len(g["params"]),
                    sum(p.numel() for p in g["params"]), g["lr"], g["weight_decay"])
    return groups


def create_optimizer(model: nn.Module, args) -> torch.optim.AdamW:
    """torch AdamW over :func:`param_groups` with ``args.lr/wd/lr_share/wd_share/beta1/beta2/eps``."""
    groups = param_groups(model, args.lr, args.wd, args.lr_share, args.wd_share)
    # drop param_names: torch >= 2.6 gives that key a meaning, and ZeRO 1/2 replace a group's
    # params by one flat tensor, which would contradict the name list on load_state_dict
    groups = [{k: v for k, v in g.items() if k != "param_names"} for g in groups]
    return torch.optim.AdamW(groups, lr=args.lr, betas=(args.beta1, args.beta2), eps=args.eps)
