"""Packing metadata of one- or two-modality token batches (DESIGN §3 Packed execution).

Tokens are kept flat, ``(T, D)``, one row per token, sequences one after the other. In a
packed two-modality batch image tokens come first, then text tokens:
``T = B_img·L_img + sum(text lengths)``. Text is ragged: each caption carries its own length
``eot + 1`` (a causal tower that pools its EOT token never needs the padding after it). A
shared block then runs QKV, out-projection and FFN as one GEMM over all T rows, attention as
one varlen call and each LayerNorm as one modality-indexed call. Every tensor here is built on
the host from host-side lengths and copied to the device once per forward, so no block ever
reads a device value back (no host syncs).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from .layer_norm import IMAGE, TEXT

# Attention mask of each modality: text is causal (CLIP), images are bidirectional.
CAUSAL = {IMAGE: False, TEXT: True}


@dataclass(frozen=True)
class PackedBatch:
    """Where each modality's sequences sit in a flat ``(T, D)`` token tensor.

    Build with :meth:`from_seqlens` (any lengths) or :meth:`build` (uniform lengths).

    Fields:
        modalities: the modality ids present, in row order (each a contiguous segment of rows):
            ``(IMAGE,)``, ``(TEXT,)`` or ``(IMAGE, TEXT)``.
        seqlens: per entry of ``modalities``, the host lengths of its sequences.
        cu_seqlens: ``(S+1,)`` int32 cumulative sequence starts, or None for a single-modality
            batch of equal lengths (it runs in the batched ``(B, L, D)`` attention layout).
        causal: a bool for a single-modality batch; a ``(S,)`` bool tensor (one flag per
            sequence) for a two-modality batch.
        modality_ids: the modality id (an int) of a single-modality batch; a ``(T,)`` int8
            tensor (one id per row) for a two-modality batch.
        max_seqlen: the longest sequence, a host int (the varlen attention's ``max_seqlen``:
            passing it saves a device read-back per attention call).
    """

    modalities: tuple
    seqlens: tuple
    cu_seqlens: torch.Tensor | None
    causal: torch.Tensor | bool
    modality_ids: torch.Tensor | int
    max_seqlen: int

    # -- construction ---------------------------------------------------------------------
    @classmethod
    def from_seqlens(cls, segments: Sequence[tuple[int, Sequence[int]]],
                     device: torch.device | str | None = None) -> "PackedBatch":
        """Metadata for ``segments``: ``[(modality, lengths), ...]`` in row order, each modality
        at most once (images before text when both are present).

        Args:
            segments: ``(modality id, host sequence lengths)`` pairs; a modality may have no
                sequences (an empty list).
            device: where the index tensors go (one host-to-device copy each).
        Raises:
            ValueError: an unknown or repeated modality, text before images, a length < 1,
                or no sequence at all.
        """
        mods, lens = [], []
        for m, seq in segments:
            if m not in CAUSAL:
                raise ValueError(f"modality must be {IMAGE} (image) or {TEXT} (text), got {m!r}")
            if m in mods:
                raise ValueError(f"modality {m} appears twice in segments")
            seq = tuple(int(n) for n in seq)
            if any(n < 1 for n in seq):
                raise ValueError(f"sequence lengths must be >= 1, got {min(seq)} for modality {m}")
            mods.append(int(m))
            lens.append(seq)
        if mods != sorted(mods):
            raise ValueError(f"segments must put images before text, got modalities {mods}")
        if not any(lens):
            raise ValueError("a packed batch needs at least one sequence")
        mods, lens = tuple(mods), tuple(lens)
        all_lens = [n for seq in lens for n in seq]
        max_seqlen = max(all_lens)
        move = device is not None and torch.device(device).type != "cpu"

        def dev(t):
            return t.to(device, non_blocking=True) if move else t

        if len(mods) == 1:
            m = mods[0]
            uniform = len(set(all_lens)) == 1
            cu = None if uniform else dev(_cumsum(all_lens))
            return cls(mods, lens, cu, CAUSAL[m], m, max_seqlen)
        cu = dev(_cumsum(all_lens))
        causal = dev(torch.tensor([CAUSAL[m] for m, seq in zip(mods, lens) for _ in seq], dtype=torch.bool))
        ids = dev(torch.cat([torch.full((sum(seq),), m, dtype=torch.int8) for m, seq in zip(mods, lens)]))
        return cls(mods, lens, cu, causal, ids, max_seqlen)

    @classmethod
    def build(cls, num_images: int, image_len: int, num_texts: int, text_len: int,
              device: torch.device | str | None = None) -> "PackedBatch":
        """Two-modality metadata for ``num_images`` image sequences of ``image_len`` tokens
        followed by ``num_texts`` causal text sequences of ``text_len`` tokens each.

        Raises:
            ValueError: a negative count, a non-positive length, or no sequence at all.
        """
        for name, v in (("num_images", num_images), ("num_texts", num_texts)):
            if int(v) < 0:
                raise ValueError(f"{name} must be >= 0, got {v}")
        for name, v in (("image_len", image_len), ("text_len", text_len)):
            if int(v) < 1:
                raise ValueError(f"{name} must be >= 1, got {v}")
        if num_images + num_texts == 0:
            raise ValueError("a packed batch needs at least one sequence (num_images + num_texts > 0)")
        return cls.from_seqlens([(IMAGE, [image_len] * num_images), (TEXT, [text_len] * num_texts)], device)

    # -- shapes ---------------------------------------------------------------------------
    def _lens(self, modality: int) -> tuple:
        return self.seqlens[self.modalities.index(modality)] if modality in self.modalities else ()

    @property
    def num_images(self) -> int:
        return len(self._lens(IMAGE))

    @property
    def num_texts(self) -> int:
        return len(self._lens(TEXT))

    @property
    def image_rows(self) -> int:
        """Rows ``[0, image_rows)`` are image tokens; the rest are text tokens."""
        return sum(self._lens(IMAGE))

    @property
    def total_rows(self) -> int:
        return sum(sum(seq) for seq in self.seqlens)

    @property
    def num_sequences(self) -> int:
        return sum(len(seq) for seq in self.seqlens)

    @property
    def group_sizes(self) -> tuple[int, int]:
        """Rows per modality in modality order (image, text): the contiguous segments (0 for
        an absent modality), the contract of the grouped per-modality modules."""
        return (self.image_rows, self.total_rows - self.image_rows)

    @property
    def batched_shape(self) -> tuple[int, int] | None:
        """``(B, L)`` when the rows are ``B`` sequences of one modality and one length ``L``
        (attention then runs in the batched layout), else None."""
        if self.cu_seqlens is not None:
            return None
        seq = self.seqlens[0]
        return (len(seq), seq[0]) if seq else None

    def _uniform_len(self, modality: int, what: str) -> int:
        seq = self._lens(modality)
        if len(set(seq)) > 1:
            raise ValueError(f"{what} is undefined: the sequences have lengths {sorted(set(seq))[:8]}")
        return seq[0] if seq else 0

    @property
    def image_len(self) -> int:
        """Tokens per image sequence (images always have one length)."""
        return self._uniform_len(IMAGE, "image_len")

    @property
    def text_len(self) -> int:
        """Tokens per text sequence when every caption has one length (raises otherwise)."""
        return self._uniform_len(TEXT, "text_len")

    # -- moving tokens in and out -----------------------------------------------------------
    def pack(self, image_tokens: torch.Tensor, text_tokens: torch.Tensor) -> torch.Tensor:
        """Image tokens ``(B_img, L_img, D)`` (or flat ``(rows, D)``) and text tokens
        ``(B_txt, L_txt, D)`` (or flat ``(rows, D)``, the ragged layout) -> ``(T, D)``."""
        D = image_tokens.shape[-1]
        xi, xt = image_tokens.reshape(-1, D), text_tokens.reshape(-1, D)
        want = self.group_sizes
        ok_i = image_tokens.dim() == 2 or tuple(image_tokens.shape[:2]) == (self.num_images, self.image_len)
        ok_t = text_tokens.dim() == 2 or (self.num_texts and tuple(text_tokens.shape[:2]) == (
            self.num_texts, self.text_len)) or text_tokens.numel() == 0
        if (xi.shape[0], xt.shape[0]) != want or not (ok_i and ok_t):
            raise ValueError(f"pack expects {want[0]} image rows and {want[1]} text rows "
                             f"({self.num_images} images, {self.num_texts} texts), got image tokens "
                             f"{tuple(image_tokens.shape)} and text tokens {tuple(text_tokens.shape)}")
        return torch.cat([xi, xt], 0)

    def split(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(T, D)`` -> flat image rows ``(image_rows, D)`` and text rows (views)."""
        if x.dim() != 2 or x.shape[0] != self.total_rows:
            raise ValueError(f"packed x must be ({self.total_rows}, D), got {tuple(x.shape)}")
        n = self.image_rows
        return x[:n], x[n:]

    def unpack(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(T, D)`` -> ``(B_img, L_img, D)`` and ``(B_txt, L_txt, D)`` views (text of one
        length only; ragged text: :meth:`split`)."""
        xi, xt = self.split(x)
        return (xi.view(self.num_images, self.image_len, -1), xt.view(self.num_texts, self.text_len, -1))


def _cumsum(lengths: Sequence[int]) -> torch.Tensor:
    cu = torch.zeros(len(lengths) + 1, dtype=torch.int64)
    if lengths:
        cu[1:] = torch.tensor(lengths, dtype=torch.int64).cumsum(0)
    return cu.to(torch.int32)


def text_lengths(tokens: torch.Tensor) -> torch.Tensor:
    """Length ``eot + 1`` of each caption: the tokens a causal text tower with EOT pooling
    actually needs (CLIP's EOT, 49407, is the largest id, so ``argmax`` finds it even when
    the caption holds token id 0, '!', which is also the padding id).

    Args:
        tokens: ``(B, context_length)`` int64/int32 token ids, on any device.
    Returns:
        ``(B,)`` int64 on the CPU. For CPU tokens this is free; for device tokens it is one
        device-to-host copy (a host sync), so hand the lengths over from the CPU tokens where
        you can (the data loader puts them in each batch as ``"text_lengths"``).
    Raises:
        ValueError: ``tokens`` is not a 2-d integer tensor with at least one column.
    """
    if tokens.dim() != 2 or tokens.shape[1] < 1:
        raise ValueError(f"tokens must be (B, context_length), got shape {tuple(tokens.shape)}")
    if tokens.is_floating_point() or tokens.is_complex() or tokens.dtype == torch.bool:
        raise ValueError(f"tokens must be an integer tensor (int64), got dtype {tokens.dtype}")
    return (tokens.argmax(dim=-1) + 1).to("cpu", torch.int64)
