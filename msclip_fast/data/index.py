"""A validated per-shard index for the DALI reader, built once per shard.

    python -m msclip_fast.data.index DIR [DIR...] [--workers N] [--max-pixels N] [--force] [--no-progress]

Why: DALI's ``fn.readers.webdataset`` has no "skip bad sample" option (one corrupt or empty
image kills the pipeline) and its decoder mishandles some images that PIL decodes fine (alpha is
dropped instead of composited on white, palette/CMYK/16-bit/WebP/BMP/TIFF vary by decoder).
Instead of validating every sample in Python each epoch, each shard is validated once here with
exactly the torch loader's check (:func:`msclip_fast.data.samples.check_sample`) and the result
is written as index files that DALI reads.  DALI's reader reads exactly the samples listed in an
index, in the listed order (verified with DALI 2.4), so an index that leaves a sample out makes
DALI skip it.

Layout, beside each shard ``D/NAME.tar`` (every file written to a temp name, then
``os.replace``'d; ``NAME.idx.json`` last):

* ``D/NAME.idx``: DALI ``v1.2`` index (the format ``wds2idx`` writes): first line ``v1.2 N``,
  then one line per good, DALI-safe sample in shard order:
  ``ext offset size membername [ext offset size membername [...]]`` where ``offset`` is the byte
  offset of the member's *data* in the tar and ``size`` its length in bytes.  Each line holds the
  chosen image member (first of :data:`~msclip_fast.data.samples.IMAGE_EXTS` present), the chosen
  caption member (first of :data:`~msclip_fast.data.samples.TEXT_EXTS`) and ``json`` when
  present (2 or 3 members).  ``ext`` is lower case (as webdataset sees it); in ``membername``
  whitespace and ``%`` are percent-encoded (the format is space-separated; DALI uses the name only
  in messages).
* ``D/NAME.fallback.tar`` + ``D/NAME.fallback.idx``, only when the shard has samples that decode
  fine but that DALI would mishandle; first matching reason: ``alpha`` (alpha channel or
  transparency key), ``palette`` (mode P), ``cmyk``, ``16bit`` (modes I;16*, I, F, or a 16-bit
  PNG that PIL reads as 8-bit RGB/L), ``mode`` (any other mode but RGB/L), ``format`` (image
  extension not jpg/jpeg/png).  Each is normalised once, ``to_rgb_on_white`` saved as ``KEY.png``
  with the caption bytes as ``KEY.txt`` and the json bytes as ``KEY.json`` (if any), in shard
  order, written with ``TarWriter(mtime=0.0)`` (byte-reproducible); the idx lists them.
* ``D/NAME.idx.json``: ``{"version", "shard", "shard_bytes", "max_pixels", "members",
  "samples", "good", "fallback": [{"key", "reason"}], "skipped": [{"key", "reason", "detail"}],
  "sizes": [[width, height]] (one per NAME.idx line), "fallback_sizes" (one per fallback line),
  "counts": {"good", "fallback", "skipped": {reason: n}}, "trusted"}``.  ``shard_bytes`` (the
  tar's size) detects a shard rewritten after indexing.

Samples are grouped exactly as webdataset groups them (key = member name up to the first dot
after the last slash; consecutive members with the same key form one sample; non-regular members
and ``__*__`` names are ignored; a repeated extension within a sample keeps the first).  A file
that cannot be read as a tar is refused with :class:`IndexBuildError` and gets no index.
"""
from __future__ import annotations

import io
import json
import logging
import multiprocessing as mp
import os
import re
import sys
import tarfile
import time
import urllib.parse
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

from PIL import Image

from .images import DEFAULT_MAX_PIXELS, SkipSample, has_alpha, to_rgb_on_white
from .samples import IMAGE_EXTS, TEXT_EXTS, check_sample

logger = logging.getLogger(__name__)

INDEX_VERSION = 1
DALI_INDEX_VERSION = "v1.2"
DALI_SAFE_EXTS = ("jpg", "jpeg", "png")
FALLBACK_REASONS = ("alpha", "palette", "cmyk", "16bit", "mode", "format")
REBUILD_HINT = "rebuild with `python -m msclip_fast.data.index DIR --force`"
BUILD_HINT = "run `python -m msclip_fast.data.index DIR`"

# webdataset's own key/extension split (webdataset.tariterators.base_plus_ext).
_BASE_PLUS_EXT = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")
# webdataset's tar_file_iterator skips these metadata members.
_META = re.compile(r"__[^/]*__($|/)")
_NAME_UNSAFE = re.compile(r"[\s%]")


class IndexBuildError(ValueError):
    """A shard could not be indexed (not a tar, truncated, unreadable); names the shard."""


class IndexMissingError(ValueError):
    """A shard has no index yet; the message names the missing files and the command to build it."""


@dataclass(frozen=True)
class IndexedSample:
    """One sample of an index line. ``members``: ``((ext, offset, size, membername), ...)`` in
    line order (image, caption, optional json); ``offset``/``size`` in bytes of the member data.
    ``size``: the image's ``(width, height)`` in pixels (from ``NAME.idx.json``), so a loader can
    draw crop windows without opening the image."""

    key: str
    members: tuple
    size: Optional[Tuple[int, int]] = None  # (width, height) of the image in pixels


@dataclass
class ShardIndex:
    """A loaded, checked index (see :func:`load_shard_index`). Paths are absolute."""

    shard: str
    samples: list
    fallback_shard: Optional[str]
    fallback_samples: list
    fallback: list
    skipped: list
    max_pixels: int
    idx_path: str
    fallback_idx_path: Optional[str]
    trusted: bool = False
    meta: Dict[str, Any] = field(default_factory=dict, repr=False)

    def sources(self) -> list:
        """``[(tar_path, idx_path, samples)]``: the main shard, then the fallback tar if any.

        A source with no samples is left out (DALI's reader refuses an empty index), so the list
        is empty for a shard without usable samples."""
        out = []
        if self.samples:
            out.append((self.shard, self.idx_path, self.samples))
        if self.fallback_shard is not None and self.fallback_samples:
            out.append((self.fallback_shard, self.fallback_idx_path, self.fallback_samples))
        return out


def index_files(shard: str) -> Dict[str, str]:
    """Index file paths of ``shard`` (``NAME.tar`` -> ``NAME.idx`` ...; only a final ``.tar`` is
    stripped): ``{"idx", "json", "fallback_tar", "fallback_idx"}``."""
    shard = os.fspath(shard)
    base = shard[:-4] if shard.endswith(".tar") else shard
    return {"idx": base + ".idx", "json": base + ".idx.json",
            "fallback_tar": base + ".fallback.tar", "fallback_idx": base + ".fallback.idx"}


# ----------------------------------------------------------------------------- reading the tar


def _split_name(name: str) -> Tuple[Optional[str], Optional[str]]:
    m = _BASE_PLUS_EXT.match(name)
    if not m:
        return None, None
    return m.group(1), m.group(2)


@dataclass
class _RawSample:
    key: str
    members: Dict[str, tarfile.TarInfo]  # lower-case ext -> member (first of a repeated ext)


def _iter_samples(shard: str, shard_bytes: int, counts: Counter) -> Iterator[_RawSample]:
    """Samples of ``shard`` grouped as webdataset groups them; ``counts["members"]`` counts the
    tar entries seen.  Raises IndexBuildError for anything tarfile cannot read to its end."""
    try:
        tf = tarfile.open(shard, mode="r:")
    except (tarfile.TarError, OSError) as e:
        raise IndexBuildError(f"cannot index {shard}: not a readable tar ({type(e).__name__}: {e})") from None
    with tf:
        cur: Optional[_RawSample] = None
        try:
            for m in tf:
                counts["members"] += 1
                if m.offset_data + m.size > shard_bytes:
                    raise IndexBuildError(
                        f"cannot index {shard}: truncated tar (member {m.name!r} needs bytes up to "
                        f"{m.offset_data + m.size}, the file has {shard_bytes})")
                if not m.isreg() or _META.match(m.name) or (
                        "/" not in m.name and m.name.startswith("__") and m.name.endswith("__")):
                    continue
                if m.issparse():
                    # DALI reads member bytes raw; a sparse member's raw bytes are not its content.
                    raise IndexBuildError(f"cannot index {shard}: sparse member {m.name!r} is not supported")
                key, ext = _split_name(m.name)
                if key is None:
                    continue
                ext = ext.lower()
                if cur is None or key != cur.key:
                    if cur is not None:
                        yield cur
                    cur = _RawSample(key, {})
                cur.members.setdefault(ext, m)
            # tarfile ends quietly at a cut or garbled header after the first member; a valid tar
            # has only zero blocks from here on.
            end = tf.offset
            tf.fileobj.seek(end)
            tail = tf.fileobj.read(512)
        except IndexBuildError:
            raise
        except (tarfile.TarError, OSError, EOFError) as e:
            raise IndexBuildError(f"cannot index {shard}: truncated tar ({type(e).__name__}: {e})") from None
        if tail.strip(b"\0"):
            raise IndexBuildError(
                f"cannot index {shard}: truncated tar (unreadable header at byte {end} of {shard_bytes})")
        if cur is not None:
            yield cur


def _read(f, m: tarfile.TarInfo) -> bytes:
    f.seek(m.offset_data)
    data = f.read(m.size)
    if len(data) != m.size:
        raise EOFError(f"member {m.name!r}: {len(data)} of {m.size} bytes")
    return data


def _png_bit_depth(data: bytes) -> int:
    # IHDR is always the first chunk: 8-byte signature, length, "IHDR", w, h, bit depth.
    if data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR" and len(data) > 24:
        return data[24]
    return 0


def _fallback_reason(im: Image.Image, ext: str, data: bytes) -> Optional[str]:
    """Why DALI would mishandle this decoded image (first match of FALLBACK_REASONS), or None."""
    if has_alpha(im):
        return "alpha"
    if im.mode == "P":
        return "palette"
    if im.mode == "CMYK":
        return "cmyk"
    if im.mode.startswith("I") or im.mode == "F" or _png_bit_depth(data) == 16:
        return "16bit"
    if im.mode not in ("RGB", "L"):
        return "mode"
    if ext not in DALI_SAFE_EXTS:
        return "format"
    return None


def _quote_name(name: str) -> str:
    return _NAME_UNSAFE.sub(lambda m: urllib.parse.quote(m.group(0), safe=""), name)


def idx_line(members: Sequence[Tuple[str, int, int, str]]) -> str:
    """One DALI v1.2 index line for a sample's ``(ext, offset, size, membername)`` members."""
    return " ".join(f"{e} {o} {s} {_quote_name(n)}" for e, o, s, n in members)


def _write_idx(path: str, lines: List[str]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.write(f"{DALI_INDEX_VERSION} {len(lines)}\n")
        for ln in lines:
            f.write(ln + "\n")


def _chosen(members: Dict[str, Any]) -> Tuple[Optional[str], Optional[str]]:
    return (next((e for e in IMAGE_EXTS if e in members), None),
            next((e for e in TEXT_EXTS if e in members), None))


# ----------------------------------------------------------------------------- building


def build_shard_index(shard: str, max_pixels: int = DEFAULT_MAX_PIXELS, *, trusted: bool = False) -> dict:
    """Validate ``shard`` and write its index files (layout in the module docstring).

    Args:
        shard: path of an uncompressed ``.tar`` shard.
        max_pixels: image size limit (width*height) of the check, as the loader's ``max_pixels``.
        trusted: the shard was written by ``make_shards`` (images already decoded, validated and
            stored as RGB JPEG): read only the tar headers, no decoding; every sample holding an
            image and a caption member is good, none goes to the fallback.
    Returns:
        the dict written to ``NAME.idx.json``.
    Raises:
        IndexBuildError: the file is missing, unreadable, not a tar or truncated; no index files
            are left for it (earlier ones are removed).
    """
    shard = os.path.abspath(os.fspath(shard))
    files = index_files(shard)
    tmps: List[str] = []
    try:
        try:
            shard_bytes = os.path.getsize(shard)
        except OSError as e:
            raise IndexBuildError(f"cannot index {shard}: {type(e).__name__}: {e}") from None
        counts: Counter = Counter()
        good_lines: List[str] = []
        fb_rows: List[Tuple[str, str, bytes, bytes, Optional[bytes]]] = []
        fallback: List[Dict[str, str]] = []
        skipped: List[Dict[str, str]] = []
        sizes: List[List[int]] = []
        fb_sizes: List[List[int]] = []
        n_samples = 0
        try:
            f = open(shard, "rb")
        except OSError as e:
            raise IndexBuildError(f"cannot index {shard}: {type(e).__name__}: {e}") from None
        with f:
            for raw in _iter_samples(shard, shard_bytes, counts):
                n_samples += 1
                img_ext, txt_ext = _chosen(raw.members)
                if trusted:
                    if img_ext is None or txt_ext is None:
                        reason = "missing_image" if img_ext is None else "missing_caption"
                        skipped.append({"key": raw.key, "reason": reason, "detail": raw.key})
                        continue
                    try:
                        # header only (Image.open is lazy): the size, not a decode
                        with Image.open(io.BytesIO(_read(f, raw.members[img_ext]))) as im:
                            wh = list(im.size)
                    except (OSError, EOFError) as e:
                        raise IndexBuildError(f"cannot index {shard}: truncated tar ({type(e).__name__}: {e})") from None
                    except Exception as e:  # PIL: not an image header
                        skipped.append({"key": raw.key, "reason": "decode_error", "detail": f"{type(e).__name__}: {e}"})
                        continue
                    good_lines.append(idx_line(_members_of(raw, img_ext, txt_ext)))
                    sizes.append(wh)
                    continue
                try:
                    sample: Dict[str, Any] = {"__key__": raw.key}
                    for ext, m in raw.members.items():
                        sample[ext] = _read(f, m)
                except (OSError, EOFError) as e:
                    raise IndexBuildError(f"cannot index {shard}: truncated tar ({type(e).__name__}: {e})") from None
                try:
                    c = check_sample(sample, max_pixels)
                except SkipSample as e:
                    skipped.append({"key": raw.key, "reason": e.reason, "detail": e.detail})
                    continue
                reason = _fallback_reason(c.image, c.image_ext, sample[c.image_ext])
                if reason is None:
                    good_lines.append(idx_line(_members_of(raw, c.image_ext, txt_ext)))
                    sizes.append(list(c.image.size))
                    continue
                buf = io.BytesIO()
                to_rgb_on_white(c.image).save(buf, format="PNG")
                fb_rows.append((raw.key, reason, buf.getvalue(), sample[txt_ext], sample.get("json")))
                fallback.append({"key": raw.key, "reason": reason})
                fb_sizes.append(list(c.image.size))

        fb_lines: List[str] = []
        if fb_rows:
            fb_lines = _write_fallback_tar(files["fallback_tar"] + ".tmp", fb_rows)
            tmps.append(files["fallback_tar"] + ".tmp")
            _write_idx(files["fallback_idx"] + ".tmp", fb_lines)
            tmps.append(files["fallback_idx"] + ".tmp")
        _write_idx(files["idx"] + ".tmp", good_lines)
        tmps.append(files["idx"] + ".tmp")
        skip_counts = Counter(s["reason"] for s in skipped)
        info = {
            "version": INDEX_VERSION,
            "shard": os.path.basename(shard),
            "shard_bytes": shard_bytes,
            "max_pixels": int(max_pixels),
            "members": counts["members"],
            "samples": n_samples,
            "good": len(good_lines),
            "fallback": fallback,
            "skipped": skipped,
            "sizes": sizes,
            "fallback_sizes": fb_sizes,
            "counts": {"good": len(good_lines), "fallback": len(fallback),
                       "skipped": dict(sorted(skip_counts.items()))},
            "trusted": bool(trusted),
        }
        with open(files["json"] + ".tmp", "w", encoding="utf-8") as jf:
            json.dump(info, jf, indent=1, ensure_ascii=False)
        tmps.append(files["json"] + ".tmp")
    except BaseException:
        for t in tmps:
            _remove(t)
        if sys.exc_info()[0] is IndexBuildError:
            for p in files.values():  # a refused shard must not keep loading through an old index
                _remove(p)
        raise
    if not fb_rows:
        _remove(files["fallback_tar"])
        _remove(files["fallback_idx"])
    else:
        os.replace(files["fallback_tar"] + ".tmp", files["fallback_tar"])
        os.replace(files["fallback_idx"] + ".tmp", files["fallback_idx"])
    os.replace(files["idx"] + ".tmp", files["idx"])
    os.replace(files["json"] + ".tmp", files["json"])  # last: a present, fresh json means complete
    logger.debug("indexed %s: %d good, %d fallback, %d skipped", shard, len(good_lines), len(fallback), len(skipped))
    return info


def _members_of(raw: _RawSample, img_ext: str, txt_ext: str) -> List[Tuple[str, int, int, str]]:
    exts = [img_ext, txt_ext] + (["json"] if "json" in raw.members else [])
    return [(e, raw.members[e].offset_data, raw.members[e].size, raw.members[e].name) for e in exts]


def _write_fallback_tar(path: str, rows) -> List[str]:
    """Write the normalised samples, then read the offsets back (TarWriter does not report them)."""
    import webdataset as wds

    with open(path, "wb") as f:
        w = wds.TarWriter(f, mtime=0.0, encoder=False)
        for key, _, png, txt, js in rows:
            s = {"__key__": key, "png": png, "txt": txt}
            if js is not None:
                s["json"] = js
            w.write(s)
        w.close()
    with tarfile.open(path, "r:") as tf:
        by_key: Dict[str, Dict[str, tarfile.TarInfo]] = {}
        for m in tf:
            key, ext = _split_name(m.name)
            by_key.setdefault(key, {})[ext] = m
    lines = []
    for key, *_ in rows:
        ms = by_key[key]
        exts = ["png", "txt"] + (["json"] if "json" in ms else [])
        lines.append(idx_line([(e, ms[e].offset_data, ms[e].size, ms[e].name) for e in exts]))
    return lines


def _remove(path: str) -> None:
    try:
        os.remove(path)
    except FileNotFoundError:
        pass


# ----------------------------------------------------------------------------- loading


def _parse_idx(path: str) -> List[IndexedSample]:
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"cannot read index {path}: {type(e).__name__}: {e}") from None
    head = lines[0].split() if lines else []
    if len(head) != 2 or head[0] != DALI_INDEX_VERSION or not head[1].isdigit():
        raise ValueError(f"malformed index {path}: first line must be '{DALI_INDEX_VERSION} N'; {REBUILD_HINT}")
    n = int(head[1])
    body = [ln for ln in lines[1:] if ln.strip()]
    if len(body) != n:
        raise ValueError(f"malformed index {path}: header says {n} samples, found {len(body)} lines; {REBUILD_HINT}")
    out = []
    for i, ln in enumerate(body, 2):
        tok = ln.split()
        if not tok or len(tok) % 4:
            raise ValueError(f"malformed index {path}:{i}: expected 'ext offset size name' groups; {REBUILD_HINT}")
        try:
            members = tuple((tok[j], int(tok[j + 1]), int(tok[j + 2]), urllib.parse.unquote(tok[j + 3]))
                            for j in range(0, len(tok), 4))
        except ValueError:
            raise ValueError(f"malformed index {path}:{i}: offset/size are not integers; {REBUILD_HINT}") from None
        key, _ = _split_name(members[0][3])
        if key is None:
            raise ValueError(f"malformed index {path}:{i}: member name {members[0][3]!r} has no extension")
        out.append(IndexedSample(key, members))
    return out


def _with_sizes(samples: List[IndexedSample], sizes, json_path: str) -> List[IndexedSample]:
    if not isinstance(sizes, list) or len(sizes) != len(samples):
        raise ValueError(f"{json_path} lacks one image size per indexed sample; {REBUILD_HINT}")
    return [IndexedSample(s.key, s.members, (int(wh[0]), int(wh[1]))) for s, wh in zip(samples, sizes)]


def load_shard_index(shard: str, max_pixels: Optional[int] = None) -> ShardIndex:
    """Load and check the index of ``shard``.

    Args:
        shard: path of the ``.tar`` shard.
        max_pixels: when given, must equal the ``max_pixels`` the index was built with.
    Raises:
        IndexMissingError: ``NAME.idx`` or ``NAME.idx.json`` is absent.
        ValueError: naming the file: unreadable/unknown-version json, stale index (the tar's size
            differs from ``shard_bytes``), malformed idx, missing fallback files, sample counts
            that disagree with the json, or a ``max_pixels`` mismatch.
    """
    shard = os.path.abspath(os.fspath(shard))
    files = index_files(shard)
    missing = [files[k] for k in ("idx", "json") if not os.path.exists(files[k])]
    if missing:
        raise IndexMissingError(f"no index for shard {shard} (missing {', '.join(missing)}); "
                                f"{BUILD_HINT} first")
    try:
        with open(files["json"], encoding="utf-8") as f:
            info = json.load(f)
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot read {files['json']}: {type(e).__name__}: {e}; {REBUILD_HINT}") from None
    if not isinstance(info, dict) or info.get("version") != INDEX_VERSION:
        v = info.get("version") if isinstance(info, dict) else None
        raise ValueError(f"{files['json']} has index version {v!r}, this code reads {INDEX_VERSION}; {REBUILD_HINT}")
    try:
        size = os.path.getsize(shard)
    except OSError as e:
        raise ValueError(f"cannot stat shard {shard}: {type(e).__name__}: {e}") from None
    if size != info.get("shard_bytes"):
        raise ValueError(f"stale index {files['json']}: built for a {info.get('shard_bytes')}-byte shard, "
                         f"{shard} now has {size} bytes; {REBUILD_HINT}")
    if max_pixels is not None and int(max_pixels) != info.get("max_pixels"):
        raise ValueError(f"index {files['json']} was built with max_pixels={info.get('max_pixels')}, "
                         f"the loader asks for max_pixels={max_pixels}; {REBUILD_HINT} --max-pixels {max_pixels}")
    samples = _with_sizes(_parse_idx(files["idx"]), info.get("sizes"), files["json"])
    if len(samples) != info.get("good"):
        raise ValueError(f"index {files['idx']} lists {len(samples)} samples, {files['json']} says "
                         f"{info.get('good')}; {REBUILD_HINT}")
    fallback = list(info.get("fallback", []))
    fb_shard = fb_idx = None
    fb_samples: List[IndexedSample] = []
    if fallback:
        absent = [files[k] for k in ("fallback_tar", "fallback_idx") if not os.path.exists(files[k])]
        if absent:
            raise ValueError(f"index of {shard} lists {len(fallback)} fallback samples but "
                             f"{', '.join(absent)} is missing; {REBUILD_HINT}")
        fb_shard, fb_idx = files["fallback_tar"], files["fallback_idx"]
        fb_samples = _with_sizes(_parse_idx(fb_idx), info.get("fallback_sizes"), files["json"])
        if len(fb_samples) != len(fallback):
            raise ValueError(f"index {fb_idx} lists {len(fb_samples)} samples, {files['json']} says "
                             f"{len(fallback)}; {REBUILD_HINT}")
    return ShardIndex(shard=shard, samples=samples, fallback_shard=fb_shard, fallback_samples=fb_samples,
                      fallback=fallback, skipped=list(info.get("skipped", [])), max_pixels=int(info["max_pixels"]),
                      idx_path=files["idx"], fallback_idx_path=fb_idx, trusted=bool(info.get("trusted", False)),
                      meta=info)


# ----------------------------------------------------------------------------- many shards


def _find_tars(d: str) -> List[str]:
    out = []
    for root, dirs, fns in os.walk(d):
        dirs.sort()
        out.extend(os.path.join(root, fn) for fn in sorted(fns)
                   if fn.endswith(".tar") and not fn.endswith(".fallback.tar"))
    return out


def _resolve_shards(urls_or_dir) -> List[str]:
    from .urls import resolve_urls

    specs = [urls_or_dir] if isinstance(urls_or_dir, (str, os.PathLike)) else list(urls_or_dir)
    found: List[str] = []
    for spec in specs:
        for part in str(os.fspath(spec)).split("::"):
            part = os.path.expanduser(part.strip())
            if not part:
                continue
            if os.path.isdir(part):
                tars = _find_tars(part)
                if not tars:
                    raise ValueError(f"shard directory {part!r} holds no .tar files")
                found.extend(tars)
            else:
                found.extend(resolve_urls(part))
    remote = [u for u in found if "://" in u or u.startswith("pipe:")]
    if remote:
        raise ValueError(f"cannot index remote shard {remote[0]!r}: download it and index the local copy")
    seen, out = set(), []
    for u in found:
        a = os.path.abspath(u)
        if a not in seen and not a.endswith(".fallback.tar"):
            seen.add(a)
            out.append(a)
    if not out:
        raise ValueError(f"shard spec {urls_or_dir!r} matches no shards")
    return out


def _up_to_date(shard: str, max_pixels: int) -> bool:
    try:
        load_shard_index(shard, max_pixels)
        return True
    except ValueError:
        return False


def _build_task(task) -> Tuple[str, Optional[dict], Optional[str]]:
    shard, max_pixels = task
    try:
        return shard, build_shard_index(shard, max_pixels), None
    except IndexBuildError as e:
        return shard, None, str(e)
    except Exception as e:  # report it with the shard's name after the others finish
        return shard, None, f"cannot index {shard}: {type(e).__name__}: {e}"


def build_index(urls_or_dir, *, workers: Optional[int] = None, max_pixels: int = DEFAULT_MAX_PIXELS,
                force: bool = False, progress: bool = True) -> dict:
    """Index every shard of ``urls_or_dir`` that has no fresh index.

    Args:
        urls_or_dir: a directory (its ``*.tar``, recursively, without ``*.fallback.tar``), a list
            of shard paths/directories, or any spec :func:`~msclip_fast.data.urls.resolve_urls`
            accepts.
        workers: processes (fork) building shards in parallel; default ``os.cpu_count()``.
        max_pixels: the check's pixel limit; an index built with another limit is rebuilt.
        force: rebuild indexes that are present and fresh.
        progress: show a tqdm bar on stderr.
    Returns:
        ``{"shards", "built", "up_to_date", "good", "fallback": {reason: n},
        "skipped": {reason: n}, "seconds"}`` (counts over all shards, fresh ones included).
    Raises:
        ValueError: a spec that matches no shards, or a remote URL.
        IndexBuildError: naming every shard that failed, raised after the others were built.
    """
    t0 = time.time()
    shards = _resolve_shards(urls_or_dir)
    todo = shards if force else [s for s in shards if not _up_to_date(s, max_pixels)]
    results: Dict[str, dict] = {}
    errors: List[str] = []
    workers = max(1, int(workers or os.cpu_count() or 1))
    from tqdm import tqdm

    # leave=False: the bar clears itself, so stderr ends with at most the one error line.
    bar = tqdm(total=len(todo), desc="indexing shards", unit="shard", disable=not progress or not todo, leave=False,
               file=sys.stderr)
    tasks = [(s, max_pixels) for s in todo]
    try:
        if workers == 1 or len(todo) <= 1:
            it = map(_build_task, tasks)
            pool = None
        else:
            ctx = mp.get_context("fork") if "fork" in mp.get_all_start_methods() else mp.get_context()
            pool = ctx.Pool(min(workers, len(todo)))
            it = pool.imap_unordered(_build_task, tasks, chunksize=1)
        try:
            for shard, info, err in it:
                if err is not None:
                    errors.append(err)
                else:
                    results[shard] = info
                bar.update(1)
        finally:
            if pool is not None:
                pool.close()
                pool.join()
    finally:
        bar.close()
    if errors:
        errors.sort()
        raise IndexBuildError("; ".join(errors) if len(errors) <= 3 else
                              "; ".join(errors[:3]) + f"; and {len(errors) - 3} more shards failed")
    good, fb, sk = 0, Counter(), Counter()
    for s in shards:
        info = results.get(s)
        if info is None:
            with open(index_files(s)["json"], encoding="utf-8") as f:
                info = json.load(f)
        good += info["good"]
        fb.update(x["reason"] for x in info["fallback"])
        sk.update(info["counts"]["skipped"])
    summary = {"shards": len(shards), "built": len(results), "up_to_date": len(shards) - len(todo),
               "good": good, "fallback": dict(sorted(fb.items())), "skipped": dict(sorted(sk.items())),
               "seconds": round(time.time() - t0, 3)}
    logger.info("indexed %s", summary)
    return summary


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``python -m msclip_fast.data.index``: see :func:`msclip_fast.data.cli.index_main`."""
    from .cli import index_main

    return index_main(argv)


if __name__ == "__main__":
    sys.exit(main())
