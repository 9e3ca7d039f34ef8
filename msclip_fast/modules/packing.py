"""Packing metadata of a two-modality batch (DESIGN §3 Packed execution).

Image tokens and text tokens of one step are stacked into one ``(T, D)`` tensor, images first:
``T = B_img·L_img + B_txt·L_txt``. A shared block then runs QKV, out-projection and FFN as one
GEMM over all T rows, attention as one varlen call and each LayerNorm as one modality-indexed
call. Every tensor here is built on the host from the (known) shapes and copied to the device
once per forward, so no block ever reads a device value back (no host syncs).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .layer_norm import IMAGE, TEXT


@dataclass(frozen=True)
class PackedBatch:
    """Where each modality's sequences sit in a packed ``(T, D)`` tensor.

    Fields:
        cu_seqlens: ``(S+1,)`` int32 cumulative sequence starts, ``S = B_img + B_txt``.
        causal: ``(S,)`` bool, one flag per sequence (images False, texts True).
        modality_ids: ``(T,)`` int8 (0 image rows, then 1 text rows).
        num_images, image_len, num_texts, text_len: the host-side shapes.
        max_seqlen: the longest sequence, a host int (the varlen attention's ``max_seqlen``:
            passing it saves a device read-back per attention call).
    """

    cu_seqlens: torch.Tensor
    causal: torch.Tensor
    modality_ids: torch.Tensor
    num_images: int
    image_len: int
    num_texts: int
    text_len: int
    max_seqlen: int

    @property
    def image_rows(self) -> int:
        """Rows ``[0, image_rows)`` are image tokens; the rest are text tokens."""
        return self.num_images * self.image_len

    @property
    def total_rows(self) -> int:
        return self.image_rows + self.num_texts * self.text_len

    @property
    def group_sizes(self) -> tuple[int, int]:
        """Rows per modality in modality order (image, text): the contiguous segments."""
        return (self.image_rows, self.total_rows - self.image_rows)

    @classmethod
    def build(cls, num_images: int, image_len: int, num_texts: int, text_len: int,
              device: torch.device | str | None = None) -> "PackedBatch":
        """Metadata for ``num_images`` image sequences of ``image_len`` tokens followed by
        ``num_texts`` causal text sequences of ``text_len`` tokens.

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
        n_img = num_images * image_len
        # host tensors (arange on the CPU), then one copy each to the device
        cu = torch.cat([torch.arange(num_images + 1) * image_len,
                        n_img + torch.arange(1, num_texts + 1) * text_len]).to(torch.int32)
        causal = torch.cat([torch.zeros(num_images, dtype=torch.bool), torch.ones(num_texts, dtype=torch.bool)])
        ids = torch.cat([torch.full((n_img,), IMAGE, dtype=torch.int8),
                         torch.full((num_texts * text_len,), TEXT, dtype=torch.int8)])
        if device is not None and torch.device(device).type != "cpu":
            cu, causal, ids = (t.to(device, non_blocking=True) for t in (cu, causal, ids))
        max_seqlen = max(int(image_len) if num_images else 0, int(text_len) if num_texts else 0)
        return cls(cu, causal, ids, int(num_images), int(image_len), int(num_texts), int(text_len), max_seqlen)

    def pack(self, image_tokens: torch.Tensor, text_tokens: torch.Tensor) -> torch.Tensor:
        """``(B_img, L_img, D)`` and ``(B_txt, L_txt, D)`` -> ``(T, D)``, images first."""
        want_i = (self.num_images, self.image_len)
        want_t = (self.num_texts, self.text_len)
        if tuple(image_tokens.shape[:2]) != want_i or tuple(text_tokens.shape[:2]) != want_t:
            raise ValueError(f"pack expects image tokens {want_i + (-1,)} and text tokens {want_t + (-1,)}, "
                             f"got {tuple(image_tokens.shape)} and {tuple(text_tokens.shape)}")
        D = image_tokens.shape[-1]
        return torch.cat([image_tokens.reshape(-1, D), text_tokens.reshape(-1, D)], 0)

    def unpack(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(T, D)`` -> ``(B_img, L_img, D)`` and ``(B_txt, L_txt, D)`` views."""
        if x.dim() != 2 or x.shape[0] != self.total_rows:
            raise ValueError(f"packed x must be ({self.total_rows}, D), got {tuple(x.shape)}")
        n = self.image_rows
        return (x[:n].view(self.num_images, self.image_len, -1),
                x[n:].view(self.num_texts, self.text_len, -1))
