"""Leak-free deterministic train/val split over duplicate groups.

Samples are joined into groups (union-find) when they share any grouping key — identical image
bytes / symlink target (``"img:<sha1>"``) or identical caption (``"cap:<text>"``) — so neither
an image nor a caption appears on both sides of the split.  Groups are ordered by a hash of
``(seed, group id)`` (group id = its smallest sample key) and taken into val in that order until
the val target is reached ("first fit"); a group larger than ``max_val_group`` of the target
stays in train so that one giant group (1,375 identical openclipart star captions) can neither
swallow nor dominate the validation set.
"""
from __future__ import annotations

import hashlib
from typing import Dict, Hashable, List, Sequence, Tuple


class UnionFind:
    """Union-find over ints 0..n-1 with path halving and union by size."""

    def __init__(self, n: int):
        self.parent = list(range(n))
        self.size = [1] * n

    def find(self, i: int) -> int:
        p = self.parent
        while p[i] != i:
            p[i] = p[p[i]]
            i = p[i]
        return i

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return
        if self.size[ra] < self.size[rb]:
            ra, rb = rb, ra
        self.parent[rb] = ra
        self.size[ra] += self.size[rb]


def duplicate_groups(keys_per_sample: Sequence[Sequence[Hashable]]) -> List[int]:
    """Group id (root index) per sample: samples sharing any key are in one group."""
    uf = UnionFind(len(keys_per_sample))
    first: Dict[Hashable, int] = {}
    for i, keys in enumerate(keys_per_sample):
        for k in keys:
            j = first.setdefault(k, i)
            if j != i:
                uf.union(i, j)
    return [uf.find(i) for i in range(len(keys_per_sample))]


def split_groups(
    sample_ids: Sequence[str],
    groups: Sequence[int],
    val_fraction: float,
    seed: int = 0,
    max_val_group: float = 0.05,
) -> Tuple[List[str], Dict[str, int]]:
    """Assign each sample to ``"train"`` or ``"val"`` by group.

    Args:
        sample_ids: stable unique id per sample (sorted order is irrelevant).
        groups: group label per sample (from :func:`duplicate_groups`).
        val_fraction: target share of samples in val, in [0, 1).
        seed: changes which groups land in val.
        max_val_group: groups larger than this fraction of the val target stay in train.
    Returns:
        (split name per sample, stats dict).
    Raises:
        ValueError: val_fraction outside [0, 1).
    """
    if not (0.0 <= val_fraction < 1.0):
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction!r}")
    members: Dict[int, List[int]] = {}
    for i, g in enumerate(groups):
        members.setdefault(g, []).append(i)
    target = int(round(val_fraction * len(sample_ids)))
    cap = max(1, int(max_val_group * target))

    def order(g: int) -> bytes:
        gid = min(sample_ids[i] for i in members[g])
        return hashlib.sha1(f"{seed}:{gid}".encode()).digest()

    split = ["train"] * len(sample_ids)
    n_val = 0
    for g in sorted(members, key=order):
        if n_val >= target:
            break
        size = len(members[g])
        if size > cap or n_val + size > target:
            continue
        for i in members[g]:
            split[i] = "val"
        n_val += size
    sizes = sorted((len(m) for m in members.values()), reverse=True)
    stats = {
        "groups": len(members),
        "groups_with_duplicates": sum(1 for s in sizes if s > 1),
        "samples_in_duplicate_groups": sum(s for s in sizes if s > 1),
        "largest_groups": sizes[:5],
        "val_target": target,
        "max_val_group": cap,
    }
    return split, stats
