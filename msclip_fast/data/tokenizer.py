"""CLIP BPE tokenizer: a thin wrapper over open_clip's ``SimpleTokenizer``.

The byte-pair encoding itself (vocabulary 49,408, ``<start_of_text>`` = 49406,
``<end_of_text>`` = 49407) is open_clip's; nothing here re-implements it.  This module only
fixes the contract the rest of msclip_fast relies on:

* output ``(B, context_length)`` ``torch.int64``, zero padded;
* a caption longer than the context is truncated and its EOT (49407) is kept at the last
  position (``context_length - 1``), so EOT pooling (argmax of the ids) always finds it;
* ``open_clip``'s text cleaning (``ftfy`` fix + HTML unescape + whitespace normalisation +
  lower-casing) is applied, so ``"caf&eacute;"`` and ``"café"`` tokenize identically.
"""
from __future__ import annotations

import functools
import logging
from typing import Sequence, Union

import torch

logger = logging.getLogger(__name__)

SOT_TOKEN = 49406
EOT_TOKEN = 49407
VOCAB_SIZE = 49408


@functools.lru_cache(maxsize=None)
def _simple_tokenizer():
    # Loading the BPE merges takes ~0.3 s; every context length shares one instance.
    from open_clip.tokenizer import SimpleTokenizer

    return SimpleTokenizer()


class Tokenizer:
    """Callable ``str | Sequence[str] -> LongTensor (B, context_length)``.

    Attributes:
        context_length: tokens per caption including SOT and EOT (77 for CLIP).
        sot_token_id, eot_token_id, vocab_size: the BPE special ids and vocabulary size.
    """

    sot_token_id = SOT_TOKEN
    eot_token_id = EOT_TOKEN
    vocab_size = VOCAB_SIZE

    def __init__(self, context_length: int = 77):
        if not isinstance(context_length, int) or isinstance(context_length, bool) or context_length < 2:
            raise ValueError(f"context_length must be an int >= 2 (room for SOT and EOT), got {context_length!r}")
        self.context_length = context_length
        self._tok = _simple_tokenizer()

    def encode(self, text: str) -> list[int]:
        """BPE ids of ``text`` without SOT/EOT and without truncation."""
        return self._tok.encode(text)

    def decode(self, ids: Union[Sequence[int], torch.Tensor]) -> str:
        """Text of ``ids``; SOT, EOT and padding zeros are dropped."""
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        return self._tok.decode([i for i in ids if i not in (0, SOT_TOKEN, EOT_TOKEN)]).strip()

    def __call__(self, texts: Union[str, Sequence[str]]) -> torch.Tensor:
        """Tokenize.

        Args:
            texts: one caption or a sequence of captions (``None`` entries are not allowed).
        Returns:
            ``(B, context_length)`` int64 tensor; row ``i`` is ``[SOT, ids..., EOT, 0, ...]``;
            when ``ids`` does not fit, it is cut and EOT sits at ``context_length - 1``.
        Raises:
            ValueError: ``texts`` holds something other than strings.
        """
        if isinstance(texts, str):
            texts = [texts]
        texts = list(texts)
        for i, t in enumerate(texts):
            if not isinstance(t, str):
                raise ValueError(f"texts[{i}] must be a str, got {type(t).__name__}: {t!r}")
        out = torch.zeros(len(texts), self.context_length, dtype=torch.long)
        n = self.context_length - 2
        for i, t in enumerate(texts):
            ids = self._tok.encode(t)[:n]
            row = [SOT_TOKEN, *ids, EOT_TOKEN]
            out[i, : len(row)] = torch.tensor(row, dtype=torch.long)
        return out


def get_tokenizer(context_length: int = 77) -> Tokenizer:
    """Return the CLIP BPE tokenizer (open_clip's) producing ``(B, context_length)`` int64."""
    return Tokenizer(context_length)
