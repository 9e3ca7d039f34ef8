"""DALI backend of :func:`msclip_fast.data.build_loader` (``backend="dali"``).

DALI has no "skip bad sample" option: one corrupt or empty image kills the whole pipeline, and
its decoder drops alpha instead of compositing it (ENVIRONMENT.md).  So each epoch runs in two
steps:

1. *validate + stage* (Python, PIL): the same deterministic stream as the torch backend (shard
   shuffle, shuffle buffer, ``i % world_size == rank``) is read; every sample this rank owns is
   checked (caption present and non-empty, image decodes within ``max_pixels``).  Bad ones are
   counted in ``.skipped`` exactly as the torch backend counts them.  Good samples are written,
   in order, to a temporary tar for this rank; images with alpha or unusual modes are
   re-encoded as RGB PNG composited on white, others keep their original bytes.
2. *DALI pipeline*: ``fn.readers.webdataset`` over the staged tar (no shuffling: the order is
   already the deterministic one), ``fn.decoders.image`` (``device="mixed"`` when CUDA is
   available, else ``"cpu"``; RGB output), random-resized-crop (train) or resize + center crop
   (eval), ``crop_mirror_normalize`` to CHW float32, ``fn.pad`` on the caption bytes.

Order and sample ownership equal the torch backend's; augmentation uses DALI's own RNG (seeded
from ``(seed, epoch)``), so crops differ from the torch backend's but are repeatable.
"""
from __future__ import annotations

import collections
import io
import json
import logging
import math
import os
import random
import shutil
import tempfile
from typing import Any, Dict, Iterator

import torch

from .images import SkipSample, has_alpha, open_image, to_rgb_on_white
from .loader import (
    IMAGE_EXTS, TEXT_EXTS, LoaderConfig, _find_manifest_counts, _raw_stream, _seed_int, _shuffle_buffer,
)
from .tokenizer import get_tokenizer

logger = logging.getLogger(__name__)


def dali_available() -> tuple[bool, str]:
    """(available, reason) for the DALI backend."""
    try:
        import nvidia.dali  # noqa: F401
        from nvidia.dali.plugin.pytorch import DALIGenericIterator  # noqa: F401
    except Exception as e:  # ImportError or a broken install
        return False, f"nvidia-dali is not importable ({type(e).__name__}: {e})"
    return True, ""


class DaliLoader:
    """Same interface as :class:`msclip_fast.data.loader.WebDatasetLoader`."""

    def __init__(self, urls, cfg: LoaderConfig):
        ok, why = dali_available()
        if not ok:
            raise ValueError(f"backend='dali' is unavailable: {why}; use backend='torch'")
        if cfg.num_workers:
            logger.info("backend='dali' ignores num_workers=%d (DALI uses its own threads)", cfg.num_workers)
        self.urls, self.cfg, self.epoch = list(urls), cfg, cfg.epoch
        self._skipped: collections.Counter = collections.Counter()
        self.num_samples = _find_manifest_counts(self.urls)
        self.tokenizer = get_tokenizer(cfg.context_length)
        self.device = "mixed" if torch.cuda.is_available() else "cpu"

    @property
    def skipped(self) -> Dict[str, int]:
        return dict(self._skipped)

    def set_epoch(self, epoch: int) -> None:
        if not isinstance(epoch, int) or isinstance(epoch, bool) or epoch < 0:
            raise ValueError(f"epoch must be an int >= 0, got {epoch!r}")
        self.epoch = epoch

    def __len__(self) -> int:
        if self.num_samples is None:
            raise TypeError("length unknown: no make_shards manifest.json lists these shards")
        per_rank = len(range(self.cfg.rank, self.num_samples, self.cfg.world_size))
        b = self.cfg.batch_size
        return per_rank // b if self.cfg.drop_last else math.ceil(per_rank / b)

    # -- step 1: validate and stage this rank's samples
    def _stage(self, epoch: int, path: str) -> int:
        import webdataset as wds

        cfg = self.cfg
        urls = list(self.urls)
        counter: collections.Counter = collections.Counter()
        if cfg.train:
            random.Random(_seed_int("shards", cfg.seed, epoch)).shuffle(urls)
        stream: Iterator = _raw_stream(urls, counter)
        if cfg.train:
            stream = _shuffle_buffer(stream, cfg.shuffle_buffer, random.Random(_seed_int("buffer", cfg.seed, epoch)))
        n = 0
        with open(path, "wb") as f:
            w = wds.TarWriter(f, mtime=0.0)
            for i, s in enumerate(stream):
                if i % cfg.world_size != cfg.rank:
                    continue
                key = s.get("__key__", "")
                try:
                    ext = next((e for e in IMAGE_EXTS if e in s), None)
                    if ext is None:
                        raise SkipSample("missing_image")
                    t_ext = next((e for e in TEXT_EXTS if e in s), None)
                    if t_ext is None:
                        raise SkipSample("missing_caption")
                    cap = " ".join(s[t_ext].decode("utf-8", errors="replace").split())
                    if not cap:
                        raise SkipSample("empty_caption")
                    im = open_image(s[ext], cfg.max_pixels)
                    data = s[ext]
                    if has_alpha(im) or im.mode not in ("RGB", "L") or ext not in ("jpg", "jpeg", "png"):
                        buf = io.BytesIO()
                        to_rgb_on_white(im).save(buf, format="PNG")
                        data = buf.getvalue()
                except SkipSample as e:
                    if counter[e.reason] == 0:
                        logger.warning("skipping sample %s (%s)", key, e)
                    counter[e.reason] += 1
                    continue
                try:
                    meta = json.loads(s["json"]) if "json" in s else {}
                    meta = meta if isinstance(meta, dict) else {"value": meta}
                except ValueError:
                    meta = {}
                w.write({"__key__": f"{n:09d}", "img": data, "txt": cap,
                         "json": {"key": key, "meta": meta}})
                n += 1
            w.close()
        self._skipped.update(counter)
        return n

    # -- step 2: DALI pipeline over the staged tar
    def _pipeline(self, tar: str, epoch: int):
        from nvidia.dali import fn, pipeline_def, types

        cfg, size = self.cfg, self.cfg.image_size
        mean = [255.0 * m for m in cfg.transform.mean]
        std = [255.0 * s for s in cfg.transform.std]
        dev = self.device

        @pipeline_def
        def pipe():
            img, txt, meta = fn.readers.webdataset(
                paths=[tar], ext=["img", "txt", "json"], missing_component_behavior="error",
                random_shuffle=False, name="reader", pad_last_batch=False,
            )
            img = fn.decoders.image(img, device=dev, output_type=types.RGB)
            if cfg.train:
                img = fn.random_resized_crop(img, size=(size, size), random_area=list(cfg.transform.scale),
                                             random_aspect_ratio=list(cfg.transform.ratio),
                                             interp_type=types.INTERP_CUBIC)
            else:
                img = fn.resize(img, resize_shorter=size, interp_type=types.INTERP_CUBIC)
            img = fn.crop_mirror_normalize(img, crop=(size, size), dtype=types.FLOAT, output_layout="CHW",
                                           mean=mean, std=std)
            return img, fn.pad(txt, fill_value=0), fn.pad(meta, fill_value=0)

        p = pipe(batch_size=cfg.batch_size, num_threads=max(1, min(4, os.cpu_count() or 1)),
                 device_id=0 if dev == "mixed" else None,
                 seed=_seed_int("dali", cfg.seed, epoch) % (2 ** 31))
        p.build()
        return p

    def __iter__(self) -> Iterator[Dict[str, Any]]:
        from nvidia.dali.plugin.base_iterator import LastBatchPolicy
        from nvidia.dali.plugin.pytorch import DALIGenericIterator

        epoch = self.epoch
        tmp = tempfile.mkdtemp(prefix="msclip_dali_")
        try:
            tar = os.path.join(tmp, f"rank{self.cfg.rank}.tar")
            n = self._stage(epoch, tar)
            if n == 0:
                return
            it = DALIGenericIterator(
                self._pipeline(tar, epoch), ["image", "txt", "json"], reader_name="reader",
                last_batch_policy=LastBatchPolicy.DROP if self.cfg.drop_last else LastBatchPolicy.PARTIAL,
                auto_reset=False,
            )
            for out in it:
                d = out[0]
                caps = [bytes(r.cpu().numpy().tobytes()).rstrip(b"\0").decode("utf-8") for r in d["txt"]]
                metas = [json.loads(bytes(r.cpu().numpy().tobytes()).rstrip(b"\0").decode("utf-8")) for r in d["json"]]
                yield {
                    "image": d["image"],
                    "text": self.tokenizer(caps),
                    "key": [m["key"] for m in metas],
                    "meta": [m["meta"] for m in metas],
                }
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
