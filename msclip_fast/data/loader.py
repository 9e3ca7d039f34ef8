"""WebDataset loader (torch backend) and the ``build_loader`` entry point.

Data flow for one epoch (every rank runs the same steps on the same byte stream)::

    shard list --(train: shuffled by (seed, epoch))--> webdataset tar reader (raw bytes)
      --(train: deterministic shuffle buffer)--> sample i owned by rank i % world_size
      (and by worker (i // world_size) % num_workers) --> decode + transform --> batch

Ownership is decided on the raw stream index, before anything is decoded, so each sample is
seen exactly once per epoch across ranks even with a single shard, and a skipped sample is
skipped (and counted) by exactly one rank.  The price is that every rank reads every shard's
bytes (not decodes them): cheap for the small datasets this engine trains on, and exact.

Skipped samples are never fatal; ``loader.skipped`` counts them per reason (cumulative over
epochs): ``missing_image``, ``empty_image``, ``decode_error``, ``oversized``,
``missing_caption``, ``empty_caption``, ``shard_error`` (an unreadable tar member / shard).
"""
from __future__ import annotations

import collections
import logging
import random
from dataclasses import dataclass, field
from typing import Any, Dict, Iterator, Optional, Sequence, Tuple

import torch

from ..modules.packing import text_lengths
from .images import DEFAULT_MAX_PIXELS, SkipSample, to_rgb_on_white
from .loader_base import ShardLoaderBase, num_batches
from .samples import _seed_int, check_sample, count_skip, owned_samples
from .tokenizer import get_tokenizer
from .transforms import CLIP_MEAN, CLIP_STD, TransformConfig, eval_transform, train_transform
from .urls import resolve_urls

logger = logging.getLogger(__name__)


@dataclass
class LoaderConfig:
    """Validated settings of :class:`WebDatasetLoader` (see :func:`build_loader`)."""

    batch_size: int
    train: bool
    image_size: int = 224
    mean: Tuple[float, float, float] = CLIP_MEAN
    std: Tuple[float, float, float] = CLIP_STD
    rank: int = 0
    world_size: int = 1
    seed: int = 0
    epoch: int = 0
    num_workers: int = 0
    drop_last: Optional[bool] = None
    max_pixels: int = DEFAULT_MAX_PIXELS
    shuffle_buffer: int = 2000
    context_length: int = 77
    transform: TransformConfig = field(init=False)

    def __post_init__(self):
        def _int(name, lo):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < lo:
                raise ValueError(f"{name} must be an int >= {lo}, got {v!r}")

        _int("batch_size", 1)
        _int("world_size", 1)
        _int("rank", 0)
        _int("num_workers", 0)
        _int("max_pixels", 1)
        _int("shuffle_buffer", 0)
        _int("epoch", 0)
        if not isinstance(self.seed, int) or isinstance(self.seed, bool):
            raise ValueError(f"seed must be an int, got {self.seed!r}")
        if self.rank >= self.world_size:
            raise ValueError(f"rank must be < world_size={self.world_size}, got {self.rank!r}")
        if self.drop_last is None:
            self.drop_last = bool(self.train)
        self.transform = TransformConfig(image_size=self.image_size, mean=tuple(self.mean), std=tuple(self.std))


class _SampleDecoder:
    """Raw webdataset sample dict -> (image tensor, caption, key, meta) or SkipSample."""

    def __init__(self, cfg: LoaderConfig):
        self.cfg = cfg

    def __call__(self, sample: Dict[str, Any], epoch: int):
        c = check_sample(sample, self.cfg.max_pixels)
        im = to_rgb_on_white(c.image)
        if self.cfg.train:
            rng = random.Random(_seed_int(self.cfg.seed, epoch, c.key))
            x = train_transform(im, self.cfg.transform, rng)
        else:
            x = eval_transform(im, self.cfg.transform)
        return x, c.caption, c.key, c.meta


class _EpochStream:
    """Yields the batches of one epoch for one (rank, worker) slot.

    Each yielded item is ``(batch_dict_or_None, skipped_delta)``; the final item carries the
    remaining skip counts (and the last partial batch unless ``drop_last``).
    """

    def __init__(self, urls, cfg: LoaderConfig, epoch: int, worker: int = 0, num_workers: int = 1):
        self.urls, self.cfg, self.epoch = list(urls), cfg, epoch
        self.worker, self.num_workers = worker, max(1, num_workers)
        self.decode = _SampleDecoder(cfg)
        self.tokenizer = get_tokenizer(cfg.context_length)

    def _collate(self, items) -> Dict[str, Any]:
        """Decoded items -> one batch dict (the layout :func:`build_loader` documents)."""
        text = self.tokenizer([c for _, c, _, _ in items])
        return {
            "image": torch.stack([x for x, _, _, _ in items]),
            "text": text,
            # from the CPU tokens here, on the worker side: the model trims each caption at its
            # EOT and needs the lengths on the host; taking them from device tokens later would
            # cost a device-to-host sync every step
            "text_lengths": text_lengths(text),
            "key": [k for _, _, k, _ in items],
            "meta": [m for _, _, _, m in items],
        }

    def __iter__(self):
        cfg = self.cfg
        counter: collections.Counter = collections.Counter()
        items = []
        for sample in owned_samples(self.urls, cfg, self.epoch, counter, self.worker, self.num_workers):
            try:
                items.append(self.decode(sample, self.epoch))
            except SkipSample as e:
                count_skip(counter, e, sample)
                continue
            if len(items) == cfg.batch_size:
                delta = dict(counter)
                counter.clear()
                yield self._collate(items), delta
                items = []
        last = self._collate(items) if items and not cfg.drop_last else None
        yield last, dict(counter)


class _WorkerDataset(torch.utils.data.IterableDataset):
    """IterableDataset used when ``num_workers > 0``: worker w owns every nw-th owned sample."""

    def __init__(self, urls, cfg: LoaderConfig, epoch: int):
        super().__init__()
        self.urls, self.cfg, self.epoch = urls, cfg, epoch

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        wid, nw = (info.id, info.num_workers) if info is not None else (0, 1)
        torch.set_num_threads(1)
        for batch, delta in _EpochStream(self.urls, self.cfg, self.epoch, wid, nw):
            yield {"batch": batch, "skipped": delta}


class WebDatasetLoader(ShardLoaderBase):
    """Iterable over batches ``{"image", "text", "text_lengths", "key", "meta"}`` (see
    :func:`build_loader`).

    Attributes: see :class:`~msclip_fast.data.loader_base.ShardLoaderBase`.
    """

    def __len__(self) -> int:
        """Batches per epoch on this rank: an upper bound from the manifest (skips lower it)."""
        cfg = self.cfg
        per_rank = self._samples_per_rank()
        nw = max(1, cfg.num_workers)
        # Workers batch separately: count each worker's share.
        return sum(num_batches(len(range(w, per_rank, nw)), cfg.batch_size, cfg.drop_last) for w in range(nw))

    def __iter__(self) -> Iterator[Dict[str, Any]]:
        epoch = self.epoch
        before = sum(self._skipped.values())
        if self.cfg.num_workers == 0:
            for batch, delta in _EpochStream(self.urls, self.cfg, epoch):
                self._skipped.update(delta)
                if batch is not None:
                    yield batch
        else:
            # Batches come back round-robin from the workers (DataLoader keeps that order), so
            # the sequence is deterministic for a fixed num_workers.
            dl = torch.utils.data.DataLoader(
                _WorkerDataset(self.urls, self.cfg, epoch), batch_size=None,
                num_workers=self.cfg.num_workers, persistent_workers=False,
            )
            for item in dl:
                self._skipped.update(item["skipped"])
                if item["batch"] is not None:
                    yield item["batch"]
        n_skipped = sum(self._skipped.values()) - before
        if n_skipped:
            logger.info("epoch %d rank %d: skipped %d samples; cumulative %s", epoch, self.cfg.rank, n_skipped, self.skipped)


def build_loader(
    urls,
    batch_size: int,
    *,
    train: bool,
    image_size: int = 224,
    mean: Sequence[float] = CLIP_MEAN,
    std: Sequence[float] = CLIP_STD,
    rank: int = 0,
    world_size: int = 1,
    seed: int = 0,
    epoch: int = 0,
    backend: str = "torch",
    num_workers: int = 0,
    drop_last: Optional[bool] = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    shuffle_buffer: int = 2000,
    context_length: int = 77,
):
    """Build an image-text loader over WebDataset shards.

    Args:
        urls: shard spec for :func:`resolve_urls` (dir, brace, glob, ``::`` list) or a list.
        batch_size: samples per batch (per rank).
        train: shuffle shards + samples and apply RandomResizedCrop; eval keeps shard order and
            uses resize + center crop.
        image_size: output side S. mean, std: normalisation (the model's constants).
        rank, world_size: this process's slot; sample i of the epoch stream goes to rank
            ``i % world_size`` (exactly once across ranks).
        seed, epoch: determine order and augmentation (``set_epoch`` changes the epoch).
        backend: ``"torch"`` (webdataset + PIL) or ``"dali"`` (NVIDIA DALI pipeline).
        num_workers: DataLoader worker processes (0: decode in this process). The order is
            deterministic for a given num_workers, but differs between worker counts.
        drop_last: drop the last partial batch (default: ``train``).
        max_pixels: images with more pixels (from the header) are skipped as ``oversized``.
        shuffle_buffer: train-time sample shuffle buffer size (0/1 disables).
        context_length: tokenizer context (77).
    Returns:
        an iterable with ``.set_epoch(e)``, ``.skipped`` and ``len()`` (when a manifest is
        found). Batches: ``{"image": (B,3,S,S) float32, "text": (B,context_length) int64 CPU,
        "text_lengths": (B,) int64 CPU, "key": list[str], "meta": list[dict]}``;
        ``text_lengths[i]`` is caption i's length up to and including its end-of-text token
        (:func:`msclip_fast.modules.text_lengths` of the CPU tokens, ``eot + 1``): hand it to
        the model as ``model(images, tokens, text_lengths=...)`` and keep it on the CPU, so
        the model can trim captions without a device-to-host sync. With ``backend="dali"``,
        ``image`` may be on the GPU; ``text`` and ``text_lengths`` are always on the CPU.
    Raises:
        ValueError: a bad argument (naming it) or a shard pattern that matches nothing.
    """
    if backend not in ("torch", "dali"):
        raise ValueError(f"backend must be 'torch' or 'dali', got {backend!r}")
    if not isinstance(train, bool):
        raise ValueError(f"train must be a bool, got {train!r}")
    cfg = LoaderConfig(
        batch_size=batch_size, train=train, image_size=image_size, mean=tuple(mean), std=tuple(std),
        rank=rank, world_size=world_size, seed=seed, epoch=epoch, num_workers=num_workers,
        drop_last=drop_last, max_pixels=max_pixels, shuffle_buffer=shuffle_buffer,
        context_length=context_length,
    )
    resolved = resolve_urls(urls)
    if backend == "dali":
        from .dali import DaliLoader

        return DaliLoader(resolved, cfg)
    return WebDatasetLoader(resolved, cfg)
