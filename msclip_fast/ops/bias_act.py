"""Bias + activation (the FFN's first nonlinearity): QuickGELU (CLIP), exact GELU, tanh GELU."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .registry import Backend, Op

ACTIVATIONS = ("quick_gelu", "gelu", "gelu_tanh")


def bias_act_ref(x, bias=None, act: str = "quick_gelu"):
    """Plain PyTorch reference for :func:`bias_act` (same arguments)."""
    if act not in ACTIVATIONS:
        raise ValueError(f"act must be one of {ACTIVATIONS}, got {act!r}")
    if bias is not None:
        if bias.shape != x.shape[-1:]:
            raise ValueError(f"bias must be ({x.shape[-1]},), got {tuple(bias.shape)}")
        x = x + bias
    if act == "quick_gelu":
        return x * torch.sigmoid(1.702 * x)
    return F.gelu(x, approximate="tanh" if act == "gelu_tanh" else "none")


_OP = Op("bias_act")
_OP.register(Backend("reference", bias_act_ref))


def bias_act(x, bias=None, act: str = "quick_gelu", backend: str = "auto"):
    """``act(x + bias)``.

    Args:
        x: ``(..., N)`` pre-activations, any float dtype.
        bias: ``(N,)`` or None.
        act: "quick_gelu" (``x·σ(1.702x)``, Radford et al. 2021), "gelu" (erf, Hendrycks &
            Gimpel 2016) or "gelu_tanh" (tanh approximation).
        backend: "auto" or "reference".
    Returns:
        Tensor shaped like ``x``.
    Raises:
        ValueError: unknown ``act``, a bias of the wrong shape, or an unusable backend.
    """
    return _OP(x, bias, act=act, backend=backend)


bias_act.op = _OP
