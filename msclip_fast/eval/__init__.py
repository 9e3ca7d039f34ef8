"""Evaluation: zero-shot classification, image<->text retrieval and a retrieval gallery (DESIGN §5).

Python API (training calls these on rank 0)::

    from msclip_fast.eval import zero_shot_eval, retrieval_eval, resolve_classes
    names, templates = resolve_classes("digits", data="data/digits")
    zero_shot_eval(model, loader, names, templates)   # {"top1", "top5", "balanced_top1", chance...}
    retrieval_eval(model, loader)                     # {"i2t_r1", ..., "t2i_r10", "chance_r1", ...}
    prompts, words = train_caption_prompts("data/openclipart/train", names, templates)
    zero_shot_eval(model, loader, names, templates, class_prompts=prompts)  # + "plain_prompts"
    make_gallery(model, loader, resolve_urls("data/digits/val"), "gallery/")  # PNGs + gallery.json

Command line: ``python -m msclip_fast.eval zeroshot|retrieval|gallery --help``.
"""
from .gallery import make_gallery, retrieve
from .metrics import classification_metrics, recall_chance, retrieval_metrics
from .prompts import distinctive_words, train_caption_prompts
from .retrieval import retrieval_eval
from .zeroshot import (
    DIGITS_TEMPLATES,
    GENERIC_TEMPLATES,
    OPENCLIPART_TEMPLATES,
    build_prompt_classifier,
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
    "build_prompt_classifier",
    "build_zero_shot_classifier",
    "classification_metrics",
    "distinctive_words",
    "format_prompt",
    "load_classnames_file",
    "make_gallery",
    "recall_chance",
    "resolve_classes",
    "retrieval_eval",
    "retrieval_metrics",
    "retrieve",
    "train_caption_prompts",
    "zero_shot_eval",
]
