"""Multi-head self-attention with CLIP's parameter layout (``in_proj_weight`` ``(3D, D)``,
``in_proj_bias`` ``(3D,)``, ``out_proj`` Linear), computed through :func:`msclip_fast.ops.attention`.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .. import ops


class MultiheadSelfAttention(nn.Module):
    """Self-attention (Vaswani et al. 2017) as in ``nn.MultiheadAttention`` (same parameter names,
    so CLIP/MS-CLIP state dicts map one to one), but batch-first and dispatched to ops.

    Args:
        width: model width ``D``; ``heads`` must divide it.
        heads: number of heads ``H`` (head dim ``K = D / H``).
    """

    def __init__(self, width: int, heads: int):
        super().__init__()
        if heads <= 0 or width % heads:
            raise ValueError(f"heads must be a positive divisor of width={width}, got {heads}")
        self.width, self.heads = width, heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * width, width))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * width))
        self.out_proj = nn.Linear(width, width)
        self.reset_parameters()

    def reset_parameters(self, attn_std: float | None = None, proj_std: float | None = None) -> None:
        """CLIP init (open_clip ``init_parameters``): normal weights, zero biases."""
        attn_std = self.width**-0.5 if attn_std is None else attn_std
        proj_std = self.width**-0.5 if proj_std is None else proj_std
        nn.init.normal_(self.in_proj_weight, std=attn_std)
        nn.init.zeros_(self.in_proj_bias)
        nn.init.normal_(self.out_proj.weight, std=proj_std)
        nn.init.zeros_(self.out_proj.bias)

    def forward(self, x: torch.Tensor, causal: bool | torch.Tensor = False,
                cu_seqlens: torch.Tensor | None = None, max_seqlen: int | None = None) -> torch.Tensor:
        """Attend.

        Args:
            x: ``(B, L, D)``; or packed ``(T, D)`` with ``cu_seqlens``.
            causal: bool (batched), or bool / ``(S,)`` bool tensor (packed, one per sequence).
            cu_seqlens: ``(S+1,)`` int32 sequence starts for the packed layout.
            max_seqlen: packed layout: the longest sequence as a host int (e.g.
                :attr:`PackedBatch.max_seqlen`), so the varlen kernel needs no host sync to
                size its grid; None lets the op read it from ``cu_seqlens``.
        Returns:
            Tensor shaped like ``x``.
        """
        H, K = self.heads, self.width // self.heads
        qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias)
        if cu_seqlens is None:
            if max_seqlen is not None:
                raise ValueError(f"max_seqlen={max_seqlen!r} is for the packed layout (it needs cu_seqlens)")
            if x.dim() != 3:
                raise ValueError(f"x must be (B, L, D) without cu_seqlens, got shape {tuple(x.shape)}")
            B, L, _ = x.shape
            q, k, v = qkv.view(B, L, 3, H, K).permute(2, 0, 3, 1, 4).unbind(0)  # each (B, H, L, K)
            o = ops.attention(q, k, v, causal=causal).transpose(1, 2).reshape(B, L, self.width)
        else:
            if x.dim() != 2:
                raise ValueError(f"x must be (T, D) with cu_seqlens, got shape {tuple(x.shape)}")
            T = x.shape[0]
            q, k, v = qkv.view(T, 3, H, K).unbind(1)  # each (T, H, K)
            o = ops.attention(q, k, v, cu_seqlens=cu_seqlens, causal=causal, max_seqlen=max_seqlen)
            o = o.reshape(T, self.width)
        return self.out_proj(o)

    def extra_repr(self) -> str:
        return f"width={self.width}, heads={self.heads}"
