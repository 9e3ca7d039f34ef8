"""The epoch plan: which indexed sample each rank reads, in which order, from the shard indices.

When every shard has its validated index (:mod:`msclip_fast.data.index`), both loader backends
follow one plan computed from the indices alone, before any byte of image data is read:

* *sources*: each shard's good samples, then (as a source of its own) the shard's fallback tar
  of samples normalised once at index time; bad samples are not in any source;
* *order*: eval keeps the sources and their samples in shard order; train shuffles the samples
  inside each source by ``(seed, epoch, source position)``, cuts every source into blocks of
  :func:`block_size` samples and shuffles all blocks together by ``(seed, epoch)``: a batch
  draws from many shards (a shard shuffle alone would fill whole runs of batches from one
  shard, and shards written in sorted order then hold one or two classes each), while DALI
  still reads each block as one contiguous run (one small index file per block, not per
  sample);
* *ownership*: sample ``i`` of the epoch order belongs to rank ``i % world_size``; in train the
  order is first cut to a multiple of ``world_size``, so every rank owns the same number of
  samples and takes the same number of steps (each epoch drops fewer than ``world_size``
  samples, different ones every epoch); eval keeps every sample, exactly once across ranks;
* *resume*: a rank's plan can start at any batch (``start_batch``) without reading the batches
  before it.

The torch backend reads the planned members by offset from the tars and decodes them with
Pillow; the DALI backend hands the same plan to ``fn.readers.webdataset`` as per-epoch index
files (one per contiguous run of a source), so both yield the same keys and captions in the
same order.
"""
from __future__ import annotations

import collections
import os
import random
from dataclasses import dataclass
from typing import TYPE_CHECKING, Dict, List, Optional, Sequence, Tuple

from .samples import _seed_int

if TYPE_CHECKING:
    from .index import IndexedSample, ShardIndex
    from .loader import LoaderConfig


@dataclass(frozen=True)
class PlannedSample:
    """One sample of a rank's epoch plan: the tar holding it and its indexed members."""

    tar: str
    sample: "IndexedSample"

    @property
    def key(self) -> str:
        return self.sample.key


def load_indices(urls: Sequence[str], max_pixels: int) -> Tuple[Optional[List["ShardIndex"]], str]:
    """The indices of all ``urls``, or ``(None, why)`` when any shard has none.

    Raises:
        ValueError: an index exists but is stale, corrupt or built with another ``max_pixels``
            (the message names the file and the command that rebuilds it).
    """
    from .index import IndexMissingError, load_shard_index

    out = []
    for u in urls:
        if "://" in u or u.startswith("pipe:") or not os.path.isfile(u):
            return None, f"{u} is not a local file"
        try:
            out.append(load_shard_index(u, max_pixels=max_pixels))
        except IndexMissingError as e:
            return None, str(e)
    return out, ""


def skip_counts(indices: Sequence["ShardIndex"]) -> Dict[str, int]:
    """Samples left out of the plan, by reason, summed over the shards' indices."""
    c: collections.Counter = collections.Counter()
    for ix in indices:
        c.update(s["reason"] for s in ix.skipped)
    return dict(c)


MIN_BLOCK, MAX_BLOCKS = 8, 4096


def block_size(n_samples: int) -> int:
    """Samples per shuffled block: 8, or more once there would be over 4096 blocks (so an
    epoch's DALI plan stays at a few thousand index files whatever the dataset's size)."""
    return max(MIN_BLOCK, -(-n_samples // MAX_BLOCKS))


def epoch_order(indices: Sequence["ShardIndex"], cfg: "LoaderConfig", epoch: int) -> List[PlannedSample]:
    """All ranks' samples of ``epoch`` in plan order (see the module docstring)."""
    sources = [(tar, list(samples)) for ix in indices for tar, _, samples in ix.sources()]
    if not cfg.train:
        return [PlannedSample(tar, s) for tar, samples in sources for s in samples]
    b = block_size(sum(len(samples) for _, samples in sources))
    blocks = []
    for j, (tar, samples) in enumerate(sources):
        random.Random(_seed_int("samples", cfg.seed, epoch, j)).shuffle(samples)
        blocks += [[PlannedSample(tar, s) for s in samples[k:k + b]] for k in range(0, len(samples), b)]
    random.Random(_seed_int("blocks", cfg.seed, epoch)).shuffle(blocks)
    order = [p for blk in blocks for p in blk]
    del order[len(order) - len(order) % cfg.world_size:]
    return order


def rank_plan(indices: Sequence["ShardIndex"], cfg: "LoaderConfig", epoch: int,
              start_batch: int = 0) -> List[PlannedSample]:
    """This rank's (``cfg.rank``) samples of ``epoch`` in order, from batch ``start_batch`` on."""
    mine = epoch_order(indices, cfg, epoch)[cfg.rank::cfg.world_size]
    return mine[start_batch * cfg.batch_size:]


def runs(plan: Sequence[PlannedSample]) -> List[Tuple[str, List["IndexedSample"]]]:
    """``plan`` as contiguous runs of one tar: ``[(tar, [samples...]), ...]``."""
    out: List[Tuple[str, List]] = []
    for p in plan:
        if out and out[-1][0] == p.tar:
            out[-1][1].append(p.sample)
        else:
            out.append((p.tar, [p.sample]))
    return out


def samples_per_rank(indices: Sequence["ShardIndex"], cfg: "LoaderConfig") -> int:
    """Samples ``cfg.rank`` owns per epoch (exact: bad samples are already left out)."""
    n = sum(len(samples) for ix in indices for _, _, samples in ix.sources())
    if cfg.train:
        n -= n % cfg.world_size
    return len(range(cfg.rank, n, cfg.world_size))
