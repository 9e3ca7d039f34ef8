"""Helpers shared by the evaluations: model unwrapping and one encoding pass over a loader."""
from __future__ import annotations

import inspect
import logging
from typing import Iterable

import torch

from ..modules.packing import text_lengths

logger = logging.getLogger(__name__)


def unwrap_model(model):
    """The MSCLIP inside DeepSpeed / DDP wrappers (follows ``.module`` until ``encode_image``)."""
    seen = 0
    while not hasattr(model, "encode_image") and hasattr(model, "module") and seen < 8:
        model = model.module
        seen += 1
    if not hasattr(model, "encode_image") or not hasattr(model, "encode_text"):
        raise ValueError(
            f"model must provide encode_image and encode_text, got {type(model).__name__}"
        )
    return model


def encode_text_takes_lengths(model) -> bool:
    """True when ``model.encode_text`` has a ``lengths`` parameter (MSCLIP's does).

    The evaluations accept anything with ``encode_text(tokens, normalize=True)``; models
    without ``lengths`` (open_clip's, toy models) are called without it. Call once per eval,
    not per batch. A ``**kwargs``-only signature does not count: nothing says it means
    caption lengths.
    """
    try:
        params = inspect.signature(model.encode_text).parameters
    except (TypeError, ValueError):  # no introspectable signature (a builtin or C extension)
        return False
    p = params.get("lengths")
    return p is not None and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)


def encode_tokens(model, tokens: torch.Tensor, device, *, with_lengths: bool,
                  lengths: torch.Tensor | None = None) -> torch.Tensor:
    """``model.encode_text(tokens, normalize=True)`` of one token batch, on ``device``.

    Args:
        model: unwrapped model in eval mode.
        tokens: ``(B, L)`` int64 token ids, normally on the CPU (tokenizer or loader output).
        device: where the model runs; the tokens are copied there.
        with_lengths: pass ``lengths=`` to encode_text (:func:`encode_text_takes_lengths`).
        lengths: ``(B,)`` int64 CPU caption lengths when known (a loader batch's
            ``"text_lengths"``); otherwise taken from ``tokens`` here, before the device copy,
            so that finding them costs no device-to-host sync.
    Returns:
        ``(B, E)`` features as encode_text returns them (its dtype, on ``device``).
    """
    if with_lengths and lengths is None:
        lengths = text_lengths(tokens)  # free on CPU tokens
    tokens = tokens.to(device, non_blocking=True)
    if with_lengths:
        return model.encode_text(tokens, normalize=True, lengths=lengths)
    return model.encode_text(tokens, normalize=True)


def model_device(model) -> torch.device:
    """Device of the model's first parameter (CPU for a parameter-less model)."""
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def model_dtype(model) -> torch.dtype:
    """Floating dtype of the model's first floating parameter (float32 if none)."""
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.float32


@torch.no_grad()
def encode_loader(
    model, loader: Iterable[dict], *, text: bool = False, max_batches: int | None = None
) -> dict:
    """Encode every batch of ``loader`` once.

    Args:
        model: unwrapped MSCLIP in eval mode (or anything with ``encode_image`` and
            ``encode_text(tokens, normalize=True)``; ``lengths=`` is passed only when its
            encode_text takes it).
        loader: yields ``{"image": (B,3,H,W) float, "text": (B,77) int64 CPU,
            "text_lengths": (B,) int64 CPU, "meta": list[dict], "key": list[str]}``;
            ``text``/``text_lengths``/``meta``/``key`` may be absent (missing lengths are
            computed from the tokens before they move to the device).
        text: also encode ``batch["text"]`` and keep the token rows as caption identities.
        max_batches: stop after this many batches.
    Returns:
        ``{"image": (N,E) float32 CPU, normalized; "meta": list of N dicts; "key": list of N
        str; and with text=True "text": (N,E) float32, "captions": list of N token tuples}``.
    Raises:
        ValueError: the loader yields no samples, or a batch lacks "text" when text=True.
    """
    device = model_device(model)
    dtype = model_dtype(model)
    with_lengths = text and encode_text_takes_lengths(model)
    img_feats, txt_feats, metas, keys, captions = [], [], [], [], []
    for i, batch in enumerate(loader):
        if max_batches is not None and i >= max_batches:
            break
        images = batch["image"].to(device=device, dtype=dtype, non_blocking=True)
        b = images.shape[0]
        f = model.encode_image(images, normalize=True).float()
        img_feats.append(torch.nn.functional.normalize(f, dim=-1).cpu())
        metas.extend(batch.get("meta") or [{}] * b)
        keys.extend(batch.get("key") or [""] * b)
        if text:
            if "text" not in batch:
                raise ValueError("loader batches must contain 'text' tokens for retrieval")
            t = encode_tokens(model, batch["text"], device, with_lengths=with_lengths,
                              lengths=batch.get("text_lengths")).float()
            txt_feats.append(torch.nn.functional.normalize(t, dim=-1).cpu())
            # identical token rows = identical captions as the model sees them
            captions.extend(tuple(r) for r in batch["text"].tolist())
    if not img_feats:
        raise ValueError("the loader yielded no samples")
    out = {"image": torch.cat(img_feats), "meta": metas, "key": keys}
    if text:
        out["text"] = torch.cat(txt_feats)
        out["captions"] = captions
    return out


def encode_loader_images(model, loader, max_batches: int | None = None):
    """``(features (N,E), metas, keys)`` of the loader's images (see :func:`encode_loader`)."""
    enc = encode_loader(model, loader, text=False, max_batches=max_batches)
    return enc["image"], enc["meta"], enc["key"]


def encode_eval(model, loader: Iterable[dict], *, text: bool = False, max_batches: int | None = None) -> dict:
    """:func:`encode_loader` of the unwrapped model in eval mode; the model's train/eval mode
    is restored afterwards, whatever happens. Returns and raises as :func:`encode_loader`."""
    model = unwrap_model(model)
    was_training = model.training
    model.eval()
    try:
        return encode_loader(model, loader, text=text, max_batches=max_batches)
    finally:
        model.train(was_training)
