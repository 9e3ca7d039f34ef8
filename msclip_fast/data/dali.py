"""DALI backend of :func:`msclip_fast.data.build_loader` (``backend="dali"``).

DALI has no "skip bad sample" option: one corrupt or empty image kills the whole pipeline, and
its decoder drops alpha instead of compositing it (ENVIRONMENT.md).  So samples are validated
once, when the shard index is built (:mod:`msclip_fast.data.index`; make_shards writes it,
``python -m msclip_fast.data.index DIR`` builds it for other shards), never per epoch: the
index lists only the good samples, and the images DALI would mishandle (alpha, palette, CMYK,
16-bit, other formats) were normalised once into the shard's fallback tar.

Each epoch:

1. the rank's plan (:func:`msclip_fast.data.plan.rank_plan`: the same order, ownership and
   resume position as the torch backend) is written as a few DALI index files, one per
   contiguous run of a source tar (a run lists the tar's members by offset, in plan order; DALI
   reads exactly the samples an index lists, in its order);
2. ``fn.readers.webdataset(paths, index_paths)`` reads the original shards through them: no
   staging copy, no Pillow, no image bytes through Python;
3. ``fn.decoders.image`` (``device="mixed"``, nvJPEG, when CUDA is available, else ``"cpu"``;
   RGB), one bicubic resize of each sample's crop window to S x S (train: random-resized-crop
   window; eval: the central square), ``crop_mirror_normalize``
   to CHW float32 (on the GPU with mixed decoding: the batch feeds the model without a host
   round trip), ``fn.pad`` on the caption and json bytes.

The crop windows are the torch backend's own: Python draws each sample's window from
``(seed, epoch, key)`` and the image size stored in the index (no image is opened) and feeds
them to ``fn.resize`` through ``fn.external_source``; so train crops equal the torch backend's
within resampling rounding, a resumed epoch gets the crops the uninterrupted one had, and the
DALI RNG is not used. Keys come from the plan (DALI returns the samples in plan order).
"""
from __future__ import annotations

import itertools
import json
import logging
import os
import random
import shutil
import tempfile
from typing import Any, Dict, Iterator, List, Sequence

import numpy as np
import torch

from ..modules.packing import text_lengths
from .index import idx_line
from .loader import LoaderConfig
from .loader_base import ShardLoaderBase
from .plan import PlannedSample, rank_plan, runs, skip_counts
from .samples import IMAGE_EXTS, TEXT_EXTS, _seed_int
from .tokenizer import get_tokenizer
from .transforms import center_crop_box, random_resized_crop_params

logger = logging.getLogger(__name__)


def dali_available() -> tuple[bool, str]:
    """(available, reason) for the DALI backend."""
    try:
        import nvidia.dali  # noqa: F401
        from nvidia.dali.plugin.pytorch import DALIGenericIterator  # noqa: F401
    except Exception as e:  # ImportError or a broken install
        return False, f"nvidia-dali is not importable ({type(e).__name__}: {e})"
    return True, ""


def write_plan_indices(plan: Sequence[PlannedSample], out_dir: str) -> tuple[List[str], List[str]]:
    """Write ``plan`` as DALI webdataset index files (format v1.2, one per contiguous run of a
    tar) under ``out_dir``; returns ``(paths, index_paths)`` for ``fn.readers.webdataset``."""
    paths, idx = [], []
    for i, (tar, samples) in enumerate(runs(plan)):
        p = os.path.join(out_dir, f"run{i:06d}.idx")
        with open(p, "w") as f:
            f.write(f"v1.2 {len(samples)}\n")
            for s in samples:
                f.write(idx_line(s.members) + "\n")
        paths.append(tar)
        idx.append(p)
    return paths, idx


class DaliLoader(ShardLoaderBase):
    """Same interface as :class:`msclip_fast.data.loader.WebDatasetLoader`.

    Batches: ``{"image": (B,3,S,S) float32 (on the GPU when decoding is "mixed"),
    "text": (B,context_length) int64 CPU, "text_lengths": (B,) int64 CPU, "key", "meta"}``.

    Raises:
        ValueError: DALI is not importable; IndexMissingError (a ValueError) when a shard has
            no index (the message names the command that builds it); a stale index.
    """

    def __init__(self, urls, cfg: LoaderConfig):
        ok, why = dali_available()
        if not ok:
            raise ValueError(f"backend='dali' is unavailable: {why}; use backend='torch'")
        super().__init__(urls, cfg, require_index=True)
        self.tokenizer = get_tokenizer(cfg.context_length)
        self.device = "mixed" if torch.cuda.is_available() else "cpu"
        self.num_threads = cfg.num_workers or max(1, os.cpu_count() or 1)

    def _windows(self, plan: Sequence[PlannedSample], epoch: int) -> Iterator[tuple]:
        """Per pipeline iteration: the batch's crop windows as ``([(top, left)], [(bottom,
        right)])`` float32 pixel coordinates, the very windows the torch backend cuts (train:
        :func:`~msclip_fast.data.transforms.random_resized_crop_params` drawn from
        ``(seed, epoch, key)``; eval: the central square). Cycles past the plan's end, as DALI's
        reader wraps into the next epoch to fill the last batch (the iterator trims it)."""
        cfg, t = self.cfg, self.cfg.transform
        n, b = len(plan), cfg.batch_size
        for k in itertools.count():
            starts, ends = [], []
            for i in range(b):
                p = plan[(k * b + i) % n]
                w, h = p.sample.size
                if cfg.train:
                    rng = random.Random(_seed_int(cfg.seed, epoch, p.key))
                    top, left, ch, cw = random_resized_crop_params(w, h, t.scale, t.ratio, rng)
                else:
                    left, top, right, bottom = center_crop_box(w, h)
                    ch, cw = bottom - top, right - left
                starts.append(np.array([top, left], np.float32))
                ends.append(np.array([top + ch, left + cw], np.float32))
            yield starts, ends

    def _pipeline(self, paths: List[str], index_paths: List[str], plan: Sequence[PlannedSample], epoch: int):
        from nvidia.dali import fn, pipeline_def, types

        cfg, size = self.cfg, self.cfg.image_size
        mean = [255.0 * m for m in cfg.transform.mean]
        std = [255.0 * s for s in cfg.transform.std]
        dev = self.device
        windows = self._windows(plan, epoch)

        @pipeline_def
        def pipe():
            enc, txt, meta = fn.readers.webdataset(
                paths=paths, index_paths=index_paths,
                ext=[";".join(IMAGE_EXTS), ";".join(TEXT_EXTS), "json"],
                missing_component_behavior="empty", random_shuffle=False, name="reader",
                pad_last_batch=False,
            )
            img = fn.decoders.image(enc, device=dev, output_type=types.RGB)
            # each sample's crop window (the torch backend's, from the index's image sizes),
            # resampled to S x S in one bicubic pass as the torch transforms do
            roi_start, roi_end = fn.external_source(source=windows, num_outputs=2, batch=True,
                                                    dtype=types.FLOAT)
            img = fn.resize(img, size=(size, size), interp_type=types.INTERP_CUBIC, antialias=True,
                            roi_start=roi_start, roi_end=roi_end)
            img = fn.crop_mirror_normalize(img, dtype=types.FLOAT, output_layout="CHW", mean=mean, std=std)
            return img, fn.pad(txt, fill_value=0), fn.pad(meta, fill_value=0)

        p = pipe(batch_size=cfg.batch_size, num_threads=self.num_threads,
                 device_id=torch.cuda.current_device() if dev == "mixed" else None,
                 seed=_seed_int("dali", cfg.seed, epoch) % (2 ** 31))
        p.build()
        return p

    def __iter__(self) -> Iterator[Dict[str, Any]]:
        from nvidia.dali.plugin.base_iterator import LastBatchPolicy
        from nvidia.dali.plugin.pytorch import DALIGenericIterator

        cfg, epoch, start = self.cfg, self.epoch, self.start_batch
        self.start_batch = 0  # a resume position holds for one iter()
        if cfg.rank == 0:
            self._skipped.update(skip_counts(self.indices))
        plan = rank_plan(self.indices, cfg, epoch, start)
        n = len(plan) - (len(plan) % cfg.batch_size if cfg.drop_last else 0)
        if n == 0:
            return
        tmp = tempfile.mkdtemp(prefix="msclip_dali_plan_")
        try:
            paths, index_paths = write_plan_indices(plan, tmp)
            it = DALIGenericIterator(
                self._pipeline(paths, index_paths, plan, epoch), ["image", "txt", "json"], reader_name="reader",
                last_batch_policy=LastBatchPolicy.DROP if cfg.drop_last else LastBatchPolicy.PARTIAL,
                auto_reset=False,
            )
            pos = 0
            for out in it:
                d = out[0]
                keys = [p.key for p in plan[pos: pos + d["image"].shape[0]]]
                pos += len(keys)
                caps = [_bytes(r).decode("utf-8", errors="replace") for r in d["txt"]]
                metas = [_meta(_bytes(r)) for r in d["json"]]
                # the index holds only non-empty captions; whitespace as check_sample leaves it
                text = self.tokenizer([" ".join(c.split()) for c in caps])  # CPU int64, as torch's
                yield {
                    "image": d["image"],
                    "text": text,
                    # from the CPU tokens, never from a device copy: no host sync (loader.py)
                    "text_lengths": text_lengths(text),
                    "key": keys,
                    "meta": metas,
                }
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


def _bytes(row: torch.Tensor) -> bytes:
    """A padded uint8 row of DALI's output -> its bytes (the zero padding stripped)."""
    return row.cpu().numpy().tobytes().rstrip(b"\0")


def _meta(raw: bytes) -> Dict[str, Any]:
    """The sample's ``.json`` as the torch backend gives it (``{}`` when absent or bad)."""
    if not raw:
        return {}
    try:
        m = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        return {}
    return m if isinstance(m, dict) else {"value": m}
