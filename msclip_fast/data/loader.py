"""WebDataset loader (torch backend) and the ``build_loader`` entry point.

Data flow for one epoch (every rank runs the same steps on the same byte stream)::

    shard list --(train: shuffled by (seed, epoch))--> webdataset tar reader (raw bytes)
      --(train: deterministic shuffle buffer)--> sample i owned by rank i % world_size
      (and by worker (i // world_size) % num_workers) --> decode + transform --> batch

Ownership is decided on the raw stream index, before anything is decoded, so each sample is
seen exactly once per epoch across ranks even with a single shard, and a skipped sample is
skipped (and counted) by exactly one rank.  The price is that every rank reads every shard's
bytes (not decodes them): cheap for the small datasets this engine trains on, and exact.

With a validated index beside every shard (:mod:`msclip_fast.data.index`, written by
make_shards or ``python -m msclip_fast.data.index DIR``) the epoch follows the index's plan
instead (:mod:`msclip_fast.data.plan`: a shuffle of sample blocks across shards, exactly
equal per-rank counts in train, resume without reading skipped batches): only the planned members are read, by offset, and bad
samples never reach the decoder; the DALI backend follows the same plan.  Workers then own
whole batches (batch ``b`` goes to worker ``b % num_workers``), so the batch sequence does not
depend on ``num_workers``.

Skipped samples are never fatal; ``loader.skipped`` counts them per reason (cumulative over
epochs): ``missing_image``, ``empty_image``, ``decode_error``, ``oversized``,
``missing_caption``, ``empty_caption``, ``shard_error`` (an unreadable tar member / shard).
With an index the counts come from it, once per epoch, on rank 0 (the samples are left out of
the plan before ownership is decided).
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
from .plan import PlannedSample, rank_plan, skip_counts
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
    """Raw webdataset sample dict -> (image tensor, caption, key, meta) or SkipSample.

    Raises:
        SkipSample: a bad sample (counted by the caller).
        RuntimeError: anything else raised while converting/transforming the image, with the
            sample key and shard URL in the message and the original exception chained: an
            error from deep inside PIL or torch otherwise names no sample.
    """

    def __init__(self, cfg: LoaderConfig):
        self.cfg = cfg

    def __call__(self, sample: Dict[str, Any], epoch: int):
        c = check_sample(sample, self.cfg.max_pixels)
        try:
            im = to_rgb_on_white(c.image)
            if self.cfg.train:
                rng = random.Random(_seed_int(self.cfg.seed, epoch, c.key))
                x = train_transform(im, self.cfg.transform, rng)
            else:
                x = eval_transform(im, self.cfg.transform)
        except SkipSample:
            raise
        except Exception as e:
            w, h = c.image.size
            kind = "train" if self.cfg.train else "eval"
            raise RuntimeError(f"{kind} transform failed on sample {c.key!r} ({w}x{h} {c.image.mode}) of shard "
                               f"{sample.get('__url__')!r}: {type(e).__name__}: {e}") from e
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


class _PlanStream(_EpochStream):
    """Batches of a rank's epoch plan (:func:`~msclip_fast.data.plan.rank_plan`); worker
    ``w`` of ``nw`` decodes the batches ``b`` with ``b % nw == w``.  Members are read by their
    indexed offsets, so nothing outside the plan is read."""

    def __init__(self, plan: Sequence[PlannedSample], cfg: LoaderConfig, epoch: int, worker: int = 0,
                 num_workers: int = 1):
        super().__init__([], cfg, epoch, worker, num_workers)
        self.plan = plan

    def __iter__(self):
        cfg, files = self.cfg, {}
        counter: collections.Counter = collections.Counter()
        try:
            for b, start in enumerate(range(0, len(self.plan), cfg.batch_size)):
                chunk = self.plan[start: start + cfg.batch_size]
                if b % self.num_workers != self.worker or (cfg.drop_last and len(chunk) < cfg.batch_size):
                    continue
                items = []
                for p in chunk:
                    f = files.get(p.tar)
                    if f is None:
                        f = files[p.tar] = open(p.tar, "rb")
                    sample: Dict[str, Any] = {"__key__": p.key, "__url__": p.tar}
                    for ext, offset, size, _name in p.sample.members:
                        f.seek(offset)
                        sample[ext] = f.read(size)
                    try:
                        items.append(self.decode(sample, self.epoch))
                    except SkipSample as e:  # the index validated it: the shard changed since
                        count_skip(counter, e, sample)
                delta = dict(counter)
                counter.clear()
                yield (self._collate(items) if items else None), delta
        finally:
            for f in files.values():
                f.close()


class _WorkerDataset(torch.utils.data.IterableDataset):
    """IterableDataset used when ``num_workers > 0``: worker w owns every nw-th owned sample
    (stream) or every nw-th batch (plan)."""

    def __init__(self, urls, cfg: LoaderConfig, epoch: int, plan: Optional[Sequence[PlannedSample]] = None):
        super().__init__()
        self.urls, self.cfg, self.epoch, self.plan = urls, cfg, epoch, plan

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        wid, nw = (info.id, info.num_workers) if info is not None else (0, 1)
        torch.set_num_threads(1)
        stream = (_EpochStream(self.urls, self.cfg, self.epoch, wid, nw) if self.plan is None
                  else _PlanStream(self.plan, self.cfg, self.epoch, wid, nw))
        for batch, delta in stream:
            yield {"batch": batch, "skipped": delta}


class WebDatasetLoader(ShardLoaderBase):
    """Iterable over batches ``{"image", "text", "text_lengths", "key", "meta"}`` (see
    :func:`build_loader`).

    Attributes: see :class:`~msclip_fast.data.loader_base.ShardLoaderBase`.
    """

    def __len__(self) -> int:
        """Batches per epoch on this rank: exact with an index, else an upper bound from the
        manifest (skips lower it)."""
        cfg = self.cfg
        per_rank = self._samples_per_rank()
        if self.indices is not None:
            return num_batches(per_rank, cfg.batch_size, cfg.drop_last)
        nw = max(1, cfg.num_workers)
        # Workers batch separately: count each worker's share.
        return sum(num_batches(len(range(w, per_rank, nw)), cfg.batch_size, cfg.drop_last) for w in range(nw))

    def _streams(self):
        """(in-process stream, plan or None, batches to drop first) for the next epoch."""
        epoch, start = self.epoch, self.start_batch
        self.start_batch = 0  # a resume position holds for one iter()
        if self.indices is None:
            return _EpochStream(self.urls, self.cfg, epoch), None, start
        if self.cfg.rank == 0:
            self._skipped.update(skip_counts(self.indices))
        plan = rank_plan(self.indices, self.cfg, epoch, start)
        return _PlanStream(plan, self.cfg, epoch), plan, 0

    def __iter__(self) -> Iterator[Dict[str, Any]]:
        epoch = self.epoch
        before = sum(self._skipped.values())
        stream, plan, drop = self._streams()
        if self.cfg.num_workers == 0:
            for batch, delta in stream:
                self._skipped.update(delta)
                if batch is not None:
                    if drop:  # no index: a resume position is reached by reading up to it
                        drop -= 1
                        continue
                    yield batch
        else:
            # Batches come back round-robin from the workers (DataLoader keeps that order), so
            # the sequence is deterministic for a fixed num_workers.
            dl = torch.utils.data.DataLoader(
                _WorkerDataset(self.urls, self.cfg, epoch, plan), batch_size=None,
                num_workers=self.cfg.num_workers, persistent_workers=False,
            )
            for item in dl:
                self._skipped.update(item["skipped"])
                if item["batch"] is not None:
                    if drop:
                        drop -= 1
                        continue
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
        backend: ``"torch"`` (webdataset + PIL) or ``"dali"`` (NVIDIA DALI pipeline; needs
            the index of every shard, see :mod:`msclip_fast.data.index`).
        num_workers: DataLoader worker processes (0: decode in this process); with
            ``backend="dali"``, DALI's decoding threads (0: one per core). Without an index the
            order is deterministic for a given num_workers, but differs between worker counts;
            with one it does not depend on them.
        drop_last: drop the last partial batch (default: ``train``).
        max_pixels: images with more pixels (from the header) are skipped as ``oversized``.
        shuffle_buffer: train-time sample shuffle buffer size (0/1 disables) of the stream
            path; with an index the plan's block shuffle across shards replaces it.
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
        ValueError: a bad argument (naming it), a shard pattern that matches nothing, a stale
            index, or (``backend="dali"``) a shard without an index
            (:class:`~msclip_fast.data.index.IndexMissingError`, naming the command to run).
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
