"""DALI backend of :func:`msclip_fast.data.build_loader` (``backend="dali"``).

DALI has no "skip bad sample" option: one corrupt or empty image kills the whole pipeline, and
its decoder drops alpha instead of compositing it (ENVIRONMENT.md).  So each epoch runs in two
steps:

1. *validate + stage* (Python, PIL): the same deterministic stream as the torch backend (shard
   shuffle, shuffle buffer, ``i % world_size == rank``) is read; every sample this rank owns is
   checked (caption present and non-empty, image decodes within ``max_pixels``).  Bad ones are
   counted in ``.skipped`` exactly as the torch backend counts them (both backends use
   :mod:`msclip_fast.data.samples` for the stream and the checks).  Good samples are written,
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
import os
import shutil
import tempfile
from typing import Any, Dict, Iterator

import torch

from ..modules.packing import text_lengths
from .images import SkipSample, has_alpha, to_rgb_on_white
from .loader import LoaderConfig
from .loader_base import ShardLoaderBase
from .samples import _seed_int, check_sample, count_skip, owned_samples
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


class DaliLoader(ShardLoaderBase):
    """Same interface as :class:`msclip_fast.data.loader.WebDatasetLoader`.

    Batches: ``{"image": (B,3,S,S) float32 (on the GPU when decoding is "mixed"),
    "text": (B,context_length) int64 CPU, "text_lengths": (B,) int64 CPU, "key", "meta"}``.
    """

    def __init__(self, urls, cfg: LoaderConfig):
        ok, why = dali_available()
        if not ok:
            raise ValueError(f"backend='dali' is unavailable: {why}; use backend='torch'")
        if cfg.num_workers:
            logger.info("backend='dali' ignores num_workers=%d (DALI uses its own threads)", cfg.num_workers)
        super().__init__(urls, cfg)
        self.tokenizer = get_tokenizer(cfg.context_length)
        self.device = "mixed" if torch.cuda.is_available() else "cpu"

    # -- step 1: validate and stage this rank's samples
    def _stage(self, epoch: int, path: str) -> int:
        import webdataset as wds

        cfg = self.cfg
        counter: collections.Counter = collections.Counter()
        n = 0
        with open(path, "wb") as f:
            w = wds.TarWriter(f, mtime=0.0)
            for s in owned_samples(self.urls, cfg, epoch, counter):
                try:
                    c = check_sample(s, cfg.max_pixels)
                    data = s[c.image_ext]
                    if has_alpha(c.image) or c.image.mode not in ("RGB", "L") or c.image_ext not in ("jpg", "jpeg", "png"):
                        buf = io.BytesIO()
                        to_rgb_on_white(c.image).save(buf, format="PNG")
                        data = buf.getvalue()
                except SkipSample as e:
                    count_skip(counter, e, s)
                    continue
                w.write({"__key__": f"{n:09d}", "img": data, "txt": c.caption,
                         "json": {"key": c.key, "meta": c.meta}})
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
                text = self.tokenizer(caps)  # CPU int64, like the torch backend's
                yield {
                    "image": d["image"],
                    "text": text,
                    # from the CPU tokens, never from a device copy: no host sync (loader.py)
                    "text_lengths": text_lengths(text),
                    "key": [m["key"] for m in metas],
                    "meta": [m["meta"] for m in metas],
                }
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
