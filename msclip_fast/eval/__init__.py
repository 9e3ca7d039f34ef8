"""Evaluation: zero-shot classification and image<->text retrieval (DESIGN §5).

Python API (training calls these on rank 0)::

    from msclip_fast.eval import zero_shot_eval, retrieval_eval, resolve_classes
    names, templates = resolve_classes("digits", data="data/digits")
    zero_shot_eval(model, loader, names, templates)   # {"top1", "top5", "balanced_top1", chance...}
    retrieval_eval(model, loader)                     # {"i2t_r1", ..., "t2i_r10", "chance_r1", ...}

Command line: ``python -m msclip_fast.eval zeroshot|retrieval --help``.
"""
from .metrics import classification_metrics, recall_chance, retrieval_metrics
from .retrieval import retrieval_eval
from .zeroshot import (
    DIGITS_TEMPLATES,
    GENERIC_TEMPLATES,
    OPENCLIPART_TEMPLATES,
    build_zero_shot_classifier,
    format_prompt,
    load_classnames_file,
    resolve_classes,
    zero_shot_eval,
)

__all__ = [
    "DIGITS_TEMPLATES",
    "GENERIC_TEMPLATES",
    "OPENCLIPART_TEMPLATES",
    "build_zero_shot_classifier",
    "classification_metrics",
    "format_prompt",
    "load_classnames_file",
    "recall_chance",
    "resolve_classes",
    "retrieval_eval",
    "retrieval_metrics",
    "zero_shot_eval",
]
