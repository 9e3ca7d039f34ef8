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


class ModalityParallelAttention(nn.Module):
    """A light per-modality self-attention run beside a shared block's attention (MS-CLIP's
    modality-specific parallel modules, DESIGN §2 option): modality ``m``'s tokens get
    ``out_m(attn(qkv_m(x)))`` with ``hidden`` channels in ``heads`` heads, added to the shared
    attention's output. Weights are stacked ``[M, ...]`` so that a packed batch applies them
    in one grouped call: segmented QKV and output GEMMs (each modality's weights meet exactly
    its own rows) around ONE varlen attention call over every sequence.

    Parameters:
        in_proj_weight ``(M, 3R, D)``, in_proj_bias ``(M, 3R)``, out_weight ``(M, D, R)``,
        out_bias ``(M, D)``. ``out_weight`` starts at zero, so the module adds nothing at init
        (adapter practice, as the parallel FFN).

    Args:
        width: model width ``D``; hidden: ``R`` (a multiple of ``heads``); heads: head count;
        num_modalities: ``M``.
    Raises:
        ValueError: non-positive sizes, or ``heads`` not dividing ``hidden``.
    """

    def __init__(self, width: int, hidden: int, heads: int, num_modalities: int = 2):
        super().__init__()
        if hidden <= 0 or heads <= 0 or hidden % heads:
            raise ValueError(f"parallel attention needs hidden > 0 divisible by heads > 0, got hidden={hidden}, "
                             f"heads={heads}")
        self.width, self.hidden, self.heads, self.num_modalities = width, hidden, heads, num_modalities
        self.in_proj_weight = nn.Parameter(torch.empty(num_modalities, 3 * hidden, width))
        self.in_proj_bias = nn.Parameter(torch.zeros(num_modalities, 3 * hidden))
        self.out_weight = nn.Parameter(torch.zeros(num_modalities, width, hidden))
        self.out_bias = nn.Parameter(torch.zeros(num_modalities, width))
        nn.init.normal_(self.in_proj_weight, std=width**-0.5)

    def _qkv(self, x: torch.Tensor, m: int) -> torch.Tensor:
        return F.linear(x, self.in_proj_weight[m], self.in_proj_bias[m])

    def _out(self, o: torch.Tensor, m: int) -> torch.Tensor:
        return F.linear(o, self.out_weight[m], self.out_bias[m])

    def forward(self, x: torch.Tensor, modality: int, causal: bool = False) -> torch.Tensor:
        """One modality's tokens ``(B, L, D)`` -> ``(B, L, D)`` (batched attention layout)."""
        if not 0 <= int(modality) < self.num_modalities:
            raise ValueError(f"modality={modality} out of range for {self.num_modalities} modalities")
        if x.dim() != 3:
            raise ValueError(f"x must be (B, L, D), got shape {tuple(x.shape)}")
        B, L, _ = x.shape
        H, K = self.heads, self.hidden // self.heads
        q, k, v = self._qkv(x, modality).view(B, L, 3, H, K).permute(2, 0, 3, 1, 4).unbind(0)
        o = ops.attention(q, k, v, causal=causal).transpose(1, 2).reshape(B, L, self.hidden)
        return self._out(o, modality)

    def forward_grouped(self, x: torch.Tensor, group_sizes, cu_seqlens: torch.Tensor, causal,
                        max_seqlen: int | None = None) -> torch.Tensor:
        """Modality ``m``'s weights on the ``m``-th contiguous row segment of packed ``x``.

        Args:
            x: ``(T, D)`` rows sorted by modality; group_sizes: ``M`` host ints summing to T.
            cu_seqlens, causal, max_seqlen: the varlen layout of the whole batch (as
                :func:`msclip_fast.ops.attention`): no sequence crosses a segment boundary.
        Returns:
            ``(T, D)``.
        Raises:
            ValueError: group sizes that do not match ``M`` or ``T``.
        """
        sizes = [int(n) for n in group_sizes]
        if len(sizes) != self.num_modalities or any(n < 0 for n in sizes) or sum(sizes) != x.shape[0]:
            raise ValueError(f"group_sizes must be {self.num_modalities} non-negative ints summing to "
                             f"{x.shape[0]} rows, got {sizes}")
        segs = [(m, seg) for m, seg in enumerate(torch.split(x, sizes, 0)) if seg.shape[0]]
        qkv = torch.cat([self._qkv(seg, m) for m, seg in segs], 0)
        T, H, K = x.shape[0], self.heads, self.hidden // self.heads
        q, k, v = qkv.view(T, 3, H, K).unbind(1)
        o = ops.attention(q, k, v, cu_seqlens=cu_seqlens, causal=causal, max_seqlen=max_seqlen).reshape(T, -1)
        outs = [self._out(seg, m) for (m, _), seg in zip(segs, torch.split(o, [s.shape[0] for _, s in segs], 0))]
        return torch.cat(outs, 0) if len(outs) > 1 else outs[0]

    def extra_repr(self) -> str:
        return f"width={self.width}, hidden={self.hidden}, heads={self.heads}, num_modalities={self.num_modalities}"
