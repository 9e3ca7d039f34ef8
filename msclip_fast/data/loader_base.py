"""Bookkeeping shared by both loader backends: epoch and resume position, cumulative skip
counts, the shard indices (:mod:`msclip_fast.data.plan`) and the batches-per-epoch count (exact
from the indices, else an upper bound from make_shards manifests)."""
from __future__ import annotations

import collections
import json
import math
import os
import logging
from typing import TYPE_CHECKING, Dict, List, Optional, Sequence

from .plan import load_indices, samples_per_rank

if TYPE_CHECKING:  # loader.py imports this module
    from .index import ShardIndex
    from .loader import LoaderConfig

logger = logging.getLogger(__name__)


def _find_manifest_counts(urls: Sequence[str]) -> Optional[int]:
    """Total samples of ``urls`` from make_shards manifests, or None when any is unknown.

    make_shards writes ``OUT/manifest.json`` whose ``"shards"`` maps ``"train/000000.tar"`` to
    its sample count; a shard's manifest is looked up in its directory and the parent.
    """
    cache: Dict[str, Optional[dict]] = {}
    total = 0
    for u in urls:
        if "://" in u or u.startswith("pipe:"):
            return None
        p = os.path.abspath(u)
        found = None
        for root in (os.path.dirname(p), os.path.dirname(os.path.dirname(p))):
            if root not in cache:
                mp = os.path.join(root, "manifest.json")
                try:
                    with open(mp) as f:
                        cache[root] = json.load(f).get("shards") or {}
                except (OSError, ValueError):
                    cache[root] = None
            shards = cache[root]
            if shards:
                rel = os.path.relpath(p, root)
                if rel in shards:
                    found = int(shards[rel])
                    break
        if found is None:
            return None
        total += found
    return total


def num_batches(samples: int, batch_size: int, drop_last: bool) -> int:
    """Batches that ``samples`` samples make: full ones only when ``drop_last``."""
    return samples // batch_size if drop_last else math.ceil(samples / batch_size)


class ShardLoaderBase:
    """Common state of the loaders over WebDataset shards (see :func:`build_loader`).

    Attributes:
        skipped: ``dict`` reason -> count, cumulative over all epochs iterated so far.
        indices: the shards' validated indices (list of
            :class:`~msclip_fast.data.index.ShardIndex`), or None when a shard has none.
        num_samples: samples of all shards: the good ones per the indices, else all per the
            manifest, else None (unknown).
        epoch: the epoch the next ``iter()`` runs (``set_epoch`` changes it).
        start_batch: the batch of that epoch the next ``iter()`` starts at (resume).
    """

    def __init__(self, urls: Sequence[str], cfg: "LoaderConfig", require_index: bool = False):
        """Raises:
            IndexMissingError: ``require_index`` and a shard has no index (names the command).
            ValueError: a stale or corrupt index.
        """
        self.urls = list(urls)
        self.cfg = cfg
        self.epoch = cfg.epoch
        self.start_batch = 0
        self._skipped: collections.Counter = collections.Counter()
        self.indices: Optional[List["ShardIndex"]]
        self.indices, why = load_indices(self.urls, cfg.max_pixels)
        if self.indices is None:
            if require_index:
                from .index import IndexMissingError

                raise IndexMissingError(why)
            logger.info("no validated index for every shard (%s): reading the shards as a stream", why)
            self.num_samples = _find_manifest_counts(self.urls)
        else:
            self.num_samples = sum(len(s) for ix in self.indices for _, _, s in ix.sources())

    @property
    def skipped(self) -> Dict[str, int]:
        return dict(self._skipped)

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Set the next ``iter()``'s epoch, starting at its batch ``start_batch`` (a resume
        position; with an index no batch before it is read).

        Raises ValueError unless both are ints >= 0.
        """
        for name, v in (("epoch", epoch), ("start_batch", start_batch)):
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise ValueError(f"{name} must be an int >= 0, got {v!r}")
        self.epoch = epoch
        self.start_batch = start_batch

    def _samples_per_rank(self) -> int:
        """Samples this rank owns per epoch, per the manifest (skips lower the real count).

        Raises:
            TypeError: no make_shards manifest lists these shards (so ``len()`` is unknown).
        """
        if self.indices is not None:
            return samples_per_rank(self.indices, self.cfg)
        if self.num_samples is None:
            raise TypeError("length unknown: no make_shards manifest.json lists these shards")
        return len(range(self.cfg.rank, self.num_samples, self.cfg.world_size))

    def __len__(self) -> int:
        """Batches per epoch on this rank: exact with an index, else an upper bound from the
        manifest (skips lower it)."""
        return num_batches(self._samples_per_rank(), self.cfg.batch_size, self.cfg.drop_last)
