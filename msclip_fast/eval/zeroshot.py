"""Zero-shot classification: a text-built linear classifier over image features.

The classifier follows CLIP (Radford et al. 2021, §3.1.4) and open_clip's
``build_zero_shot_classifier``: for each class, every template is filled with the class name,
the prompts are encoded and L2-normalized, averaged over templates, and the mean is
re-normalized, giving a ``(C, E)`` weight matrix. ImageNet class names and the 80 OpenAI
templates come from ``open_clip.zero_shot_metadata`` (imported, not copied).
"""
from __future__ import annotations

import json
import logging
from collections import Counter
from pathlib import Path
from typing import Callable, Iterable, Mapping, Sequence, Union

import torch

from .common import encode_loader_images, encode_text_takes_lengths, encode_tokens, model_device, unwrap_model
from .metrics import classification_metrics, per_class_accuracy

logger = logging.getLogger(__name__)

Template = Union[str, Callable[[str], str]]

# Our own prompt sets for the built-in shard sources (DESIGN §6). Keep them short: every
# template costs one text-tower pass per class.
OPENCLIPART_TEMPLATES: tuple[str, ...] = (
    "a clip art of {}.",
    "a drawing of {}.",
    "an illustration of {}.",
    "a cartoon of {}.",
    "a picture of {}.",
)
_DIGIT_NUMERALS = {n: str(i) for i, n in enumerate(
    ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"))}


def digit_numeral(classname: str) -> str:
    """``"three"`` -> ``"3"`` (other names unchanged), for prompts that use the numeral."""
    return _DIGIT_NUMERALS.get(classname, classname)


def _handwritten_numeral(c: str) -> str:
    return f"handwritten {digit_numeral(c)}"


def _digit_numeral_photo(c: str) -> str:
    return f"a photo of the digit {digit_numeral(c)}."


# The digits source names its classes "zero".."nine"; some prompts use the word and some the
# numeral, since people (and the digits captions) write both.
DIGITS_TEMPLATES: tuple[Template, ...] = (
    "a photo of the digit {}.",
    "a handwritten digit {}.",
    "the number {}.",
    _handwritten_numeral,
    _digit_numeral_photo,
)
# For a class-names FILE of unknown domain.
GENERIC_TEMPLATES: tuple[str, ...] = ("a photo of {}.", "a picture of {}.", "an image of {}.", "{}")
BUILTIN_CLASS_SETS = ("openclipart", "digits", "imagenet")


def format_prompt(template: Template, classname: str) -> str:
    """Fill one template (a ``"{}"`` format string or a callable) with a class name."""
    if callable(template):
        return template(classname)
    if "{}" not in template and "{c}" not in template:
        raise ValueError(f"template must contain '{{}}', got {template!r}")
    return template.replace("{c}", "{}").format(classname)


def prompt_name(classname: str) -> str:
    """Folder-style class name -> words for a prompt (``"signs_and_symbols"`` -> spaces)."""
    return str(classname).replace("_", " ").strip()


@torch.no_grad()
def build_zero_shot_classifier(
    model,
    classnames: Sequence[str],
    templates: Sequence[Template],
    tokenizer: Callable | None = None,
    batch_size: int = 256,
) -> torch.Tensor:
    """Text-side classifier weights.

    Args:
        model: an MSCLIP (or anything with ``encode_text(tokens (B,77) int64, normalize=True)``
            and a ``context_length`` attribute); a DeepSpeed/DDP wrapper is unwrapped. When its
            encode_text takes ``lengths``, each prompt's ``(B,)`` int64 CPU length (``eot + 1``,
            from the CPU tokens) is passed too, so the text tower trims without a host sync.
        classnames: C class names (underscores become spaces in the prompts).
        templates: T templates, ``"...{}..."`` strings or callables name -> prompt.
        tokenizer: list[str] -> (B, 77) int64 (CPU); default ``msclip_fast.get_tokenizer``.
        batch_size: prompts per text-tower call.
    Returns:
        ``(C, E)`` float32 weights on the model's device, each row L2-normalized: the
        normalized mean over templates of the normalized prompt embeddings.
    Raises:
        ValueError: no class names or no templates.
    """
    if len(classnames) == 0:
        raise ValueError("classnames must not be empty")
    if len(templates) == 0:
        raise ValueError("templates must not be empty")
    prompts = [[format_prompt(t, prompt_name(c)) for t in templates] for c in classnames]
    return build_prompt_classifier(model, prompts, tokenizer=tokenizer, batch_size=batch_size)


@torch.no_grad()
def build_prompt_classifier(
    model,
    prompts: Sequence[Sequence[str]],
    tokenizer: Callable | None = None,
    batch_size: int = 256,
) -> torch.Tensor:
    """Classifier weights from explicit per-class prompt lists (any number per class).

    Args:
        model: as :func:`build_zero_shot_classifier`.
        prompts: ``prompts[c]`` = the prompts of class ``c`` (at least one each).
        tokenizer, batch_size: as :func:`build_zero_shot_classifier`.
    Returns:
        ``(C, E)`` float32 on the model's device: row c = the re-normalized mean of class c's
        L2-normalized prompt embeddings.
    Raises:
        ValueError: no classes, or a class without prompts.
    """
    if len(prompts) == 0:
        raise ValueError("prompts must not be empty")
    empty = [i for i, p in enumerate(prompts) if len(p) == 0]
    if empty:
        raise ValueError(f"classes {empty[:10]} have no prompts")
    model = unwrap_model(model)
    if tokenizer is None:
        from ..data.tokenizer import get_tokenizer

        tokenizer = get_tokenizer(getattr(model, "context_length", 77))
    device = model_device(model)
    flat = [p for ps in prompts for p in ps]
    with_lengths = encode_text_takes_lengths(model)
    feats = []
    for s in range(0, len(flat), batch_size):
        tokens = tokenizer(flat[s : s + batch_size])
        f = encode_tokens(model, tokens, device, with_lengths=with_lengths).float()
        feats.append(torch.nn.functional.normalize(f, dim=-1))
    feats = torch.cat(feats)
    rows, start = [], 0
    for ps in prompts:
        rows.append(feats[start : start + len(ps)].mean(0))
        start += len(ps)
    return torch.nn.functional.normalize(torch.stack(rows), dim=-1)


def class_label(meta: dict, index: dict[str, int], num_classes: int) -> int | None:
    """A sample's class index from its ``meta["class"]``: a class name, or an int (matched as
    a name first, e.g. digits "0".."9", else taken as the index); None if it has none or it is
    not one of the classes."""
    value = meta.get("class") if isinstance(meta, dict) else None
    if value is None:
        return None
    if isinstance(value, str):
        return index.get(value)
    # a name match first (digits are named "0".."9"), then an int as the class index
    if str(value) in index:
        return index[str(value)]
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < num_classes:
        return value
    return None


@torch.no_grad()
def zero_shot_eval(
    model,
    loader: Iterable[dict],
    classnames: Sequence[str] | None,
    templates: Sequence[Template],
    *,
    tokenizer: Callable | None = None,
    max_batches: int | None = None,
    per_class: bool = False,
    class_prompts: Mapping[str, Sequence[str]] | None = None,
) -> dict:
    """Zero-shot top-1/top-5/balanced accuracy of ``model`` on ``loader``.

    Args:
        model: MSCLIP (wrappers with ``.module`` are unwrapped); its train/eval mode is
            restored afterwards.
        loader: yields ``{"image": (B,3,H,W) float, "meta": list[dict]}`` (build_loader with
            ``train=False``); labels are each sample's ``meta["class"]``.
        classnames: the C class names (index order); None derives them from the data
            (sorted distinct ``meta["class"]`` values).
        templates: prompt templates (see :func:`build_zero_shot_classifier`).
        tokenizer: default ``msclip_fast.get_tokenizer``.
        max_batches: stop after this many batches (for quick evals during training).
        per_class: add ``"per_class_top1": {name: acc}``.
        class_prompts: ``{class name: [prompt, ...]}`` (e.g. :func:`train_caption_prompts`):
            when given, the main metrics use these prompts (a class missing from the mapping
            keeps its ``templates`` prompts) and ``"plain_prompts"`` holds the metrics of
            ``templates`` alone on the same image features, for comparison.
    Returns:
        :func:`~msclip_fast.eval.metrics.classification_metrics` keys (``top1``, ``top5``
        when C >= 5, ``balanced_top1``, ``chance_top1``, ``chance_top5``,
        ``chance_balanced``, ``majority_rate``, ``n``, ``num_classes``) plus ``"skipped"``:
        samples without a usable class, by reason (``no_class``, ``unknown_class``).
    Raises:
        ValueError: no sample has a usable class.
    """
    model = unwrap_model(model)
    was_training = model.training
    model.eval()
    try:
        feats, metas, _ = encode_loader_images(model, loader, max_batches=max_batches)
        if classnames is None:
            found = {str(m["class"]) for m in metas if isinstance(m, dict) and m.get("class") is not None}
            classnames = sorted(found, key=_natural_key)
            logger.info("zero-shot classes taken from the data: %s", classnames)
        classnames = [str(c) for c in classnames]
        index = {c: i for i, c in enumerate(classnames)}
        labels, keep = [], []
        skipped: Counter = Counter()
        for i, m in enumerate(metas):
            lab = class_label(m, index, len(classnames))
            if lab is None:
                has = isinstance(m, dict) and m.get("class") is not None
                skipped["unknown_class" if has else "no_class"] += 1
                continue
            labels.append(lab)
            keep.append(i)
        if skipped:
            logger.warning("zero-shot: samples without a usable class: %s", dict(skipped))
        if not labels:
            raise ValueError(
                f"no evaluated sample has a meta['class'] among the {len(classnames)} classes "
                f"(skipped: {dict(skipped)})"
            )
        weights = build_zero_shot_classifier(model, classnames, templates, tokenizer=tokenizer)
        x = feats[torch.tensor(keep)].to(weights.device)
        y = torch.tensor(labels, device=weights.device)

        def score(w: torch.Tensor) -> dict:
            logits = x @ w.t()
            m = classification_metrics(logits, y, len(classnames))
            if per_class:
                m["per_class_top1"] = per_class_accuracy(logits, y, classnames)
            return m

        if class_prompts is None:
            out = score(weights)
        else:
            missing = [c for c in classnames if not class_prompts.get(c)]
            if missing:
                logger.warning("zero-shot: no caption prompts for %d classes (%s); they keep the plain prompts",
                               len(missing), missing[:10])
            prompts = [list(class_prompts.get(c) or ()) or
                       [format_prompt(t, prompt_name(c)) for t in templates] for c in classnames]
            plain = score(weights)
            out = score(build_prompt_classifier(model, prompts, tokenizer=tokenizer))
            out["plain_prompts"] = plain
        out["skipped"] = dict(skipped)
        return out
    finally:
        model.train(was_training)


def _natural_key(s: str):
    return (0, int(s), "") if s.isdigit() else (1, 0, s)


def load_classnames_file(path: str | Path) -> list[str]:
    """Class names from a JSON list, a JSON object with a ``"classes"`` list (e.g. a shard
    manifest), or a text file with one name per line (blank lines and ``#`` comments skipped).

    Raises:
        ValueError: the file holds no class names or has an unknown JSON shape.
    """
    path = Path(path)
    text = path.read_text(encoding="utf-8")
    if path.suffix.lower() == ".json":
        data = json.loads(text)
        if isinstance(data, dict):
            data = data.get("classes")
        if not isinstance(data, list):
            raise ValueError(f"classes file {path}: expected a JSON list or {{'classes': [...]}}")
        names = [str(x) for x in data]
    else:
        names = [ln.strip() for ln in text.splitlines()]
        names = [n for n in names if n and not n.startswith("#")]
    if not names:
        raise ValueError(f"classes file {path} holds no class names")
    return names


def find_manifest(data: str | Path) -> Path | None:
    """The shard-set manifest for a ``--data`` spec: ``DIR/manifest.json`` or, for a split
    directory like ``DIR/val`` (or a pattern inside it), the parent's."""
    first = str(data).split("::")[0]
    p = Path(first)
    candidates = []
    # walk up from the spec until an existing directory (patterns have no directory of their own)
    while not p.is_dir() and p != p.parent:
        p = p.parent
    candidates += [p / "manifest.json", p.parent / "manifest.json"]
    for c in candidates:
        if c.is_file():
            return c
    return None


def resolve_classes(
    classes: str, data: str | Path | None = None
) -> tuple[list[str] | None, list[Template]]:
    """``--classes`` value -> (class names or None = derive from the data, templates).

    ``imagenet``: open_clip's IMAGENET_CLASSNAMES and OPENAI_IMAGENET_TEMPLATES.
    ``openclipart`` / ``digits``: our templates; class names from the shard manifest's
    ``"classes"`` when found next to ``data``, else from the samples' ``meta["class"]``.
    Anything else is a path to a class-names file (:func:`load_classnames_file`), used with
    the openclipart-style generic templates.

    Raises:
        ValueError: unknown value that is not an existing file.
    """
    if classes == "imagenet":
        from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES, OPENAI_IMAGENET_TEMPLATES

        return list(IMAGENET_CLASSNAMES), list(OPENAI_IMAGENET_TEMPLATES)
    if classes in ("openclipart", "digits"):
        templates = list(OPENCLIPART_TEMPLATES if classes == "openclipart" else DIGITS_TEMPLATES)
        names = None
        manifest = find_manifest(data) if data is not None else None
        if manifest is not None:
            try:
                names = json.loads(manifest.read_text(encoding="utf-8")).get("classes") or None
            except (OSError, ValueError) as e:
                logger.warning("could not read classes from %s: %s", manifest, e)
            if names is not None:
                names = [str(n) for n in names]
                logger.info("zero-shot classes from %s: %d", manifest, len(names))
        return names, templates
    if Path(classes).is_file():
        return load_classnames_file(classes), list(GENERIC_TEMPLATES)
    raise ValueError(
        f"classes must be one of {list(BUILTIN_CLASS_SETS)} or an existing file, got {classes!r}"
    )

