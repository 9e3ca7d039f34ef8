"""Image<->text retrieval recall@K over a shard set of matched image-caption pairs.

Each sample i is a pair (image i, caption i); the N x N cosine similarity is scored with the
diagonal as ground truth (the protocol of CLIP's Flickr30k/COCO retrieval, with one caption per
image). Shard sets such as openclipart repeat captions across different images, so a second
set of recalls (``*_dedup``) counts any text whose caption equals the query's caption as
correct (and, for text->image, any image whose caption equals the query text).
"""
from __future__ import annotations

from typing import Iterable, Sequence

import torch

from .common import encode_eval
from .metrics import RECALL_KS, retrieval_metrics


@torch.no_grad()
def retrieval_eval(
    model,
    loader: Iterable[dict],
    *,
    ks: Sequence[int] = RECALL_KS,
    dedup: bool = True,
    max_batches: int | None = None,
) -> dict:
    """Recall@K in both directions of ``model`` on the pairs yielded by ``loader``.

    Args:
        model: MSCLIP (wrappers with ``.module`` unwrapped); its mode is restored afterwards.
        loader: yields ``{"image": (B,3,H,W) float, "text": (B,77) int64, ...}``
            (build_loader with ``train=False``); its ``"text_lengths"`` (B,) int64 CPU, or
            lengths computed from the CPU tokens, go to ``encode_text(..., lengths=)`` when
            the model takes them (see :func:`~msclip_fast.eval.common.encode_loader`).
        ks: K values (default 1, 5, 10).
        dedup: also report ``*_dedup`` recalls where identical captions (identical token
            rows) count as correct.
        max_batches: stop after this many batches (quick evals during training).
    Returns:
        ``{"i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", ..., "chance_r1" (K/N), ..., "n"}`` and,
        with dedup, ``"i2t_r1_dedup", ..., "chance_r1_dedup", ..., "n_unique_captions"``.
        All recalls and chances are fractions in [0, 1].
    Raises:
        ValueError: the loader yields no samples or no "text".
    """
    enc = encode_eval(model, loader, text=True, max_batches=max_batches)
    return retrieval_metrics(
        enc["image"], enc["text"], captions=enc["captions"] if dedup else None, ks=ks
    )
