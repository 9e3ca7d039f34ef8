"""The epoch's sample stream and sample checks shared by both loader backends (torch, DALI).

Both backends must yield the same samples in the same order and count the same skips, so the
order (shard shuffle + shuffle buffer, seeded by ``(seed, epoch)``), the ownership rule
(stream index ``i`` belongs to rank ``i % world_size``, and to worker
``(i // world_size) % num_workers``) and the checks deciding whether a raw sample is usable
(image and non-empty caption present, image decodes within ``max_pixels``) live here once.
"""
from __future__ import annotations

import collections
import hashlib
import json
import logging
import os
import random
import tarfile
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Dict, Iterator, List, Sequence

from PIL import Image

from .images import SkipSample, open_image

if TYPE_CHECKING:  # loader.py imports this module
    from .loader import LoaderConfig

logger = logging.getLogger(__name__)

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp", "tif", "tiff")
TEXT_EXTS = ("txt", "text", "caption")
SKIP_REASONS = (
    "missing_image", "empty_image", "decode_error", "oversized",
    "missing_caption", "empty_caption", "shard_error",
)


def _seed_int(*parts: Any) -> int:
    """Stable 64-bit seed from parts (Python's hash() is salted per process; sha1 is not)."""
    h = hashlib.sha1(":".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(h[:8], "little")


def tar_samples(url: str, exts=None) -> Iterator[tuple]:
    """``(key, {ext: bytes})`` of a local tar shard's samples, in order, grouped as webdataset
    groups them (key: the member path up to the first dot of its file name; consecutive members
    with one key form a sample). Only members whose lower-case extension is in ``exts`` (all
    when None) are read; the others are passed over unread, so no image is read for captions.

    Raises:
        ValueError: the shard is not a readable tar (names it).
    """
    try:
        tf = tarfile.open(url, "r:*")
    except (OSError, tarfile.TarError) as e:
        raise ValueError(f"cannot read shard {url!r}: {type(e).__name__}: {e}") from None
    with tf:
        cur, fields = None, {}
        for m in tf:
            base = os.path.basename(m.name)
            if not m.isfile() or "." not in base:
                continue
            stem, ext = base.split(".", 1)
            key, ext = os.path.join(os.path.dirname(m.name), stem), ext.lower()
            if key != cur:
                if cur is not None:
                    yield cur, fields
                cur, fields = key, {}
            if (exts is None or ext in exts) and ext not in fields:
                fields[ext] = tf.extractfile(m).read()
        if cur is not None:
            yield cur, fields


def _raw_stream(urls: Sequence[str], counter: collections.Counter) -> Iterator[Dict[str, Any]]:
    """Raw sample dicts (bytes per extension + ``__key__``) from the shards, in order; an
    unreadable shard or member is counted as ``shard_error`` in ``counter`` and passed over."""
    import webdataset as wds

    def handler(exn: Exception) -> bool:
        counter["shard_error"] += 1
        logger.warning("skipping unreadable shard data: %s: %s", type(exn).__name__, exn)
        return True

    ds = wds.WebDataset(
        list(urls), shardshuffle=False, nodesplitter=None, workersplitter=None,
        empty_check=False, handler=handler,
    )
    yield from ds


def _shuffle_buffer(it: Iterator, size: int, rng: random.Random) -> Iterator:
    """Deterministic reservoir shuffle: same input order + same rng -> same output order."""
    if size <= 1:
        yield from it
        return
    buf: List[Any] = []
    for x in it:
        if len(buf) < size:
            buf.append(x)
            continue
        j = rng.randrange(size)
        yield buf[j]
        buf[j] = x
    rng.shuffle(buf)
    yield from buf


def owned_samples(urls: Sequence[str], cfg: "LoaderConfig", epoch: int, counter: collections.Counter,
                  worker: int = 0, num_workers: int = 1) -> Iterator[Dict[str, Any]]:
    """The raw samples of ``epoch`` that this (``cfg.rank``, ``worker``) slot owns, in order.

    Every rank reads the same stream: the shards (shuffled by ``(cfg.seed, epoch)`` when
    ``cfg.train``) through a deterministic shuffle buffer (train only); sample ``i`` of it is
    owned by rank ``i % world_size`` and, within the rank, by worker
    ``(i // world_size) % num_workers``.  Shard errors are counted in ``counter``.
    """
    urls = list(urls)
    if cfg.train:
        random.Random(_seed_int("shards", cfg.seed, epoch)).shuffle(urls)
    stream: Iterator = _raw_stream(urls, counter)
    if cfg.train:
        stream = _shuffle_buffer(stream, cfg.shuffle_buffer, random.Random(_seed_int("buffer", cfg.seed, epoch)))
    ws, nw = cfg.world_size, max(1, num_workers)
    for i, sample in enumerate(stream):
        if i % ws == cfg.rank and (i // ws) % nw == worker:
            yield sample


@dataclass
class CheckedSample:
    """A raw sample that passed :func:`check_sample`.

    ``image``: the decoded PIL image, mode as stored (alpha not yet composited);
    ``image_ext``: the sample's image extension (``sample[image_ext]`` holds its bytes);
    ``caption``: whitespace-normalised, non-empty; ``meta``: the sample's ``.json`` dict
    (``{"value": x}`` for a non-dict JSON value, ``{}`` when absent or unparsable).
    """

    key: str
    image: Image.Image
    image_ext: str
    caption: str
    meta: Dict[str, Any]


def check_sample(sample: Dict[str, Any], max_pixels: int) -> CheckedSample:
    """Validate one raw webdataset sample and decode its image.

    Raises:
        SkipSample: ``missing_image``, ``missing_caption``, ``empty_caption``, or from
            :func:`~msclip_fast.data.images.open_image` ``empty_image``, ``oversized``,
            ``decode_error``.
    """
    key = sample.get("__key__", "")
    img_ext = next((e for e in IMAGE_EXTS if e in sample), None)
    if img_ext is None:
        raise SkipSample("missing_image", key)
    txt_ext = next((e for e in TEXT_EXTS if e in sample), None)
    if txt_ext is None:
        raise SkipSample("missing_caption", key)
    raw_txt = sample[txt_ext]
    caption = raw_txt.decode("utf-8", errors="replace") if isinstance(raw_txt, bytes) else str(raw_txt)
    caption = " ".join(caption.split())
    if not caption:
        raise SkipSample("empty_caption", key)
    im = open_image(sample[img_ext], max_pixels)
    meta: Dict[str, Any] = {}
    if "json" in sample:
        try:
            m = json.loads(sample["json"])
            meta = m if isinstance(m, dict) else {"value": m}
        except (ValueError, UnicodeDecodeError):
            meta = {}
    return CheckedSample(key, im, img_ext, caption, meta)


def count_skip(counter: collections.Counter, err: SkipSample, sample: Dict[str, Any]) -> None:
    """Count a skipped sample under ``err.reason``; log only the first of each reason per
    counter, so a shard full of bad samples does not flood the log."""
    if counter[err.reason] == 0:
        logger.warning("skipping sample %s (%s) in %s", sample.get("__key__"), err, sample.get("__url__"))
    counter[err.reason] += 1
