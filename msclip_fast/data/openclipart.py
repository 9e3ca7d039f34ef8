"""Open Clip Art Library (Debian ``openclipart-png`` / ``openclipart-svg``): enumerate + captions.

Layout: ``ROOT/png/<class>/.../<name>.png`` with a matching ``ROOT/svg/<class>/.../<name>.svg``
(either may be a symlink to another file: 1,221 of 8,121 PNGs are).  The class is the
top-level folder (22 of them).

Captions come from the SVG's RDF metadata, and only from the ``cc:Work`` element's *direct*
children: ``dc:title`` (the work's title; the ``dc:title`` inside ``dc:creator`` /
``dc:publisher`` / ``dc:rights`` agents are author names and are ignored), ``dc:description``
and the ``dc:subject`` keyword bag.  The data is double-escaped (``&amp;quot;``) and partly
mojibake (``Josu&amp;Atilde;&amp;copy;``): text is HTML-unescaped until stable and repaired with
``ftfy`` (an open_clip dependency).
"""
from __future__ import annotations

import html
import os
import re
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from typing import List, Optional

DEFAULT_ROOT = "/usr/share/openclipart"

_META_RE = re.compile(r"<metadata\b.*?</metadata\s*>", re.S)
_SVG_TAG_RE = re.compile(r"<svg\b[^>]*>", re.S)
_XMLNS_RE = re.compile(r"""\sxmlns(?::[\w.-]+)?\s*=\s*("[^"]*"|'[^']*')""")
_WORK_RE = re.compile(r"<(\w+:)?Work\b.*?</(\w+:)?Work\s*>", re.S)
_URL_RE = re.compile(r"(https?://|www\.)\S+", re.I)
# Perl stringified references ("HASH(0x862bbb8)"), export boilerplate and upload timestamps.
_NOISE_RE = re.compile(
    r"\b(HASH|ARRAY)\(0x[0-9a-f]+\)|EPS converted from\.?|\((Mon|Tue|Wed|Thu|Fri|Sat|Sun) "
    r"\w{3} +\d+ [\d:]+ \d{4}\)",
    re.I,
)

# Keywords that say nothing about the picture (tagging artefacts of the 2000s archive).
JUNK_KEYWORDS = frozenset(
    """unsorted hash magick none untitled clipart clip art clip-art openclipart svg png image
    images media public domain publicdomain pd remix inkscape illustrator drawing vector
    new various misc miscellaneous other""".split()
) | {"clip art", "public domain", "open clip art", "openclipart.org"}
_JUNK_TITLE_RE = re.compile(
    r"^(untitled|title|new document|none|unknown|image|drawing|layer|svg|clip ?art)"
    r"[\s_#-]*\d*(\.svg)?$|^[\W\d_]*$",
    re.I,
)
MAX_KEYWORDS = 8
MAX_DESCRIPTION_CHARS = 300

try:  # ftfy repairs mojibake such as "JosuÃ©" -> "Josué"; optional but installed with open_clip
    import ftfy as _ftfy
except ImportError:  # pragma: no cover
    _ftfy = None


def clean_text(s: Optional[str]) -> str:
    """Unescape HTML entities (repeatedly: the archive double-escapes), fix mojibake,
    drop control characters and normalise whitespace."""
    if not s:
        return ""
    for _ in range(3):
        u = html.unescape(s)
        if u == s:
            break
        s = u
    if _ftfy is not None:
        s = _ftfy.fix_text(s)
    s = "".join(c if c.isprintable() or c.isspace() else " " for c in s)
    return " ".join(s.split())


@dataclass
class SvgText:
    """Caption fields from one SVG (already cleaned)."""

    title: str = ""
    description: str = ""
    keywords: List[str] = field(default_factory=list)
    error: str = ""
    agents: List[str] = field(default_factory=list)  # creator/rights/publisher names


def _local(tag: str) -> str:
    return tag.rsplit("}", 1)[-1] if isinstance(tag, str) else ""


def _parse_work(xml_text: str) -> Optional[ET.Element]:
    m = _META_RE.search(xml_text)
    if m is None:
        return None
    # Namespace prefixes used inside <metadata> may be declared on the <svg> root: carry them
    # over onto a wrapper so the fragment parses on its own.
    root_tag = _SVG_TAG_RE.search(xml_text)
    decls = {}
    if root_tag:
        for dm in _XMLNS_RE.finditer(root_tag.group(0)):
            decls[dm.group(0).split("=")[0].strip()] = dm.group(0).strip()
    wrapper = "<wrap " + " ".join(decls.values()) + ">" + m.group(0) + "</wrap>"
    root = ET.fromstring(wrapper)
    for el in root.iter():
        if _local(el.tag) == "Work":
            return el
    return None


def _fallback_work(xml_text: str) -> SvgText:
    """Regex extraction for SVGs whose metadata is not well-formed XML."""
    m = _WORK_RE.search(xml_text)
    if not m:
        return SvgText(error="no_work_element")
    body = m.group(0)
    # Remove agent blocks so their dc:title (author names) cannot be picked up.
    body = re.sub(r"<(\w+:)?(creator|publisher|rights|contributor)\b.*?</(\w+:)?\2\s*>", "", body, flags=re.S)

    def one(tag):
        t = re.search(rf"<(\w+:)?{tag}\b[^>]*>(.*?)</(\w+:)?{tag}\s*>", body, re.S)
        return clean_text(re.sub(r"<[^>]+>", " ", t.group(2))) if t else ""

    kws = [clean_text(k) for k in re.findall(r"<(?:\w+:)?li\b[^>]*>(.*?)</(?:\w+:)?li\s*>", body, re.S)]
    return SvgText(title=one("title"), description=one("description"), keywords=kws)


def parse_svg_text(xml_text: str) -> SvgText:
    """Title, description and keywords of the SVG's ``cc:Work`` (never of its agents)."""
    try:
        work = _parse_work(xml_text)
    except ET.ParseError:
        out = _fallback_work(xml_text)
        out.error = out.error or "xml_parse_error"
        return out
    if work is None:
        return SvgText(error="no_work_element")
    out = SvgText()
    for child in work:  # direct children only: agents' dc:title are nested deeper
        name = _local(child.tag)
        if name == "title" and not out.title:
            out.title = clean_text("".join(child.itertext()))
        elif name == "description" and not out.description:
            out.description = clean_text("".join(child.itertext()))
        elif name in ("creator", "rights", "publisher", "contributor"):
            for el in child.iter():
                if _local(el.tag) == "title":
                    a = clean_text("".join(el.itertext()))
                    if a and a not in out.agents:
                        out.agents.append(a)
        elif name == "subject":
            lis = [el for el in child.iter() if _local(el.tag) == "li"]
            if lis:
                out.keywords.extend(clean_text("".join(li.itertext())) for li in lis)
            else:  # plain-text subject: "a, b, c"
                out.keywords.extend(clean_text(k) for k in "".join(child.itertext()).split(","))
    return out


def _usable_keywords(keywords: List[str], title: str, agents=()) -> List[str]:
    seen = {a.casefold() for a in agents}  # an author's name is not a description
    title_l = title.lower()
    out = []
    for k in keywords:
        kl = k.lower().strip(" .,;:")
        if (
            len(kl) < 2 or kl in JUNK_KEYWORDS or kl in seen or len(kl) > 40 or "http" in kl
            or _NOISE_RE.search(kl) or not re.search(r"[^\W\d_]", kl)  # no letters at all: "123", "--"
            or re.search(rf"\b{re.escape(kl)}\b", title_l)  # already said by the title
        ):
            continue
        seen.add(kl)
        out.append(k.strip(" .,;:"))
        if len(out) == MAX_KEYWORDS:
            break
    return out


def build_caption(t: SvgText) -> str:
    """``"Title. Description. kw1, kw2"`` from the usable parts; ``""`` when nothing is usable.

    Junk titles (``Untitled``, ``drawing-1.svg``, punctuation, the author's own name) and
    keywords naming an author are dropped; a description equal
    to the title is not repeated; URLs are removed from descriptions, which are capped at
    MAX_DESCRIPTION_CHARS (the tokenizer keeps 75 tokens anyway).  A caption made of keywords
    only is still usable.
    """
    title = " ".join(_NOISE_RE.sub(" ", t.title).split())
    agents = {a.casefold() for a in t.agents}
    if _JUNK_TITLE_RE.match(title) or title.casefold() in agents:
        title = ""
    desc = " ".join(_NOISE_RE.sub(" ", _URL_RE.sub(" ", t.description)).split())
    if len(desc) > MAX_DESCRIPTION_CHARS:
        desc = desc[:MAX_DESCRIPTION_CHARS].rsplit(" ", 1)[0]
    if desc.lower().strip(" .") in ("", title.lower().strip(" .")) or _JUNK_TITLE_RE.match(desc):
        desc = ""
    parts = [p.rstrip(" .") for p in (title, desc) if p]
    kws = _usable_keywords(t.keywords, " ".join(parts), t.agents)
    if kws:
        parts.append(", ".join(kws))
    return ". ".join(p for p in parts if p)


def caption_from_svg_file(path: str) -> tuple[str, SvgText]:
    """Read an SVG file and return ``(caption, fields)``; unreadable files give ``""``."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        return "", SvgText(error=f"read_error: {e}")
    text = data.decode("utf-8", errors="replace")
    t = parse_svg_text(text)
    return build_caption(t), t


@dataclass
class ClipartItem:
    """One PNG of the archive: path relative to ``png/``, its class, and its SVG."""

    rel: str  # e.g. "animals/mammals/cat_01.png"
    png: str
    svg: str
    cls: str
    is_symlink: bool
    real: str  # os.path.realpath(png)


def enumerate_openclipart(root: str = DEFAULT_ROOT) -> List[ClipartItem]:
    """All PNGs under ``root/png`` in sorted order (symlinks included), paired with SVGs.

    Raises:
        ValueError: ``root`` has no ``png/`` folder (install openclipart-png/-svg).
    """
    png_root = os.path.join(root, "png")
    svg_root = os.path.join(root, "svg")
    if not os.path.isdir(png_root):
        raise ValueError(
            f"root={root!r} has no png/ folder: install the Debian packages openclipart-png "
            "and openclipart-svg, or pass --root"
        )
    items = []
    for dirpath, dirnames, filenames in os.walk(png_root):
        dirnames.sort()
        for fn in sorted(filenames):
            if not fn.lower().endswith(".png"):
                continue
            p = os.path.join(dirpath, fn)
            rel = os.path.relpath(p, png_root)
            parts = rel.split(os.sep)
            cls = parts[0] if len(parts) > 1 else "unknown"
            svg = os.path.join(svg_root, rel[:-4] + ".svg")
            items.append(ClipartItem(rel, p, svg, cls, os.path.islink(p), os.path.realpath(p)))
    items.sort(key=lambda it: it.rel)
    return items


def filename_hint(rel: str) -> str:
    """Words of a file name: ``"icons/folder_binary_01.png"`` -> ``"folder binary"``.

    Used by make_shards to tell apart images whose metadata caption is a generic collection
    title shared by many files ("Part of the Flat Icon Collection").
    """
    stem = os.path.splitext(os.path.basename(rel))[0]
    words = [w for w in re.split(r"[\s_\-.]+", stem) if len(w) > 1 and not w.isdigit()]
    return " ".join(words)
