"""Drop-in replacements for torch/open_clip transformer pieces, computed through :mod:`msclip_fast.ops`.

Each module takes over the parameter tensors of the module it replaces (the same
``nn.Parameter`` objects under the same names), so state dicts, optimizers and
``requires_grad`` flags carry over unchanged, and keeps the original module as ``_orig``
(not registered: it adds no state-dict keys) so that it can be put back
(:func:`msclip_fast.integrations.open_clip.unpatch`).

- :class:`DropInMultiheadAttention` replaces a self-attention ``torch.nn.MultiheadAttention``
  (keys ``in_proj_weight``, ``in_proj_bias``, ``out_proj.weight``, ``out_proj.bias``).
- :class:`DropInAttention` replaces open_clip's custom ``transformer.Attention`` class (same
  keys; its plain configuration only: no qk-norm, scaled cosine, head scale or inner norm).
- :class:`DropInLayerNorm` replaces a ``(D,)`` LayerNorm (keys ``weight``, ``bias``) by
  :func:`msclip_fast.ops.modality_layer_norm` with one modality.
- :class:`DropInMLP` replaces CLIP's ``c_fc -> act -> c_proj`` MLP (keys ``c_fc.*``, ``c_proj.*``)
  by :func:`msclip_fast.ops.ffn`.

This module imports only torch and :mod:`msclip_fast.ops` (DESIGN §4); the checks of which
open_clip modules these may replace live in :mod:`msclip_fast.integrations.open_clip`.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .. import ops

__all__ = [
    "DropInAttention",
    "DropInLayerNorm",
    "DropInMLP",
    "DropInMultiheadAttention",
    "is_causal_mask",
    "multihead_attention_unsupported",
]


def is_causal_mask(mask: torch.Tensor, L: int) -> bool:
    """Whether ``mask`` is exactly the ``(L, L)`` causal attention mask, in either torch
    convention: additive float (``-inf`` strictly above the diagonal, ``0`` elsewhere, as
    open_clip's ``build_causal_mask``) or bool (True strictly above the diagonal = masked).

    Reads the mask back to the host (one sync on a device tensor).
    """
    if mask.dim() != 2 or tuple(mask.shape) != (L, L):
        return False
    upper = torch.ones(L, L, dtype=torch.bool, device=mask.device).triu_(1)
    if mask.dtype == torch.bool:
        return bool(torch.equal(mask, upper))
    if not mask.is_floating_point():
        return False
    want = torch.zeros(L, L, dtype=mask.dtype, device=mask.device).masked_fill_(upper, float("-inf"))
    return bool(torch.equal(mask, want))


class _SelfAttentionBase(nn.Module):
    """Shared body of the attention drop-ins: packed QKV projection ``(3D, D)``, heads split
    as ``nn.MultiheadAttention`` splits them (head ``h`` owns channels ``h·K .. (h+1)·K`` of
    each of q, k, v), :func:`msclip_fast.ops.attention` with ``scale = 1/sqrt(K)``, output
    projection."""

    def _take(self, orig: nn.Module, num_heads: int, backend: str) -> None:
        self.embed_dim = int(orig.in_proj_weight.shape[1])
        self.num_heads = int(num_heads)
        if self.num_heads <= 0 or self.embed_dim % self.num_heads:
            raise ValueError(f"num_heads must be a positive divisor of embed_dim={self.embed_dim}, got {num_heads}")
        self.head_dim = self.embed_dim // self.num_heads
        self.backend = backend
        self.register_parameter("in_proj_weight", orig.in_proj_weight)
        self.register_parameter("in_proj_bias", orig.in_proj_bias)  # may be None (no qkv bias)
        self.out_proj = orig.out_proj
        object.__setattr__(self, "_orig", orig)  # not a submodule: no duplicate state-dict keys
        self._mask_seen = None  # (mask tensor, its _version, L, causal?) of the last mask checked
        self.train(orig.training)

    def _causal_from_mask(self, attn_mask: torch.Tensor | None, L: int) -> bool:
        """``False`` for no mask, ``True`` for exactly the causal mask, else ValueError. The
        result for a mask tensor is remembered (by identity and version counter), so the
        check, one host sync, runs once per distinct mask, not once per call."""
        if attn_mask is None:
            return False
        seen = self._mask_seen
        if seen is not None and seen[0] is attn_mask and seen[1] == attn_mask._version and seen[2] == L:
            ok = seen[3]
        else:
            ok = is_causal_mask(attn_mask, L)
            self._mask_seen = (attn_mask, attn_mask._version, L, ok)
        if not ok:
            raise ValueError(
                f"attn_mask of shape {tuple(attn_mask.shape)} and dtype {attn_mask.dtype} is neither None nor the "
                f"({L}, {L}) causal mask; {type(self).__name__} supports only those (unpatch the model to use "
                "other masks)"
            )
        return True

    def _attend(self, x: torch.Tensor, causal: bool) -> torch.Tensor:
        """``x`` ``(B, L, D)`` -> ``(B, L, D)``."""
        if x.dim() != 3 or x.shape[-1] != self.embed_dim:
            raise ValueError(f"x must be (B, L, {self.embed_dim}), got shape {tuple(x.shape)}")
        B, L, D = x.shape
        H, K = self.num_heads, self.head_dim
        qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias)
        q, k, v = qkv.view(B, L, 3, H, K).permute(2, 0, 3, 1, 4).unbind(0)  # each (B, H, L, K)
        o = ops.attention(q, k, v, causal=causal, backend=self.backend)
        return self.out_proj(o.transpose(1, 2).reshape(B, L, D))

    def extra_repr(self) -> str:
        return f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, backend={self.backend!r}"


class DropInMultiheadAttention(_SelfAttentionBase):
    """Self-attention with ``torch.nn.MultiheadAttention``'s parameters, call signature and
    return value, computed by :func:`msclip_fast.ops.attention` (as open_clip's
    ``ResidualAttentionBlock.attention`` calls it: ``attn(x, x, x, need_weights=False,
    attn_mask=mask)[0]``).

    Args:
        orig: the ``nn.MultiheadAttention`` to take over: self-attention layout
            (``_qkv_same_embed_dim``), no ``bias_k``/``bias_v``, no ``add_zero_attn``, dropout 0.
            Its parameters become this module's; it is kept as ``_orig``.
        backend: the attention op's backend ("auto", "reference", "triton", ...).
    Forward:
        ``query`` ``(B, L, D)`` with ``batch_first`` (``(L, B, D)`` without); ``key`` and
        ``value`` must be the same tensor as ``query`` (or None); any float dtype.
        ``attn_mask``: None (bidirectional) or exactly the ``(L, L)`` causal mask (float
        ``-inf`` above the diagonal, or bool); ``is_causal=True`` also selects causal.
        Returns ``(out, None)``, ``out`` shaped like ``query``.
    Raises:
        ValueError: an unsupported ``orig`` at construction; at call time cross-attention
            inputs, ``key_padding_mask``, ``need_weights=True`` or any other ``attn_mask``.
    """

    def __init__(self, orig: nn.MultiheadAttention, backend: str = "auto"):
        super().__init__()
        reasons = multihead_attention_unsupported(orig)
        if reasons:
            raise ValueError(f"orig ({type(orig).__name__}) cannot be replaced: " + "; ".join(reasons))
        self.batch_first = bool(orig.batch_first)
        self._take(orig, orig.num_heads, backend)

    def forward(self, query, key=None, value=None, key_padding_mask=None, need_weights=True, attn_mask=None,
                average_attn_weights=True, is_causal=False):
        if (key is not None and key is not query) or (value is not None and value is not query):
            raise ValueError("key and value must be query itself (self-attention) in DropInMultiheadAttention")
        if key_padding_mask is not None:
            raise ValueError("key_padding_mask is not supported by DropInMultiheadAttention (unpatch to use it)")
        if need_weights:
            raise ValueError("need_weights=True is not supported by DropInMultiheadAttention (pass need_weights=False)")
        x = query if self.batch_first else query.transpose(0, 1)
        if x.dim() != 3:
            raise ValueError(f"query must be 3-D (batched), got shape {tuple(query.shape)}")
        causal = self._causal_from_mask(attn_mask, x.shape[1]) or bool(is_causal)
        out = self._attend(x, causal)
        return (out if self.batch_first else out.transpose(0, 1)), None


def multihead_attention_unsupported(m: nn.Module) -> list[str]:
    """Reasons why :class:`DropInMultiheadAttention` cannot replace ``m`` (empty: it can)."""
    if type(m) is not nn.MultiheadAttention:
        return [f"type {type(m).__module__}.{type(m).__qualname__} is not torch.nn.MultiheadAttention"]
    reasons = []
    if not m._qkv_same_embed_dim or m.in_proj_weight is None:
        reasons.append("kdim/vdim differ from embed_dim (separate q/k/v projections)")
    if m.bias_k is not None or m.bias_v is not None:
        reasons.append("add_bias_kv=True")
    if m.add_zero_attn:
        reasons.append("add_zero_attn=True")
    if m.dropout:
        reasons.append(f"attention dropout={m.dropout}")
    return reasons


class DropInAttention(_SelfAttentionBase):
    """open_clip's custom ``transformer.Attention`` (used by ``CustomResidualAttentionBlock``,
    ``block_type="custom"``) in its plain configuration, computed by
    :func:`msclip_fast.ops.attention`.

    Args:
        orig: the open_clip ``Attention`` to take over. The caller checks that it has no
            qk-norm, scaled cosine attention, head scale, inner norm or dropout (see
            :func:`msclip_fast.integrations.open_clip.patch`). Kept as ``_orig``.
        backend: the attention op's backend.
    Forward:
        ``x`` ``(B, L, D)`` float; ``attn_mask`` None or exactly the ``(L, L)`` causal mask.
        Returns ``(B, L, D)``.
    Raises:
        ValueError: any other ``attn_mask``, or a wrongly shaped ``x``.
    """

    def __init__(self, orig: nn.Module, backend: str = "auto"):
        super().__init__()
        self._take(orig, orig.num_heads, backend)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        if x.dim() != 3:
            raise ValueError(f"x must be (B, L, D), got shape {tuple(x.shape)}")
        return self._attend(x, self._causal_from_mask(attn_mask, x.shape[1]))


class DropInLayerNorm(nn.Module):
    """LayerNorm over the last dim with a ``(D,)`` gain and bias (``nn.LayerNorm``'s names),
    computed by :func:`msclip_fast.ops.modality_layer_norm` with the weights viewed as
    ``(1, D)`` and modality 0: statistics in fp32 (fp64 for fp64 input), output in the input's
    dtype (as open_clip's ``LayerNorm`` / ``LayerNormFp32``, which cast back), the original eps.

    Args:
        orig: an ``nn.LayerNorm`` over one dim with both affine weight and bias; its
            parameters become this module's; it is kept as ``_orig``.
        backend: the LayerNorm op's backend.
    Forward:
        ``x`` ``(..., D)`` float -> same shape and dtype.
    Raises:
        ValueError: an ``orig`` without ``(D,)`` weight and bias.
    """

    def __init__(self, orig: nn.LayerNorm, backend: str = "auto"):
        super().__init__()
        shape = tuple(getattr(orig, "normalized_shape", ()))
        if len(shape) != 1 or getattr(orig, "weight", None) is None or getattr(orig, "bias", None) is None:
            raise ValueError(f"orig must normalize one dim with weight and bias, got normalized_shape={shape}, "
                             f"weight={getattr(orig, 'weight', None) is not None}, "
                             f"bias={getattr(orig, 'bias', None) is not None}")
        self.normalized_shape = shape
        self.eps = float(orig.eps)
        self.backend = backend
        self.weight = orig.weight
        self.bias = orig.bias
        object.__setattr__(self, "_orig", orig)
        self.train(orig.training)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w, b = self.weight.view(1, -1), self.bias.view(1, -1)
        return ops.modality_layer_norm(x, w, b, 0, eps=self.eps, backend=self.backend)

    def extra_repr(self) -> str:
        return f"{self.normalized_shape}, eps={self.eps}, backend={self.backend!r}"


class DropInMLP(nn.Module):
    """CLIP's MLP ``c_proj(act(c_fc(x)))`` (open_clip's ``nn.Sequential`` of ``c_fc``, an
    activation, ``c_proj``) computed by :func:`msclip_fast.ops.ffn` (bias + activation fused,
    the hidden pre-activation stored once on the Triton path).

    Args:
        orig: the module replaced (kept as ``_orig``); its ``c_fc`` and ``c_proj``
            ``nn.Linear`` children become this module's children under the same names.
        act: the activation of ``orig``, one of :data:`msclip_fast.ops.ACTIVATIONS`
            ("quick_gelu", "gelu" (erf), "gelu_tanh").
        backend: the ffn op's backend.
    Forward:
        ``x`` ``(..., D)`` float -> ``(..., D_out)``.
    Raises:
        ValueError: an unknown ``act``, or ``c_fc``/``c_proj`` that are not ``nn.Linear``.
    """

    def __init__(self, orig: nn.Module, act: str, backend: str = "auto"):
        super().__init__()
        if act not in ops.ACTIVATIONS:
            raise ValueError(f"act must be one of {ops.ACTIVATIONS}, got {act!r}")
        fc, proj = getattr(orig, "c_fc", None), getattr(orig, "c_proj", None)
        if not isinstance(fc, nn.Linear) or not isinstance(proj, nn.Linear):
            raise ValueError(f"orig must have nn.Linear c_fc and c_proj, got {type(fc).__name__}, {type(proj).__name__}")
        self.act = act
        self.backend = backend
        self.c_fc = fc
        self.c_proj = proj
        object.__setattr__(self, "_orig", orig)
        self.train(orig.training)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.ffn(x, self.c_fc.weight, self.c_fc.bias, self.c_proj.weight, self.c_proj.bias, act=self.act,
                       backend=self.backend)

    def extra_repr(self) -> str:
        return f"act={self.act!r}, backend={self.backend!r}"
