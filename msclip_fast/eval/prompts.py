"""Zero-shot prompts built from the *training* captions of each class.

Class names such as ``"signs_and_symbols"`` or ``"special"`` rarely appear in the captions a
model was trained on, so prompts built from them can sit at chance. Here each class gets
prompts naming what its training images show:

* its most *distinctive* caption words: frequent in the class's training captions and rarer in
  the other classes' (score ``p_c(w) * log(p_c(w) / p(w))``, with ``p_c(w)`` the fraction of
  the class's captions containing ``w`` and ``p(w)`` its mean over classes), each put in the
  first template (``"a clip art of {word}."``);
* its most frequent whole training captions.

Only the training split is read (caption and ``json`` members; images are not decoded), and
:func:`train_caption_prompts` refuses a training spec that shares a shard with the evaluated
one, so nothing of the held-out set leaks into the classifier.
"""
from __future__ import annotations

import json
import logging
import math
import os
import re
from collections import Counter, defaultdict
from typing import Iterator, Mapping, Sequence

from ..data.samples import TEXT_EXTS
from ..data.urls import resolve_urls
from .zeroshot import Template, class_label, format_prompt

logger = logging.getLogger(__name__)

_WORD_RE = re.compile(r"[a-z0-9]+(?:['-][a-z0-9]+)*")
# Function words and caption boilerplate: they name nothing a class contains.
STOPWORDS = frozenset("""
a an the and or of in on at to for with by from as is are was were be been it its this that these
those there their his her him she he they them we you your our my me i not no but if so than then
into onto over under up down out off about after before very more most some any all each other
such only own same too can will just do does did has have had also which who whom what when where
why how one two via vs photo picture image clip art clipart drawing illustration cartoon graphic
vector svg png icon set collection part
""".split())


def caption_words(caption: str) -> set[str]:
    """Lower-cased content words of one caption (stopwords and 1-letter words dropped; digits
    kept, e.g. ``"3"``)."""
    return {w for w in _WORD_RE.findall(caption.lower())
            if w not in STOPWORDS and (len(w) > 1 or w.isdigit())}


def read_shard_captions(urls: Sequence[str]) -> Iterator[tuple[str, str, dict]]:
    """``(key, caption, meta)`` of every sample of local webdataset shards, reading only
    caption and ``json`` members (images are skipped, not decoded).

    Samples without a caption are left out; an unreadable ``json`` gives ``{}``.

    Raises:
        ValueError: a shard that is not a readable tar (names it).
    """
    from ..data.samples import tar_samples

    for url in urls:
        for key, fields in tar_samples(url, (*TEXT_EXTS, "json")):
            yield from _sample(key, fields)


def _sample(key: str, fields: dict):
    txt = next((fields[e] for e in TEXT_EXTS if e in fields), None)
    if txt is None:
        return
    caption = " ".join(txt.decode("utf-8", errors="replace").split())
    if not caption:
        return
    meta = {}
    if "json" in fields:
        try:
            m = json.loads(fields["json"])
            meta = m if isinstance(m, dict) else {}
        except (ValueError, UnicodeDecodeError):
            pass
    yield key, caption, meta


def distinctive_words(captions_by_class: Mapping[str, Sequence[str]], top: int = 8,
                      min_count: int = 2) -> dict[str, list[str]]:
    """The ``top`` most distinctive words of each class's captions (see the module docstring);
    a word must occur in at least ``min_count`` of the class's captions.

    Returns:
        ``{class: [word, ...]}`` best first (possibly fewer than ``top``, or empty).
    """
    df = {c: Counter(w for cap in caps for w in caption_words(cap)) for c, caps in captions_by_class.items()}
    n = {c: max(1, len(caps)) for c, caps in captions_by_class.items()}
    classes = list(captions_by_class)
    mean_p: dict[str, float] = defaultdict(float)
    for c in classes:
        for w, k in df[c].items():
            mean_p[w] += k / n[c] / len(classes)
    out = {}
    for c in classes:
        scored = []
        for w, k in df[c].items():
            if k < min_count:
                continue
            p = k / n[c]
            scored.append((p * math.log(p / mean_p[w]), k, w))
        scored.sort(key=lambda t: (-t[0], -t[1], t[2]))
        out[c] = [w for s, _, w in scored[:top] if s > 0]
    return out


def train_caption_prompts(
    train_data: str,
    classnames: Sequence[str],
    templates: Sequence[Template],
    *,
    eval_urls: Sequence[str] = (),
    words: int = 8,
    captions: int = 4,
) -> tuple[dict[str, list[str]], dict[str, list[str]]]:
    """Per-class prompts from the training split's captions of that class.

    Args:
        train_data: shard spec of the TRAINING split (a directory, pattern, ``::`` list).
        classnames: the C evaluated class names; a training sample's class is its
            ``meta["class"]`` matched as in zero-shot evaluation.
        templates: the first one is filled with each distinctive word.
        eval_urls: the evaluated shards; sharing any with ``train_data`` is refused.
        words: distinctive words per class (one prompt each).
        captions: most frequent whole training captions per class added as prompts.
    Returns:
        ``(prompts, words)``: ``{class: [prompt, ...]}`` for the classes that have training
        captions, and ``{class: [word, ...]}`` (what the prompts name, for the report).
    Raises:
        ValueError: ``train_data`` shares shards with ``eval_urls``, or holds no captioned
            sample of any of the classes.
    """
    urls = resolve_urls(train_data)
    shared = sorted({os.path.realpath(u) for u in urls} & {os.path.realpath(u) for u in eval_urls})
    if shared:
        raise ValueError(f"--train-data {train_data!r} shares {len(shared)} shard(s) with the evaluated data "
                         f"(e.g. {shared[0]!r}): prompts must come from the training split only")
    index = {str(c): i for i, c in enumerate(classnames)}
    by_class: dict[str, list[str]] = {str(c): [] for c in classnames}
    n = 0
    for _key, caption, meta in read_shard_captions(urls):
        lab = class_label(meta, index, len(classnames))
        if lab is not None:
            by_class[str(classnames[lab])].append(caption)
            n += 1
    if n == 0:
        raise ValueError(f"--train-data {train_data!r} has no captioned sample of the {len(classnames)} classes "
                         "(meta['class'] in the json member)")
    by_class = {c: caps for c, caps in by_class.items() if caps}
    top_words = distinctive_words(by_class, top=words)
    prompts = {}
    for c, caps in by_class.items():
        ps = [format_prompt(templates[0], w) for w in top_words[c]]
        ps += [cap for cap, _ in Counter(caps).most_common(captions)]
        prompts[c] = ps
    logger.info("train-caption prompts from %d training captions of %d classes (%s)", n, len(by_class), train_data)
    return prompts, top_words
