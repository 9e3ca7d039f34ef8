"""Bookkeeping shared by both loader backends: epoch, cumulative skip counts, and the
batches-per-epoch count from make_shards manifests."""
from __future__ import annotations

import collections
import json
import math
import os
from typing import TYPE_CHECKING, Dict, Optional, Sequence

if TYPE_CHECKING:  # loader.py imports this module
    from .loader import LoaderConfig


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
        num_samples: samples of all shards per the manifest, or None when unknown.
        epoch: the epoch the next ``iter()`` runs (``set_epoch`` changes it).
    """

    def __init__(self, urls: Sequence[str], cfg: "LoaderConfig"):
        self.urls = list(urls)
        self.cfg = cfg
        self.epoch = cfg.epoch
        self._skipped: collections.Counter = collections.Counter()
        self.num_samples = _find_manifest_counts(self.urls)

    @property
    def skipped(self) -> Dict[str, int]:
        return dict(self._skipped)

    def set_epoch(self, epoch: int) -> None:
        """Raises ValueError unless ``epoch`` is an int >= 0."""
        if not isinstance(epoch, int) or isinstance(epoch, bool) or epoch < 0:
            raise ValueError(f"epoch must be an int >= 0, got {epoch!r}")
        self.epoch = epoch

    def _samples_per_rank(self) -> int:
        """Samples this rank owns per epoch, per the manifest (skips lower the real count).

        Raises:
            TypeError: no make_shards manifest lists these shards (so ``len()`` is unknown).
        """
        if self.num_samples is None:
            raise TypeError("length unknown: no make_shards manifest.json lists these shards")
        return len(range(self.cfg.rank, self.num_samples, self.cfg.world_size))

    def __len__(self) -> int:
        """Batches per epoch on this rank: an upper bound from the manifest (skips lower it)."""
        return num_batches(self._samples_per_rank(), self.cfg.batch_size, self.cfg.drop_last)
