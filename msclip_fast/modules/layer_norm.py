"""ModalityLayerNorm: LayerNorm gains and biases of several modalities stacked ``(M, D)``.

MS-CLIP keeps every LayerNorm modality-specific while the rest of a block is shared
(You et al. 2022, §3.1). Storing the per-modality gains as one ``(M, D)`` tensor lets the
packed path (image and text tokens in one ``(T, D)`` tensor) normalize every row with its own
modality's gain in a single :func:`msclip_fast.ops.modality_layer_norm` call.
"""
from __future__ import annotations

import torch
from torch import nn

from .. import ops

IMAGE = 0
TEXT = 1
MODALITY_NAMES = ("image", "text")


class ModalityLayerNorm(nn.Module):
    """LayerNorm with one ``(D,)`` gain/bias row per modality, statistics in fp32.

    Args:
        width: normalized width ``D``.
        num_modalities: ``M``. With ``M == 1`` the single row serves every modality (a
            LayerNorm shared across modalities, or one that only one tower uses).
        eps: variance epsilon inside the square root (1e-12, TF style, as the official code).

    Parameters:
        weight: ``(M, D)`` float, initialized to 1.
        bias: ``(M, D)`` float, initialized to 0.
    """

    def __init__(self, width: int, num_modalities: int = 2, eps: float = 1e-12):
        super().__init__()
        if width <= 0:
            raise ValueError(f"width must be positive, got {width}")
        if num_modalities <= 0:
            raise ValueError(f"num_modalities must be positive, got {num_modalities}")
        self.width = width
        self.num_modalities = num_modalities
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(num_modalities, width))
        self.bias = nn.Parameter(torch.zeros(num_modalities, width))

    def forward(self, x: torch.Tensor, modality: int | torch.Tensor = 0, residual: torch.Tensor | None = None):
        """Normalize ``x``.

        Args:
            x: ``(..., D)`` activations, any float dtype (output in the same dtype).
            modality: an int in ``[0, M)`` for all rows, or an integer tensor ``x.shape[:-1]``
                with one id per row. Ignored when ``M == 1``.
            residual: optional tensor shaped like ``x`` added to ``x`` first.
        Returns:
            ``out`` shaped like ``x``; with ``residual`` the pair ``(out, x + residual)``.
        Raises:
            ValueError: an out-of-range modality id or a shape mismatch.
        """
        if self.num_modalities == 1:
            # One row for all modalities: an int id avoids a gather in the op.
            modality = 0
        elif isinstance(modality, int) and not 0 <= modality < self.num_modalities:
            raise ValueError(f"modality={modality} out of range for {self.num_modalities} modalities")
        return ops.modality_layer_norm(x, self.weight, self.bias, modality, eps=self.eps, residual=residual)

    def extra_repr(self) -> str:
        return f"{self.width}, num_modalities={self.num_modalities}, eps={self.eps}"
