"""Build WebDataset shards (img2dataset layout) from a built-in source.

    python -m msclip_fast.data.make_shards --source openclipart|digits|folder --out DIR
        [--image-size N] [--val-fraction F] [--seed S] [--limit N] [--tsv FILE] [--root DIR]
        [--workers N] [--shard-size N] [--max-pixels N] [--no-progress]

Writes ``DIR/train/NNNNNN.tar``, ``DIR/val/NNNNNN.tar`` (members ``KEY.jpg``, ``KEY.txt``,
``KEY.json`` with ``{"class", "label", "source", "uid", ...}``) and ``DIR/manifest.json``:
counts per split, class names (``"classes"``; ``label`` indexes it), per-shard counts
(``"shards"``, used by the loader's ``len()``), duplicate statistics and skipped samples by
reason.  Images are decoded once per distinct content (symlinks and byte-identical copies
share one decode), composited on white, resized so the shorter side is ``--image-size`` and
JPEG-encoded, in a process pool.  The split is leak-free (see :mod:`msclip_fast.data.split`).
Keys follow the sources' sorted order; the samples are written in a ``--seed``-ed random order,
so every shard mixes the classes (as img2dataset's shards of a shuffled URL list do).

Beside each shard it also writes the DALI index files of :mod:`msclip_fast.data.index`
(``NNNNNN.idx`` + ``NNNNNN.idx.json``), built in trusted mode (tar headers only: every sample
here was already decoded, validated and stored as RGB JPEG, so all are good and none needs a
fallback).  Index files of an earlier build in the split directory are removed with its shards.

The slow phases (reading the captions and image files, decoding, writing the shards) show tqdm
progress bars on stderr (``--no-progress`` turns them off; stdout keeps only the final JSON line).
A mistake in the arguments or the input (a missing ``--tsv`` or ``--root``...) is one ``error:``
line on stderr and exit status 2 (:func:`msclip_fast.cli.run_cli`).
"""
from __future__ import annotations

import argparse
import collections
import hashlib
import io
import json
import logging
import multiprocessing as mp
import os
import random
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence

from PIL import Image

from ..cli import run_cli
from .images import DEFAULT_MAX_PIXELS, SkipSample, open_image, prepare_image
from .index import build_shard_index
from .split import duplicate_groups, split_groups

logger = logging.getLogger("msclip_fast.data.make_shards")

SOURCES = ("openclipart", "digits", "folder")
DEFAULT_IMAGE_SIZE = {"openclipart": 256, "folder": 256, "digits": 64}
DIGIT_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
DIGIT_TEMPLATES = (
    "a photo of the digit {name}",
    "handwritten {d}",
    "a handwritten digit {name}",
    "the number {name}",
    "an image of the number {d}",
    "a drawing of the digit {d}",
    "{name}",
)
# Captions shared by more than this many distinct images are generic collection titles
# ("Part of the Flat Icon Collection"): the file name's words are appended to tell them apart.
GENERIC_CAPTION_MIN = 20


@dataclass
class Candidate:
    """One sample before decoding. ``uid`` is stable and unique (path or index)."""

    uid: str
    cls: str
    caption: str
    path: Optional[str] = None  # image file (path sources)
    data: Optional[bytes] = None  # encoded image (in-memory sources)
    digest: str = ""  # sha1 of the image bytes: the decode-once and duplicate key
    group_keys: List[str] = field(default_factory=list)
    meta: Dict[str, Any] = field(default_factory=dict)


def _progress(args, iterable=None, **kw):
    """A tqdm bar on stderr, or a no-op one under ``--no-progress`` (``build`` may be handed a
    Namespace without that field by in-process callers: bars on then, as on the command line)."""
    from tqdm.auto import tqdm

    return tqdm(iterable, file=sys.stderr, dynamic_ncols=True, disable=bool(getattr(args, "no_progress", False)),
                **kw)


# ----------------------------------------------------------------------------- sources


def _openclipart(args, skipped: collections.Counter) -> tuple[List[Candidate], List[str], Dict[str, Any]]:
    from .openclipart import DEFAULT_ROOT, caption_from_svg_file, enumerate_openclipart, filename_hint

    items = enumerate_openclipart(args.root or DEFAULT_ROOT)
    classes = sorted({it.cls for it in items})
    items = _limit(items, args.limit, lambda it: it.rel)
    cands, extra = [], collections.Counter()
    # one SVG parse per item: the first slow phase on the full library
    for it in _progress(args, items, desc="reading captions", unit="svg"):
        cap, fields = caption_from_svg_file(it.svg)
        if fields.error:
            extra[f"svg_{fields.error.split(':')[0]}"] += 1
        c = Candidate(uid=it.rel, cls=it.cls, caption=cap, path=it.png,
                      meta={"path": it.rel, "symlink": it.is_symlink})
        if fields.title:
            c.meta["title"] = fields.title
        cands.append(c)
    # Generic captions: count distinct real files per caption, then disambiguate by file name.
    per_cap = collections.defaultdict(set)
    for c, it in zip(cands, items):
        if c.caption:
            per_cap[c.caption].add(it.real)
    generic = {cap for cap, s in per_cap.items() if len(s) > GENERIC_CAPTION_MIN}
    for c in cands:
        if c.caption in generic:
            hint = filename_hint(c.uid)
            if hint:
                c.meta["caption_metadata"] = c.caption
                c.caption = f"{hint}. {c.caption}"
    info = {
        "symlinks": sum(it.is_symlink for it in items),
        "svg_issues": dict(extra),
        "generic_captions_disambiguated": len(generic),
        "samples_with_generic_caption": sum(1 for c in cands if "caption_metadata" in c.meta),
    }
    return cands, classes, info


def _digits(args, skipped: collections.Counter) -> tuple[List[Candidate], List[str], Dict[str, Any]]:
    import numpy as np
    from sklearn.datasets import load_digits

    d = load_digits()
    size = args.image_size
    cands = []
    for i, (img, y) in enumerate(zip(d.images, d.target)):
        y = int(y)
        # 0..16 ink intensity -> dark ink on a white page.
        a = (255 - np.round(img * (255.0 / 16.0))).clip(0, 255).astype(np.uint8)
        t = DIGIT_TEMPLATES[int(hashlib.sha1(f"tmpl:{args.seed}:{i}".encode()).hexdigest(), 16) % len(DIGIT_TEMPLATES)]
        cap = t.format(name=DIGIT_NAMES[y], d=y)
        raw = Image.fromarray(a, mode="L")
        buf = io.BytesIO()
        raw.save(buf, format="PNG")
        cands.append(Candidate(uid=f"digit_{i:05d}", cls=DIGIT_NAMES[y], caption=cap, data=buf.getvalue(),
                               meta={"index": i}))
    cands = _limit(cands, args.limit, lambda c: c.uid)
    return cands, list(DIGIT_NAMES), {}


def _folder(args, skipped: collections.Counter) -> tuple[List[Candidate], List[str], Dict[str, Any]]:
    if not args.tsv:
        raise ValueError("--source folder needs --tsv FILE (lines: path<TAB>caption[<TAB>class])")
    root = args.root or os.path.dirname(os.path.abspath(args.tsv))
    cands, seen = [], set()
    if not os.path.isfile(args.tsv):
        raise FileNotFoundError(2, "--tsv file not found", args.tsv)
    with open(args.tsv, encoding="utf-8", errors="replace") as f:
        for lineno, line in enumerate(f, 1):
            line = line.rstrip("\n\r")
            if not line.strip() or line.startswith("#"):
                continue
            cols = line.split("\t")
            if lineno == 1 and cols[0].strip().lower() in ("path", "filepath", "file", "image"):
                continue  # header row
            if len(cols) < 2:
                skipped["bad_tsv_line"] += 1
                logger.warning("%s:%d: expected path<TAB>caption, got %r", args.tsv, lineno, line[:80])
                continue
            rel = cols[0].strip()
            if rel in seen:
                skipped["duplicate_tsv_path"] += 1
                continue
            seen.add(rel)
            cls = cols[2].strip() if len(cols) > 2 and cols[2].strip() else (
                rel.replace("\\", "/").split("/")[0] if "/" in rel.replace("\\", "/") else "")
            cap = " ".join(cols[1].split())
            cands.append(Candidate(uid=rel, cls=cls, caption=cap, path=os.path.join(root, rel), meta={"path": rel}))
    classes = sorted({c.cls for c in cands if c.cls})
    cands = _limit(cands, args.limit, lambda c: c.uid)
    return cands, classes, {}


def _limit(items: list, limit: Optional[int], uid: Callable) -> list:
    """First ``limit`` items by a hash of their uid (a spread over classes), in original order."""
    if not limit or limit >= len(items):
        return items
    chosen = set(sorted(range(len(items)), key=lambda i: hashlib.sha1(uid(items[i]).encode()).digest())[:limit])
    return [x for i, x in enumerate(items) if i in chosen]


# ----------------------------------------------------------------------------- decoding


def _worker_init(max_pixels: int) -> None:
    # Pillow's own guard as a second line of defence (our header check runs first).
    Image.MAX_IMAGE_PIXELS = max_pixels
    try:
        import torch  # noqa: F401  (already imported by the package; keep it single-threaded)

        torch.set_num_threads(1)
    except Exception:
        pass


def _decode_task(task):
    """(digest, path|bytes, size, max_pixels, quality) -> (digest, reason|None, jpeg, w, h)."""
    digest, src, size, max_pixels, quality = task
    try:
        im = open_image(src, max_pixels)
        w, h = im.size
        im = prepare_image(im, size, skip_fully_transparent=True)
        buf = io.BytesIO()
        im.save(buf, format="JPEG", quality=quality, optimize=False)
        return digest, None, buf.getvalue(), w, h
    except SkipSample as e:
        return digest, e.reason, None, 0, 0
    except MemoryError:
        return digest, "oversized", None, 0, 0


def _decode_all(tasks: List[tuple], workers: int, args=None) -> Dict[str, tuple]:
    results: Dict[str, tuple] = {}
    t0 = time.time()
    bar = _progress(args, total=len(tasks), desc="decoding images", unit="img")
    try:
        if workers <= 1 or len(tasks) < 8:
            _worker_init(tasks[0][3] if tasks else DEFAULT_MAX_PIXELS)
            for r in map(_decode_task, tasks):
                results[r[0]] = r
                bar.update(1)
            return results
        ctx = mp.get_context("fork") if "fork" in mp.get_all_start_methods() else mp.get_context()
        with ctx.Pool(workers, initializer=_worker_init, initargs=(tasks[0][3],), maxtasksperchild=500) as pool:
            for n, r in enumerate(pool.imap_unordered(_decode_task, tasks, chunksize=1), 1):
                results[r[0]] = r
                bar.update(1)
                # the bar is the progress report; logs (e.g. --no-progress in a batch job) keep a trace
                if bar.disable and n % 1000 == 0:
                    logger.info("decoded %d/%d images (%.1fs)", n, len(tasks), time.time() - t0)
        return results
    finally:
        bar.close()


# ----------------------------------------------------------------------------- writing


def _write_split(out_dir: str, split: str, samples: List[tuple], shard_size: int,
                 max_pixels: int = DEFAULT_MAX_PIXELS, bar=None) -> Dict[str, int]:
    import webdataset as wds

    d = os.path.join(out_dir, split)
    os.makedirs(d, exist_ok=True)
    for fn in os.listdir(d):  # stale shards (and their indexes) of an earlier build would join this one
        if fn.endswith((".tar", ".idx", ".idx.json")) or ".fallback." in fn:
            os.remove(os.path.join(d, fn))
    counts = {}
    for s in range(0, len(samples), shard_size):
        name = f"{s // shard_size:06d}.tar"
        path = os.path.join(d, name)
        tmp = path + ".tmp"
        with open(tmp, "wb") as f:
            w = wds.TarWriter(f, mtime=0.0)  # fixed mtime: byte-reproducible shards
            for key, jpg, caption, meta in samples[s: s + shard_size]:
                w.write({"__key__": key, "jpg": jpg, "txt": caption, "json": meta})
            w.close()
        os.replace(tmp, path)
        build_shard_index(path, max_pixels=max_pixels, trusted=True)
        counts[f"{split}/{name}"] = len(samples[s: s + shard_size])
        if bar is not None:
            bar.update(len(samples[s: s + shard_size]))
    return counts


def build(args) -> Dict[str, Any]:
    """Build the shards described by parsed ``args``; returns the manifest dict."""
    t0 = time.time()
    if args.source not in SOURCES:
        raise ValueError(f"source must be one of {SOURCES}, got {args.source!r}")
    if args.image_size is None:
        args.image_size = DEFAULT_IMAGE_SIZE[args.source]
    if args.image_size < 1:
        raise ValueError(f"image_size must be >= 1, got {args.image_size!r}")
    if not (0.0 <= args.val_fraction < 1.0):
        raise ValueError(f"val_fraction must be in [0, 1), got {args.val_fraction!r}")
    if args.shard_size < 1:
        raise ValueError(f"shard_size must be >= 1, got {args.shard_size!r}")
    if args.limit is not None and args.limit < 1:
        raise ValueError(f"limit must be >= 1, got {args.limit!r}")
    if not (1 <= args.quality <= 100):
        raise ValueError(f"quality must be in [1, 100], got {args.quality!r}")
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise ValueError(f"--out {args.out!r} is a file, not a directory")
    skipped: collections.Counter = collections.Counter()
    source_fn = {"openclipart": _openclipart, "digits": _digits, "folder": _folder}[args.source]
    cands, classes, source_info = source_fn(args, skipped)
    n_candidates = len(cands)
    t_enum = time.time() - t0

    # 1. captions and image bytes -> digest (decode-once key).
    kept: List[Candidate] = []
    for c in _progress(args, cands, desc="reading images", unit="file"):
        if not c.caption:
            skipped["no_caption"] += 1
            continue
        if c.data is None:
            try:
                with open(c.path, "rb") as f:
                    data = f.read()
            except OSError:
                skipped["missing_image"] += 1
                continue
            c.meta.setdefault("_bytes", len(data))
        else:
            data = c.data
        if not data:
            skipped["empty_image"] += 1
            continue
        c.digest = hashlib.sha1(data).hexdigest()
        kept.append(c)

    # 2. decode each distinct image once, biggest first (keeps both workers busy to the end).
    uniq: Dict[str, Candidate] = {}
    for c in kept:
        uniq.setdefault(c.digest, c)
    order = sorted(uniq.values(), key=lambda c: -(c.meta.get("_bytes") or len(c.data or b"")))
    tasks = [(c.digest, c.path if c.data is None else c.data, args.image_size, args.max_pixels, args.quality)
             for c in order]
    t1 = time.time()
    results = _decode_all(tasks, args.workers, args)
    t_decode = time.time() - t1

    good: List[Candidate] = []
    for c in kept:
        c.meta.pop("_bytes", None)
        _, reason, jpg, w, h = results[c.digest]
        if reason is not None:
            skipped[reason] += 1
            continue
        c.data = jpg
        c.meta.update(width=w, height=h)
        good.append(c)

    # 3. duplicate groups and the leak-free split.
    group_by = ["image", "caption"] if args.source != "digits" else ["image"]
    keys = []
    for c in good:
        k = [f"img:{c.digest}"]
        if "caption" in group_by:
            k.append("cap:" + c.caption.casefold())
        keys.append(k)
    groups = duplicate_groups(keys)
    split, split_stats = split_groups([c.uid for c in good], groups, args.val_fraction, args.seed)
    img_counts = collections.Counter(c.digest for c in good)
    cap_counts = collections.Counter(c.caption.casefold() for c in good)

    # 4. write shards, keys assigned in uid order (stable for a given source and limit).
    class_index = {name: i for i, name in enumerate(classes)}
    order_idx = sorted(range(len(good)), key=lambda i: good[i].uid)
    per_split: Dict[str, List[tuple]] = {"train": [], "val": []}
    class_counts: Dict[str, collections.Counter] = {"train": collections.Counter(), "val": collections.Counter()}
    for rank, i in enumerate(order_idx):
        c = good[i]
        meta = {"class": c.cls, "label": class_index.get(c.cls, -1), "source": args.source, "uid": c.uid,
                "group": f"{groups[i]:06d}", **c.meta}
        per_split[split[i]].append((f"{rank:09d}", c.data, c.caption, meta))
        class_counts[split[i]][c.cls] += 1
    # Written in a seeded random order: uid order is folder (class) order, which would give
    # shards of one or two classes each, and a shard-level shuffle then batches of one class.
    for name, samples in per_split.items():
        random.Random(f"{args.seed}:{name}").shuffle(samples)
    t2 = time.time()
    os.makedirs(args.out, exist_ok=True)
    shards = {}
    with _progress(args, total=len(good), desc="writing shards", unit="sample") as bar:
        for name in ("train", "val"):
            shards.update(_write_split(args.out, name, per_split[name], args.shard_size, args.max_pixels, bar))
    t_write = time.time() - t2

    manifest = {
        "source": args.source,
        "counts": {"train": len(per_split["train"]), "val": len(per_split["val"]),
                   "candidates": n_candidates, "written": len(good), "skipped": sum(skipped.values())},
        "classes": classes,
        "class_counts": {k: dict(sorted(v.items())) for k, v in class_counts.items()},
        "skipped": dict(sorted(skipped.items())),
        "duplicates": {
            "group_by": group_by,
            "distinct_images": len(img_counts),
            "samples_sharing_image": sum(n for n in img_counts.values() if n > 1),
            "distinct_captions": len(cap_counts),
            "samples_sharing_caption": sum(n for n in cap_counts.values() if n > 1),
            "largest_caption_count": max(cap_counts.values(), default=0),
            **split_stats,
            **source_info,
        },
        "shards": shards,
        "image_size": args.image_size,
        "image_format": "jpg",
        "val_fraction": args.val_fraction,
        "seed": args.seed,
        "limit": args.limit,
        "max_pixels": args.max_pixels,
        "timing_s": {"enumerate_captions": round(t_enum, 2), "decode": round(t_decode, 2),
                     "write": round(t_write, 2), "total": round(time.time() - t0, 2)},
        "workers": args.workers,
    }
    tmp = os.path.join(args.out, "manifest.json.tmp")
    with open(tmp, "w") as f:
        json.dump(manifest, f, indent=1, ensure_ascii=False)
    os.replace(tmp, os.path.join(args.out, "manifest.json"))
    logger.info("wrote %d train + %d val samples in %.1fs to %s; skipped %s", len(per_split["train"]),
                len(per_split["val"]), time.time() - t0, args.out, dict(skipped))
    return manifest


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m msclip_fast.data.make_shards", description=__doc__.split("\n\n")[0])
    p.add_argument("--source", required=True, choices=SOURCES)
    p.add_argument("--out", required=True, help="output directory (train/, val/, manifest.json)")
    p.add_argument("--image-size", type=int, default=None,
                   help="shorter side in pixels after resizing (default: 256; digits 64)")
    p.add_argument("--val-fraction", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--limit", type=int, default=None, help="use at most N source samples (spread by hash)")
    p.add_argument("--tsv", default=None, help="folder source: lines path<TAB>caption[<TAB>class]")
    p.add_argument("--root", default=None, help="openclipart root (default /usr/share/openclipart) or folder root")
    p.add_argument("--workers", type=int, default=max(1, min(os.cpu_count() or 1, 8)))
    p.add_argument("--shard-size", type=int, default=1000, help="samples per .tar")
    p.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS,
                   help="skip images with more pixels (read from the header, never decoded)")
    p.add_argument("--quality", type=int, default=90, help="JPEG quality")
    p.add_argument("--no-progress", action="store_true", help="no progress bars on stderr")
    return p.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """The command line; returns 0 (ValueError / FileNotFoundError for bad arguments or input)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    m = build(args)
    print(json.dumps({"out": args.out, "counts": m["counts"], "skipped": m["skipped"],
                      "classes": len(m["classes"]), "seconds": m["timing_s"]["total"]}))
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
