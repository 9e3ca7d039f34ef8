"""Shard URL specs: a directory, a brace pattern, a glob, or a ``::``-joined list of these."""
from __future__ import annotations

import glob
import os
import re
from typing import Iterable, List, Union

_BRACE = re.compile(r"\{([^{}]*)\}")
# msclip_fast.data.index writes NAME.fallback.tar beside a shard (its samples normalised for
# DALI): part of that shard's index, never a shard of its own
FALLBACK_SUFFIX = ".fallback.tar"


def expand_braces(pattern: str) -> List[str]:
    """Expand ``{000000..000009}`` ranges (zero padding kept) and ``{a,b,c}`` alternatives.

    Raises:
        ValueError: a malformed range such as ``{3..1}`` or ``{a..z}``.
    """
    m = _BRACE.search(pattern)
    if m is None:
        return [pattern]
    body = m.group(1)
    head, tail = pattern[: m.start()], pattern[m.end():]
    rng = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    if rng:
        lo_s, hi_s = rng.groups()
        lo, hi = int(lo_s), int(hi_s)
        if hi < lo:
            raise ValueError(f"brace range {{{body}}} in {pattern!r} is empty (end < start)")
        width = len(lo_s) if lo_s.startswith("0") or len(lo_s) == len(hi_s) else 0
        items = [str(i).zfill(width) for i in range(lo, hi + 1)]
    elif ".." in body and "," not in body:
        raise ValueError(f"brace range {{{body}}} in {pattern!r} must be integers like {{000..009}}")
    else:
        items = body.split(",")
    out: List[str] = []
    for it in items:
        out.extend(expand_braces(head + it + tail))
    return out


def _resolve_one(spec: str) -> List[str]:
    spec = os.path.expanduser(spec.strip())
    if not spec:
        return []
    if os.path.isdir(spec):
        found = sorted(p for p in glob.glob(os.path.join(glob.escape(spec), "*.tar"))
                       if not p.endswith(FALLBACK_SUFFIX))
        if not found:
            raise ValueError(f"shard directory {spec!r} holds no .tar files")
        return found
    out: List[str] = []
    for pat in expand_braces(spec):
        if any(c in pat for c in "*?["):
            out.extend(sorted(p for p in glob.glob(pat) if not p.endswith(FALLBACK_SUFFIX)))
        elif os.path.exists(pat):
            out.append(pat)
        elif "://" in pat or pat.startswith("pipe:"):
            out.append(pat)  # remote / pipe URL: webdataset opens it, we cannot check here
    if not out:
        raise ValueError(f"shard pattern {spec!r} matches no files")
    return out


def resolve_urls(spec: Union[str, os.PathLike, Iterable]) -> List[str]:
    """Turn a shard spec into a list of shard paths/URLs (order kept, duplicates removed).

    Args:
        spec: a directory (all its ``*.tar``, sorted; an index's ``*.fallback.tar`` are not
            shards and are left out, as by globs), a brace pattern
            (``data/train/{000000..000003}.tar``), a glob (``data/*/0*.tar``), a ``::``-joined
            list of those, or a list/tuple of those.
    Returns:
        list of paths (``str``); remote ``http(s)://``, ``s3://``, ``pipe:`` URLs pass through.
    Raises:
        ValueError: naming the first pattern that matches nothing, or an empty spec.
    """
    if isinstance(spec, (str, os.PathLike)):
        parts = str(os.fspath(spec)).split("::")
    else:
        parts = []
        for s in spec:
            parts.extend(str(os.fspath(s)).split("::"))
    parts = [p for p in parts if p.strip()]
    if not parts:
        raise ValueError(f"shard spec {spec!r} is empty")
    seen, out = set(), []
    for p in parts:
        for u in _resolve_one(p):
            if u not in seen:
                seen.add(u)
                out.append(u)
    return out
