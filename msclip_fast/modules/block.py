"""TransformerBlock: a pre-LN residual attention block (CLIP's ``ResidualAttentionBlock``) that
one or several modalities run, with each component either shared or per modality.

MS-CLIP (You et al. 2022) shares the attention and FFN weights of a block between the image
and the text tower and keeps its LayerNorms per modality; the ``share`` set selects any point
of that spectrum ({"attn", "mlp", "ln"}). A shared component is ONE module (one tensor per
weight); per-modality attention/FFN are a ModuleDict keyed by modality name; per-modality
LayerNorms are stacked ``(M, D)`` in one :class:`ModalityLayerNorm`.
"""
from __future__ import annotations

from typing import Iterable

import torch
from torch import nn

from .attention import ModalityParallelAttention, MultiheadSelfAttention
from .layer_norm import MODALITY_NAMES, ModalityLayerNorm
from .mlp import MLP, ModalityParallelFFN
from .packing import PackedBatch

SHARE_CHOICES = ("attn", "mlp", "ln")


class TransformerBlock(nn.Module):
    """``x += attn(ln_1(x)) [+ pattn_m(ln_1(x))]; x += mlp(ln_2(x)) [+ pffn_m(ln_2(x))]``.

    Args:
        width, heads: model width ``D`` and head count.
        modalities: global modality ids that run this block (0 image, 1 text), e.g. ``(0, 1)``
            for a block of both towers, ``(1,)`` for a text-only block.
        share: components that all ``modalities`` use in common (subset of SHARE_CHOICES);
            ignored for a single-modality block.
        mlp_ratio: FFN hidden = ``mlp_ratio * width``.
        act: FFN activation.
        eps: LayerNorm epsilon.
        parallel_ffn_dim: when > 0, a per-modality bottleneck FFN of that hidden width runs
            beside the (shared) FFN.
        parallel_attn_dim, parallel_attn_heads: when ``parallel_attn_dim`` > 0, a light
            per-modality attention of that width (in that many heads) runs beside the
            (shared) attention on the same normalized input.
    Raises:
        ValueError: a bad ``share`` entry, empty/duplicate/unknown modalities, bad widths.
    """

    def __init__(self, width: int, heads: int, modalities: Iterable[int] = (0, 1), share: Iterable[str] = (),
                 mlp_ratio: float = 4.0, act: str = "quick_gelu", eps: float = 1e-12, parallel_ffn_dim: int = 0,
                 parallel_attn_dim: int = 0, parallel_attn_heads: int = 1):
        super().__init__()
        self.modalities = tuple(int(m) for m in modalities)
        if not self.modalities or len(set(self.modalities)) != len(self.modalities) or any(
            m not in range(len(MODALITY_NAMES)) for m in self.modalities
        ):
            raise ValueError(f"modalities must be distinct ids in [0, {len(MODALITY_NAMES)}), got {self.modalities}")
        share = set(share)
        bad = share - set(SHARE_CHOICES)
        if bad:
            raise ValueError(f"share must be a subset of {SHARE_CHOICES}, got {sorted(share)}")
        single = len(self.modalities) == 1
        self.share = frozenset(SHARE_CHOICES) if single else frozenset(share)
        self.width, self.heads = width, heads
        hidden = int(round(mlp_ratio * width))

        def per_modality(make):
            if single:
                return make()
            return nn.ModuleDict({MODALITY_NAMES[m]: make() for m in self.modalities})

        self.attn = MultiheadSelfAttention(width, heads) if "attn" in self.share else per_modality(
            lambda: MultiheadSelfAttention(width, heads))
        n_ln = 1 if "ln" in self.share else len(self.modalities)
        self.ln_1 = ModalityLayerNorm(width, n_ln, eps)
        self.mlp = MLP(width, hidden, act) if "mlp" in self.share else per_modality(lambda: MLP(width, hidden, act))
        self.ln_2 = ModalityLayerNorm(width, n_ln, eps)
        self.parallel_ffn = (
            ModalityParallelFFN(width, parallel_ffn_dim, len(self.modalities), act) if parallel_ffn_dim > 0 else None
        )
        self.parallel_attn = (
            ModalityParallelAttention(width, parallel_attn_dim, parallel_attn_heads, len(self.modalities))
            if parallel_attn_dim > 0 else None
        )

    # -- helpers -------------------------------------------------------------------------
    def local_index(self, modality: int) -> int:
        """Position of global modality id ``modality`` in this block's modality list."""
        try:
            return self.modalities.index(int(modality))
        except ValueError:
            raise ValueError(f"modality {modality} does not run this block (modalities {self.modalities})") from None

    def _pick(self, module: nn.Module, local: int) -> nn.Module:
        if isinstance(module, nn.ModuleDict):
            return module[MODALITY_NAMES[self.modalities[local]]]
        return module

    def shared_parameter_names(self) -> set[str]:
        """Names (relative to this block) of parameters applied to every modality's tokens:
        shared attention/FFN, and LayerNorms when "ln" is shared. Per-modality rows stacked in
        one tensor (ModalityLayerNorm with M > 1, the parallel FFN) are not shared."""
        if len(self.modalities) < 2:
            return set()
        names = set()
        for prefix in ("attn", "mlp"):
            if prefix in self.share:
                names |= {f"{prefix}.{n}" for n, _ in getattr(self, prefix).named_parameters()}
        if "ln" in self.share:
            names |= {f"{ln}.{p}" for ln in ("ln_1", "ln_2") for p in ("weight", "bias")}
        return names

    def modality_parameters(self, modality: int) -> list[nn.Parameter]:
        """Every parameter tensor that ``modality``'s tokens use in this block (shared ones and
        stacked per-modality tensors included; other modalities' own modules excluded)."""
        i = self.local_index(modality)
        mods = [self._pick(self.attn, i), self._pick(self.mlp, i), self.ln_1, self.ln_2]
        mods += [m for m in (self.parallel_ffn, self.parallel_attn) if m is not None]
        return [p for m in mods for p in m.parameters()]

    def init_clip(self, layers: int) -> None:
        """open_clip ``init_parameters`` for a tower of ``layers`` blocks of this width."""
        attn_std = self.width**-0.5
        proj_std = self.width**-0.5 * (2 * layers) ** -0.5
        fc_std = (2 * self.width) ** -0.5
        for m in self.modules():
            if isinstance(m, MultiheadSelfAttention):
                m.reset_parameters(attn_std, proj_std)
            elif isinstance(m, MLP):
                m.reset_parameters(fc_std, proj_std)

    # -- forward -------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, modality: int, causal: bool = False) -> torch.Tensor:
        """Run one modality's tokens.

        Args:
            x: ``(B, L, D)`` tokens of one modality.
            modality: global modality id (0 image, 1 text); must be in ``self.modalities``.
            causal: causal self-attention (text) or bidirectional (image).
        Returns:
            ``(B, L, D)``.
        """
        i = self.local_index(modality)
        h = self.ln_1(x, i)
        a = self._pick(self.attn, i)(h, causal=causal)
        if self.parallel_attn is not None:
            a = a + self.parallel_attn(h, i, causal=causal)
        # fused residual add + LayerNorm: (ln_2(x + a), x + a)
        h, x = self.ln_2(a, i, residual=x)
        y = self._pick(self.mlp, i)(h)
        if self.parallel_ffn is not None:
            y = y + self.parallel_ffn(h, i)
        return x + y

    @property
    def can_pack(self) -> bool:
        """True when image and text rows can run this block in one packed call: both
        modalities (image 0, text 1) run it and its attention and FFN are shared."""
        return self.modalities == (0, 1) and {"attn", "mlp"} <= self.share

    def forward_packed(self, x: torch.Tensor, pack: PackedBatch, pending: torch.Tensor | None = None):
        """Run flat tokens ``(T, D)`` laid out by ``pack`` through this block (DESIGN §3): the
        one block step of the model's executor, for a single modality's (possibly ragged)
        sequences and for a packed two-modality batch alike.

        Two-modality batches (``pack.modalities == (0, 1)``; the block must :attr:`can_pack`):
        QKV, out-projection and both FFN GEMMs run once over all ``T`` rows; attention is one
        varlen call with a per-sequence causal flag and the host-side ``pack.max_seqlen`` (no
        host sync); each LayerNorm is one modality-indexed call (``pack.modality_ids``;
        block-local ids equal global ids since modalities are (0, 1)); the parallel modules,
        when present, are grouped calls over the two contiguous modality segments.
        Single-modality batches pick that modality's modules and LayerNorm rows; attention is
        batched ``(B, L, D)`` when every sequence has one length, else varlen.

        The block's final residual add is left to the caller (returned as ``(x, y)`` with
        output ``x + y``) so that the next block can fuse it into its first LayerNorm: pass
        the previous block's ``y`` as ``pending``.

        Args:
            x: ``(T, D)`` tokens (the residual stream, without ``pending``).
            pack: the batch's :class:`PackedBatch`.
            pending: ``(T, D)`` residual update still to be added to ``x``, or None.
        Returns:
            ``(x, y)``, both ``(T, D)``; the block output is ``x + y``.
        Raises:
            ValueError: a modality that does not run this block, two modalities on a block
                that cannot pack (see :attr:`can_pack`), or bad shapes.
        """
        if x.dim() != 2 or x.shape[0] != pack.total_rows:
            raise ValueError(f"packed x must be ({pack.total_rows}, {self.width}), got {tuple(x.shape)}")
        if len(pack.modalities) == 1:
            i = self.local_index(pack.modalities[0])
            attn, mlp, ids = self._pick(self.attn, i), self._pick(self.mlp, i), i
        else:
            if not self.can_pack:
                raise ValueError(f"packed execution needs a block of modalities (0, 1) with shared attn and mlp; "
                                 f"this one has modalities={self.modalities}, share={sorted(self.share)}")
            attn, mlp, ids = self.attn, self.mlp, pack.modality_ids
        if pending is None:
            h = self.ln_1(x, ids)
        else:
            h, x = self.ln_1(pending, ids, residual=x)
        a = self._attend(attn, h, pack)
        if self.parallel_attn is not None:
            a = a + self._attend_parallel(h, pack, ids)
        h, x = self.ln_2(a, ids, residual=x)
        y = mlp(h)
        if self.parallel_ffn is not None:
            y = y + (self.parallel_ffn(h, ids) if isinstance(ids, int)
                     else self.parallel_ffn.forward_grouped(h, pack.group_sizes))
        return x, y

    @staticmethod
    def _attend(attn: MultiheadSelfAttention, h: torch.Tensor, pack: PackedBatch) -> torch.Tensor:
        shape = pack.batched_shape
        if shape is not None:
            return attn(h.view(*shape, -1), causal=pack.causal).view(h.shape)
        return attn(h, causal=pack.causal, cu_seqlens=pack.cu_seqlens, max_seqlen=pack.max_seqlen)

    def _attend_parallel(self, h: torch.Tensor, pack: PackedBatch, ids) -> torch.Tensor:
        shape = pack.batched_shape
        if shape is not None:
            return self.parallel_attn(h.view(*shape, -1), ids, causal=pack.causal).view(h.shape)
        if isinstance(ids, int):  # one modality, ragged: all rows in that modality's segment
            sizes = [0] * len(self.modalities)
            sizes[ids] = h.shape[0]
        else:
            sizes = pack.group_sizes
        return self.parallel_attn.forward_grouped(h, sizes, pack.cu_seqlens, pack.causal, pack.max_seqlen)

    def extra_repr(self) -> str:
        return f"modalities={self.modalities}, share={sorted(self.share)}"
