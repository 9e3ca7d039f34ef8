"""Feed-forward modules: CLIP's MLP (``c_fc`` -> act -> ``c_proj``) with the bias+activation
fused through :func:`msclip_fast.ops.ffn`, and the optional per-modality parallel FFN."""
from __future__ import annotations

import torch
from torch import nn

from .. import ops


class MLP(nn.Module):
    """``c_proj(act(c_fc(x)))`` with hidden width ``ratio * width``.

    Args:
        width: input/output width ``D``.
        hidden: hidden width (CLIP: ``4 D``).
        act: "quick_gelu" (CLIP, MS-CLIP), "gelu" or "gelu_tanh".
    """

    def __init__(self, width: int, hidden: int, act: str = "quick_gelu"):
        super().__init__()
        if act not in ops.ACTIVATIONS:
            raise ValueError(f"act must be one of {ops.ACTIVATIONS}, got {act!r}")
        self.act = act
        self.c_fc = nn.Linear(width, hidden)
        self.c_proj = nn.Linear(hidden, width)

    def reset_parameters(self, fc_std: float, proj_std: float) -> None:
        """CLIP init: normal weights; biases keep nn.Linear's default (as open_clip)."""
        nn.init.normal_(self.c_fc.weight, std=fc_std)
        nn.init.normal_(self.c_proj.weight, std=proj_std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(..., D) -> (..., D)``."""
        return ops.ffn(x, self.c_fc.weight, self.c_fc.bias, self.c_proj.weight, self.c_proj.bias, act=self.act)


class ModalityParallelFFN(nn.Module):
    """A light per-modality bottleneck FFN run beside a shared block's FFN (DESIGN §2 option):
    ``y = up_m(act(down_m(x)))`` with modality ``m``'s weights. Weights are stacked ``[M, ...]``
    so the packed path can apply them in one grouped call.

    Parameters:
        down_weight ``(M, R, D)``, down_bias ``(M, R)``, up_weight ``(M, D, R)``, up_bias ``(M, D)``.
        ``up_weight`` starts at zero, so the module adds nothing at init (adapter practice).
    """

    def __init__(self, width: int, hidden: int, num_modalities: int = 2, act: str = "quick_gelu"):
        super().__init__()
        if hidden <= 0:
            raise ValueError(f"parallel FFN hidden width must be positive, got {hidden}")
        if act not in ops.ACTIVATIONS:
            raise ValueError(f"act must be one of {ops.ACTIVATIONS}, got {act!r}")
        self.act, self.num_modalities = act, num_modalities
        self.down_weight = nn.Parameter(torch.empty(num_modalities, hidden, width))
        self.down_bias = nn.Parameter(torch.zeros(num_modalities, hidden))
        self.up_weight = nn.Parameter(torch.zeros(num_modalities, width, hidden))
        self.up_bias = nn.Parameter(torch.zeros(num_modalities, width))
        nn.init.normal_(self.down_weight, std=width**-0.5)

    def _one(self, x: torch.Tensor, m: int) -> torch.Tensor:
        return ops.ffn(x, self.down_weight[m], self.down_bias[m], self.up_weight[m], self.up_bias[m], act=self.act)

    def forward_grouped(self, x: torch.Tensor, group_sizes) -> torch.Tensor:
        """Apply modality ``m``'s FFN to the ``m``-th contiguous row segment of ``x``.

        The packed layout puts all rows of modality 0 (images) first, then modality 1 (text),
        so the grouped call over modalities is a segmented GEMM: each modality's weights meet
        exactly its own rows (no wasted FLOPs on other modalities' rows, no gather, no
        boolean masks and thus no host sync; segment sizes are host ints). On the reference
        path the segments are two GEMM pairs on views; a grouped-GEMM kernel can take the
        same ``(x, group_sizes)`` contract.

        Args:
            x: ``(T, D)`` rows sorted by modality.
            group_sizes: ``M`` host ints summing to ``T`` (rows per modality, in order).
        Returns:
            ``(T, D)``.
        Raises:
            ValueError: ``len(group_sizes) != M`` or sizes that do not sum to ``T``.
        """
        sizes = [int(n) for n in group_sizes]
        if len(sizes) != self.num_modalities or any(n < 0 for n in sizes) or sum(sizes) != x.shape[0]:
            raise ValueError(f"group_sizes must be {self.num_modalities} non-negative ints summing to "
                             f"{x.shape[0]} rows, got {sizes}")
        outs = [self._one(seg, m) for m, seg in enumerate(torch.split(x, sizes, 0)) if seg.shape[0]]
        return torch.cat(outs, 0) if len(outs) > 1 else outs[0]

    def forward(self, x: torch.Tensor, modality: int | torch.Tensor) -> torch.Tensor:
        """``x`` ``(..., D)``; ``modality`` an int or a ``x.shape[:-1]`` integer tensor."""
        if isinstance(modality, int):
            if not 0 <= modality < self.num_modalities:
                raise ValueError(f"modality={modality} out of range for {self.num_modalities} modalities")
            return self._one(x, modality)
        if modality.shape != x.shape[:-1]:
            raise ValueError(f"modality ids must have shape {tuple(x.shape[:-1])}, got {tuple(modality.shape)}")
        out = torch.zeros_like(x)
        for m in range(self.num_modalities):
            sel = modality == m
            if sel.any():
                out[sel] = self._one(x[sel], m)
        return out
