"""Pure metric computations on features / scores (no model, no data).

Everything here is deterministic: ties in a ranking are broken by index (a stable descending
sort), so hand-computed expectations in the tests are exact.
"""
from __future__ import annotations

import math
from typing import Hashable, Sequence

import torch

RECALL_KS = (1, 5, 10)


def _check_2d(name: str, x: torch.Tensor) -> None:
    if not isinstance(x, torch.Tensor) or x.dim() != 2:
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"{name} must be a 2-D tensor, got {shape}")


def classification_metrics(
    logits: torch.Tensor, labels: torch.Tensor, num_classes: int | None = None
) -> dict[str, float]:
    """Top-1 / top-5 / balanced accuracy of ``logits`` against ``labels``, with chance levels.

    Args:
        logits: ``(N, C)`` float scores, larger is more likely (e.g. cosine similarities).
        labels: ``(N,)`` int64 class indices in ``[0, C)``.
        num_classes: C; defaults to ``logits.shape[1]``.
    Returns:
        ``{"top1", "balanced_top1", "chance_top1" (1/C), "chance_balanced" (1/C),
        "majority_rate" (frequency of the most common label, the accuracy of always guessing
        it), "n", "num_classes"}``, plus ``"top5"`` and ``"chance_top5"`` (5/C) when C >= 5.
        Balanced accuracy is the mean over the classes that occur in ``labels`` of the
        per-class top-1 recall (as sklearn's ``balanced_accuracy_score``). Ties in the scores
        are broken by the lower class index.
    Raises:
        ValueError: wrong shapes, N == 0, or a label outside ``[0, C)``.
    """
    _check_2d("logits", logits)
    n, c = logits.shape
    num_classes = c if num_classes is None else int(num_classes)
    if num_classes != c:
        raise ValueError(f"num_classes={num_classes} does not match logits.shape[1]={c}")
    if labels.dim() != 1 or labels.shape[0] != n:
        raise ValueError(f"labels must be ({n},), got {tuple(labels.shape)}")
    if n == 0:
        raise ValueError("classification_metrics needs at least one sample, got N=0")
    labels = labels.to(device=logits.device, dtype=torch.long)
    if labels.min() < 0 or labels.max() >= c:
        raise ValueError(f"labels must lie in [0, {c}), got range [{labels.min()}, {labels.max()}]")

    # rank of the true class = #classes scoring higher + #tied classes with a lower index
    # (identical to its position after a stable descending sort).
    rank = _rank_of_targets(logits.float(), labels)
    correct1 = rank < 1
    counts = torch.bincount(labels, minlength=c)
    per_class_hits = torch.bincount(labels, weights=correct1.double(), minlength=c)
    present = counts > 0
    out = {
        "top1": correct1.double().mean().item(),
        "balanced_top1": (per_class_hits[present] / counts[present]).mean().item(),
        "chance_top1": 1.0 / c,
        "chance_balanced": 1.0 / c,
        "majority_rate": counts.max().item() / n,
        "n": int(n),
        "num_classes": int(c),
    }
    if c >= 5:
        out["top5"] = (rank < 5).double().mean().item()
        out["chance_top5"] = 5.0 / c
    return out


def per_class_accuracy(
    logits: torch.Tensor, labels: torch.Tensor, classnames: Sequence[str]
) -> dict[str, float]:
    """Top-1 recall per class name for the classes occurring in ``labels`` (same tie rule)."""
    _check_2d("logits", logits)
    labels = labels.to(device=logits.device, dtype=torch.long)
    correct = _rank_of_targets(logits.float(), labels) < 1
    out = {}
    for i, name in enumerate(classnames):
        sel = labels == i
        if sel.any():
            out[str(name)] = correct[sel].double().mean().item()
    return out


def _rank_of_targets(scores: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """``(Q, N)`` scores, ``(Q,)`` target column -> ``(Q,)`` 0-based rank under a stable sort."""
    tgt = scores.gather(1, targets[:, None])
    idx = torch.arange(scores.shape[1], device=scores.device)[None, :]
    higher = (scores > tgt).sum(1)
    tied_before = ((scores == tgt) & (idx < targets[:, None])).sum(1)
    return higher + tied_before


def group_ids(keys: Sequence[Hashable]) -> torch.Tensor:
    """``(N,)`` int64 ids, equal where the keys are equal (first occurrence order)."""
    ids: dict[Hashable, int] = {}
    return torch.tensor([ids.setdefault(k, len(ids)) for k in keys], dtype=torch.long)


def _first_hit_rank(scores: torch.Tensor, correct: torch.Tensor) -> torch.Tensor:
    """``(Q, N)`` scores and bool mask of correct candidates -> ``(Q,)`` best 0-based rank."""
    order = torch.sort(scores, dim=1, descending=True, stable=True).indices
    hit = correct.gather(1, order)
    # argmax of a 0/1 row returns the first maximal index: the first correct position
    return hit.to(torch.uint8).argmax(1)


def recall_chance(n: int, k: int, group_size: torch.Tensor | None = None) -> float:
    """Expected recall@k of a uniformly random ranking of ``n`` candidates.

    With one correct candidate per query it is ``min(k, n) / n``; with ``g`` correct ones it is
    ``1 - C(n-g, k) / C(n, k)`` (averaged over queries with ``group_size`` ``(Q,)``).
    """
    if n <= 0:
        raise ValueError(f"n must be positive, got {n}")
    if group_size is None:
        return min(k, n) / n
    k = min(k, n)
    vals = []
    for g in group_size.tolist():
        vals.append(1.0 - (math.comb(n - g, k) / math.comb(n, k) if n - g >= k else 0.0))
    return sum(vals) / len(vals)


def retrieval_metrics(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    captions: Sequence[Hashable] | None = None,
    ks: Sequence[int] = RECALL_KS,
    chunk_size: int = 1024,
) -> dict[str, float]:
    """Image->text and text->image recall@K of N matched pairs (pair i: image i, text i).

    Args:
        image_features: ``(N, E)`` float, L2-normalized (similarity is the dot product).
        text_features: ``(N, E)`` float, L2-normalized.
        captions: optional length-N hashable caption identities (e.g. the caption string or
            its token tuple). When given, ``*_dedup`` keys are added: a retrieved text (image)
            counts as correct when its caption equals the query's (query image's) caption.
        ks: the K values.
        chunk_size: query rows scored at once; memory is ``O(chunk_size * N)``.
    Returns:
        ``{"i2t_r{K}", "t2i_r{K}", "chance_r{K}" (= K/N), "n"}`` for each K, plus
        ``"i2t_r{K}_dedup", "t2i_r{K}_dedup", "chance_r{K}_dedup"`` when ``captions`` is given
        (the dedup chance is the exact expectation under a random ranking, per query).
        Ties are broken by the lower candidate index.
    Raises:
        ValueError: shapes differ, N == 0, or ``len(captions) != N``.
    """
    _check_2d("image_features", image_features)
    _check_2d("text_features", text_features)
    if image_features.shape != text_features.shape:
        raise ValueError(
            f"image_features and text_features must both be (N, E), got "
            f"{tuple(image_features.shape)} and {tuple(text_features.shape)}"
        )
    n = image_features.shape[0]
    if n == 0:
        raise ValueError("retrieval_metrics needs at least one pair, got N=0")
    if captions is not None and len(captions) != n:
        raise ValueError(f"captions must have N={n} entries, got {len(captions)}")
    ks = [int(k) for k in ks]
    img = image_features.float()
    txt = text_features.float()
    groups = group_ids(captions).to(img.device) if captions is not None else None

    ranks: dict[str, list[torch.Tensor]] = {"i2t": [], "t2i": [], "i2t_dedup": [], "t2i_dedup": []}
    for name, q_all, c_all in (("i2t", img, txt), ("t2i", txt, img)):
        for s in range(0, n, chunk_size):
            q = q_all[s : s + chunk_size]
            scores = q @ c_all.t()  # (chunk, N)
            targets = torch.arange(s, s + q.shape[0], device=img.device)
            ranks[name].append(_rank_of_targets(scores, targets))
            if groups is not None:
                correct = groups[targets][:, None] == groups[None, :]
                ranks[name + "_dedup"].append(_first_hit_rank(scores, correct))

    out: dict[str, float] = {}
    for name, parts in ranks.items():
        if not parts:
            continue
        r = torch.cat(parts)
        suffix = "_dedup" if name.endswith("_dedup") else ""
        base = name.replace("_dedup", "")
        for k in ks:
            out[f"{base}_r{k}{suffix}"] = (r < k).double().mean().item()
    for k in ks:
        out[f"chance_r{k}"] = recall_chance(n, k)
    if groups is not None:
        sizes = torch.bincount(groups)[groups].cpu()
        for k in ks:
            out[f"chance_r{k}_dedup"] = recall_chance(n, k, sizes)
        out["n_unique_captions"] = int(groups.max().item()) + 1
    out["n"] = int(n)
    return out
