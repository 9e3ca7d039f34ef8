"""Retrieval gallery: pictures of what a checkpoint retrieves on held-out pairs.

``python -m msclip_fast.eval gallery --checkpoint RUN --data DIR/val --out DIR`` writes

* ``text_to_image.png``: one row per held-out caption: the caption, then its top-K images
  (the query's own image framed green, another image with the same caption framed orange);
* ``image_to_text.png``: one row per held-out image: the image, then its top-K captions (its
  own caption, or an identical one, in green);
* ``gallery.json``: what the pictures show (keys, captions, scores, ranks of the true match).

Features come from :func:`~msclip_fast.eval.common.encode_loader` (the same pass as the
retrieval evaluation) and "identical caption" from
:func:`~msclip_fast.eval.metrics.group_ids` (identical token rows, as in the ``*_dedup``
recalls). Pictures are drawn with matplotlib's Agg canvas (files only, no display).
"""
from __future__ import annotations

import json
import logging
import textwrap
from pathlib import Path
from typing import Iterable, Sequence

import torch

from .common import encode_eval
from .metrics import group_ids
from .prompts import read_shard_captions

logger = logging.getLogger(__name__)

GREEN, ORANGE, GREY = "#1a9850", "#f28e2b", "#bbbbbb"


def _read_images(urls: Sequence[str], keys: set[str]) -> dict[str, bytes]:
    """Encoded image bytes of the samples ``keys`` (first image member of each)."""
    from ..data.samples import IMAGE_EXTS, tar_samples

    out: dict[str, bytes] = {}
    for url in urls:
        for key, fields in tar_samples(url, IMAGE_EXTS):
            if key in keys and key not in out:
                img = next((fields[e] for e in IMAGE_EXTS if e in fields), None)
                if img is not None:
                    out[key] = img
        if len(out) == len(keys):
            break
    return out


def _pick(n: int, k: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return sorted(torch.randperm(n, generator=g)[: min(k, n)].tolist())


@torch.no_grad()
def retrieve(model, loader: Iterable[dict], *, queries: int = 8, top: int = 5, seed: int = 0,
             max_batches: int | None = None) -> dict:
    """Top-``top`` retrievals, both directions, for ``queries`` held-out samples.

    Args:
        model: MSCLIP (wrappers unwrapped); its mode is restored afterwards.
        loader: eval loader (``train=False``) yielding ``"image"``, ``"text"``, ``"key"``.
        queries: number of query samples of each direction (a seeded random choice; text
            queries are distinct captions).
        top: retrieved items shown per query.
        seed: seed of the query choice.
        max_batches: encode only the first N batches.
    Returns:
        ``{"n": N, "t2i": [...], "i2t": [...]}``; each entry ``{"query": index, "key",
        "retrieved": [{"index", "key", "score" (cosine), "match": "exact"|"same_caption"|None}],
        "true_rank": 1-based rank of the query's own pair}``.
    Raises:
        ValueError: no samples, or fewer than 2.
    """
    enc = encode_eval(model, loader, text=True, max_batches=max_batches)
    n = enc["image"].shape[0]
    if n < 2:
        raise ValueError(f"the gallery needs at least 2 samples, got {n}")
    top = min(top, n)
    sim = enc["image"] @ enc["text"].t()  # (N images, N texts), cosine
    groups = group_ids(enc["captions"])
    keys = enc["key"]

    def match(q: int, j: int):
        return "exact" if j == q else ("same_caption" if groups[j] == groups[q] else None)

    def entries(scores: torch.Tensor, qs: list[int]):
        out = []
        for q in qs:
            row = scores[q]
            best = torch.topk(row, top).indices.tolist()
            rank = int((row > row[q]).sum()) + 1
            out.append({"query": q, "key": keys[q], "true_rank": rank, "retrieved": [
                {"index": j, "key": keys[j], "score": round(float(row[j]), 4), "match": match(q, j)} for j in best]})
        return out

    # text queries: distinct captions, so no two rows ask the same thing
    first_of_group: dict[int, int] = {}
    for i, g in enumerate(groups.tolist()):
        first_of_group.setdefault(g, i)
    distinct = sorted(first_of_group.values())
    t_queries = [distinct[i] for i in _pick(len(distinct), queries, seed)]
    i_queries = _pick(n, queries, seed + 1)
    return {"n": n, "t2i": entries(sim.t(), t_queries), "i2t": entries(sim, i_queries)}


def _figure(rows: int, cols: int):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(2.0 * cols + 1.0, 2.1 * rows))
    FigureCanvasAgg(fig)
    return fig


def _frame(ax, color, width=4):
    for s in ax.spines.values():
        s.set_visible(color is not None)
        if color is not None:
            s.set_edgecolor(color)
            s.set_linewidth(width)


def _image_axis(ax, im, title, color=None):
    ax.imshow(im)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(title, fontsize=7)
    _frame(ax, color)


def _text_axis(ax, text, color="black", width=26, weight="normal", face=None):
    ax.axis("off")
    box = None if face is None else {"facecolor": face, "edgecolor": color, "boxstyle": "round,pad=0.4"}
    ax.text(0.02, 0.5, "\n".join(textwrap.wrap(text, width)[:7]), fontsize=7, color=color, weight=weight,
            va="center", ha="left", transform=ax.transAxes, bbox=box)


def draw_text_to_image(result: dict, captions: dict, images: dict, path: Path) -> None:
    """Write the caption -> images figure (see the module docstring) to ``path`` (PNG)."""
    rows, top = len(result["t2i"]), len(result["t2i"][0]["retrieved"])
    fig = _figure(rows, top + 1)
    for r, e in enumerate(result["t2i"]):
        ax = fig.add_subplot(rows, top + 1, r * (top + 1) + 1)
        _text_axis(ax, f'"{captions.get(e["key"], "?")}"  (own image: rank {e["true_rank"]})', weight="bold")
        for c, hit in enumerate(e["retrieved"]):
            ax = fig.add_subplot(rows, top + 1, r * (top + 1) + c + 2)
            color = {"exact": GREEN, "same_caption": ORANGE}.get(hit["match"])
            _image_axis(ax, images[hit["key"]], f'#{c + 1}  {hit["score"]:.3f}', color)
    fig.suptitle("text -> image: top retrieved images (green: the caption's own image, orange: same caption)",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def draw_image_to_text(result: dict, captions: dict, images: dict, path: Path) -> None:
    """Write the image -> captions figure (see the module docstring) to ``path`` (PNG)."""
    rows, top = len(result["i2t"]), len(result["i2t"][0]["retrieved"])
    fig = _figure(rows, top + 1)
    for r, e in enumerate(result["i2t"]):
        ax = fig.add_subplot(rows, top + 1, r * (top + 1) + 1)
        _image_axis(ax, images[e["key"]], f'query (own caption: rank {e["true_rank"]})')
        ax.set_xlabel("\n".join(textwrap.wrap(f'own: "{captions.get(e["key"], "?")}"', 34)[:2]), fontsize=7)
        for c, hit in enumerate(e["retrieved"]):
            ax = fig.add_subplot(rows, top + 1, r * (top + 1) + c + 2)
            good = hit["match"] is not None
            _text_axis(ax, f'#{c + 1} {hit["score"]:.3f}: {captions.get(hit["key"], "?")}',
                       color=GREEN if good else "black", weight="bold" if good else "normal",
                       face="#e5f5e0" if good else None)
    fig.suptitle("image -> text: top retrieved captions (green: the image's own caption or an identical one)",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def make_gallery(model, loader: Iterable[dict], urls: Sequence[str], out: str | Path, *, queries: int = 8,
                 top: int = 5, seed: int = 0, max_batches: int | None = None, thumb: int = 160) -> dict:
    """Retrieve (:func:`retrieve`) and draw both figures plus ``gallery.json`` into ``out``.

    Args:
        model, loader, queries, top, seed, max_batches: as :func:`retrieve`.
        urls: the loader's shard paths (local tars), read again for the captions and the
            pictures of the shown samples.
        out: output directory (created).
        thumb: longest side of the shown pictures, pixels.
    Returns:
        ``{"text_to_image": path, "image_to_text": path, "json": path, "n", "queries", "top"}``
        (paths as str).
    Raises:
        ValueError: see :func:`retrieve`; a shown sample missing from ``urls``.
    """
    from ..data.preprocess import Preprocess

    result = retrieve(model, loader, queries=queries, top=top, seed=seed, max_batches=max_batches)
    captions = {k: c for k, c, _ in read_shard_captions(urls)}
    shown = {e["key"] for d in ("t2i", "i2t") for e in result[d]}
    shown |= {h["key"] for d in ("t2i", "i2t") for e in result[d] for h in e["retrieved"]}
    raw = _read_images(urls, shown)
    missing = sorted(shown - set(raw))
    if missing:
        raise ValueError(f"{len(missing)} shown samples not found in the shards (e.g. {missing[0]!r})")
    load = Preprocess(thumb).load  # the loaders' decoding: transparency on white
    images = {}
    for k, b in raw.items():
        im = load(b)
        im.thumbnail((thumb, thumb))
        images[k] = im
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"text_to_image": out / "text_to_image.png", "image_to_text": out / "image_to_text.png",
             "json": out / "gallery.json"}
    draw_text_to_image(result, captions, images, paths["text_to_image"])
    draw_image_to_text(result, captions, images, paths["image_to_text"])
    for d in ("t2i", "i2t"):
        for e in result[d]:
            e["caption"] = captions.get(e["key"])
            for h in e["retrieved"]:
                h["caption"] = captions.get(h["key"])
    summary = {"n": result["n"], "queries": len(result["t2i"]), "top": top,
               "text_to_image_true_in_top": sum(e["true_rank"] <= top for e in result["t2i"]),
               "image_to_text_true_in_top": sum(e["true_rank"] <= top for e in result["i2t"])}
    with open(paths["json"], "w") as f:
        json.dump({**summary, "text_to_image": result["t2i"], "image_to_text": result["i2t"]}, f, indent=1)
    logger.info("gallery of %d held-out samples written to %s", result["n"], out)
    return {**{k: str(v) for k, v in paths.items()}, **summary}
