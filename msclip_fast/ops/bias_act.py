"""Bias + activation (the FFN's first nonlinearity): QuickGELU (CLIP), exact GELU, tanh GELU."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from . import bias_act_triton as _bat
from . import ffn_triton as _ffnt
from .registry import Backend, Op

ACTIVATIONS = ("quick_gelu", "gelu", "gelu_tanh")


def validate_bias_act(x, bias=None, act: str = "quick_gelu") -> None:
    """The op's input validation (run once, before backend selection; the reference calls it
    too). Raises ValueError naming the field."""
    if act not in ACTIVATIONS:
        raise ValueError(f"act must be one of {ACTIVATIONS}, got {act!r}")
    if not x.is_floating_point():
        raise ValueError(f"x must be a floating tensor, got dtype {x.dtype}")
    if bias is not None and bias.shape != x.shape[-1:]:
        raise ValueError(f"bias must be ({x.shape[-1]},), got {tuple(bias.shape)}")


def bias_act_ref(x, bias=None, act: str = "quick_gelu"):
    """Plain PyTorch reference for :func:`bias_act` (same arguments)."""
    validate_bias_act(x, bias, act)
    return _bias_act_ref(x, bias, act)


def _bias_act_ref(x, bias=None, act: str = "quick_gelu"):
    """The "reference" backend (inputs validated by the op)."""
    if bias is not None:
        x = x + bias
    if act == "quick_gelu":
        return x * torch.sigmoid(1.702 * x)
    return F.gelu(x, approximate="tanh" if act == "gelu_tanh" else "none")


_OP = Op("bias_act", validate=validate_bias_act)
_OP.register(Backend("reference", _bias_act_ref))
# "triton" first: auto takes it for CUDA tensors, the reference for CPU tensors
_OP.register(
    Backend("triton", _bat.bias_act_triton, supports=_bat.triton_supports, available=_bat.triton_available,
            auto_skip=_bat.triton_auto_skip),
    before="reference",
)


def bias_act(x, bias=None, act: str = "quick_gelu", backend: str = "auto"):
    """``act(x + bias)``.

    Args:
        x: ``(..., N)`` pre-activations, any float dtype.
        bias: ``(N,)`` or None.
        act: "quick_gelu" (``x·σ(1.702x)``, Radford et al. 2021), "gelu" (erf, Hendrycks &
            Gimpel 2016) or "gelu_tanh" (tanh approximation).
        backend: "auto", "reference" or "triton" (CUDA tensors, fp32/fp16/bf16; CPU tensors
            under ``TRITON_INTERPRET=1``).
    Returns:
        Tensor shaped like ``x``.
    Raises:
        ValueError: unknown ``act``, a bias of the wrong shape, or an unusable backend.
    """
    if torch.compiler.is_compiling():  # one opaque custom-op node (see .custom_ops)
        from . import custom_ops

        return custom_ops.bias_act(x, bias, act, backend)
    return _OP(x, bias, act=act, backend=backend)


bias_act.op = _OP


def validate_ffn(x, fc_weight, fc_bias, proj_weight, proj_bias, act: str = "quick_gelu") -> None:
    """The op's input validation (run once, before backend selection; the reference calls it
    too). Raises ValueError naming the field."""
    if act not in ACTIVATIONS:
        raise ValueError(f"act must be one of {ACTIVATIONS}, got {act!r}")
    if not x.is_floating_point():
        raise ValueError(f"x must be a floating tensor, got dtype {x.dtype}")
    if fc_weight.dim() != 2 or fc_weight.shape[1] != x.shape[-1]:
        raise ValueError(f"fc_weight must be (N, {x.shape[-1]}), got {tuple(fc_weight.shape)}")
    if proj_weight.dim() != 2 or proj_weight.shape[1] != fc_weight.shape[0]:
        raise ValueError(f"proj_weight must be (D_out, {fc_weight.shape[0]}), got {tuple(proj_weight.shape)}")
    if fc_bias is not None and fc_bias.shape != fc_weight.shape[:1]:
        raise ValueError(f"fc_bias must be ({fc_weight.shape[0]},), got {tuple(fc_bias.shape)}")
    if proj_bias is not None and proj_bias.shape != proj_weight.shape[:1]:
        raise ValueError(f"proj_bias must be ({proj_weight.shape[0]},), got {tuple(proj_bias.shape)}")


def ffn_ref(x, fc_weight, fc_bias, proj_weight, proj_bias, act: str = "quick_gelu"):
    """Plain PyTorch reference for :func:`ffn` (same arguments): Linear → bias_act → Linear."""
    validate_ffn(x, fc_weight, fc_bias, proj_weight, proj_bias, act)
    return _ffn_ref(x, fc_weight, fc_bias, proj_weight, proj_bias, act)


def _ffn_ref(x, fc_weight, fc_bias, proj_weight, proj_bias, act: str = "quick_gelu"):
    """The "reference" backend (inputs validated by the op)."""
    return F.linear(_bias_act_ref(F.linear(x, fc_weight), fc_bias, act), proj_weight, proj_bias)


_FFN = Op("ffn", validate=validate_ffn)
_FFN.register(Backend("reference", _ffn_ref))
_FFN.register(
    Backend("triton", _ffnt.ffn_triton, supports=_ffnt.triton_supports, available=_ffnt.triton_available,
            auto_skip=_ffnt.triton_auto_skip),
    before="reference",
)


def ffn(x, fc_weight, fc_bias, proj_weight, proj_bias, act: str = "quick_gelu", backend: str = "auto"):
    """The transformer FFN ``proj(act(fc(x)))`` = ``act(x W1ᵀ + b1) W2ᵀ + b2``.

    The "triton" backend saves only ``x`` and the pre-activation ``x W1ᵀ`` for backward and
    recomputes the activation there (one elementwise kernel), so the hidden-width tensor is
    stored once instead of twice (eager Linear → act → Linear keeps both). Parameters are
    plain tensors so one call serves ``nn.Linear`` weights (``c_fc.weight`` ...) and the
    stacked per-modality weights of the parallel FFN (``down_weight[m]`` ...).

    Args:
        x: ``(..., D)`` input, any float dtype (under autocast the GEMMs follow autocast).
        fc_weight: ``(N, D)``; fc_bias: ``(N,)`` or None.
        proj_weight: ``(D_out, N)``; proj_bias: ``(D_out,)`` or None.
        act: "quick_gelu", "gelu" or "gelu_tanh".
        backend: "auto", "reference" or "triton" (CUDA tensors, fp32/fp16/bf16; CPU tensors
            under ``TRITON_INTERPRET=1``).
    Returns:
        ``(..., D_out)`` in the GEMMs' dtype.
    Raises:
        ValueError: unknown ``act``, mismatched shapes, or an unusable backend.
    """
    if torch.compiler.is_compiling():  # one opaque custom-op node (see .custom_ops)
        from . import custom_ops

        return custom_ops.ffn(x, fc_weight, fc_bias, proj_weight, proj_bias, act, backend)
    return _FFN(x, fc_weight, fc_bias, proj_weight, proj_bias, act=act, backend=backend)


ffn.op = _FFN
