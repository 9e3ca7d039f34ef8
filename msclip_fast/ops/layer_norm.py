"""Modality-indexed LayerNorm: one call normalizes rows of several modalities, each row with
the gain and bias of its own modality (MS-CLIP keeps every LayerNorm modality-specific while
sharing the rest of the block)."""
from __future__ import annotations

import torch

from . import layer_norm_triton as _lnt
from ._triton import triton_available
from .registry import Backend, Op


def _check(x, weight, bias, modality_ids, eps=1e-12):
    if not eps > 0:
        raise ValueError(f"eps must be > 0, got {eps}")
    if weight.dim() != 2 or bias.shape != weight.shape:
        raise ValueError(
            f"weight and bias must be (M, D) of one shape, got {tuple(weight.shape)} and {tuple(bias.shape)}"
        )
    if x.shape[-1] != weight.shape[1]:
        raise ValueError(f"x last dim ({x.shape[-1]}) must equal the LayerNorm width D ({weight.shape[1]})")
    M = weight.shape[0]
    if isinstance(modality_ids, int):
        if not 0 <= modality_ids < M:
            raise ValueError(f"modality_ids={modality_ids} out of range for M={M} modalities")
    else:
        if modality_ids.shape != x.shape[:-1]:
            raise ValueError(
                f"modality_ids must have shape {tuple(x.shape[:-1])} (one id per row), got {tuple(modality_ids.shape)}"
            )
        if modality_ids.is_floating_point() or modality_ids.is_complex() or modality_ids.dtype == torch.bool:
            raise ValueError(f"modality_ids must be an integer tensor, got dtype {modality_ids.dtype}")
        if modality_ids.device.type == "cpu" and modality_ids.numel():  # elsewhere: a host sync
            lo, hi = int(modality_ids.min()), int(modality_ids.max())
            if lo < 0 or hi >= M:
                raise ValueError(f"modality_ids hold values in [{lo}, {hi}], out of range for M={M} modalities")


def modality_layer_norm_ref(x, weight, bias, modality_ids, eps: float = 1e-12, residual=None):
    """Plain PyTorch reference for :func:`modality_layer_norm` (same arguments)."""
    _check(x, weight, bias, modality_ids, eps)
    if residual is not None:
        if residual.shape != x.shape:
            raise ValueError(f"residual shape {tuple(residual.shape)} must equal x shape {tuple(x.shape)}")
        x = x + residual
    acc = torch.promote_types(x.dtype, torch.float32)
    xf = x.to(acc)
    mean = xf.mean(-1, keepdim=True)
    var = (xf - mean).pow(2).mean(-1, keepdim=True)
    y = (xf - mean) * torch.rsqrt(var + eps)
    if isinstance(modality_ids, int):
        w, b = weight[modality_ids], bias[modality_ids]
    else:
        ids = modality_ids.long()
        w, b = weight[ids], bias[ids]
    out = (y * w.to(acc) + b.to(acc)).to(x.dtype)
    return (out, x) if residual is not None else out


def _triton(x, weight, bias, modality_ids, eps: float = 1e-12, residual=None):
    _check(x, weight, bias, modality_ids, eps)
    if residual is not None and residual.shape != x.shape:
        raise ValueError(f"residual shape {tuple(residual.shape)} must equal x shape {tuple(x.shape)}")
    return _lnt.modality_layer_norm_triton(x, weight, bias, modality_ids, eps=eps, residual=residual)


_OP = Op("modality_layer_norm")
_OP.register(Backend("reference", modality_layer_norm_ref))
# "triton" first: auto takes it for CUDA tensors, the reference for CPU tensors
_OP.register(
    Backend("triton", _triton, supports=_lnt.supports, available=triton_available, auto_skip=_lnt.auto_skip),
    before="reference",
)


def modality_layer_norm(x, weight, bias, modality_ids, eps: float = 1e-12, residual=None, backend: str = "auto"):
    """LayerNorm (Ba et al. 2016) whose gain/bias are picked per row by modality.

    Statistics are computed in float32 (float64 for float64 inputs), TF-style eps inside the
    square root, as the official MS-CLIP code does.

    Args:
        x: ``(..., D)`` activations (rows = all leading dims), any float dtype.
        weight, bias: ``(M, D)`` gains and biases, one row per modality.
        modality_ids: ``(...)`` integer tensor (int8/int32/int64) with one id in ``[0, M)`` per
            row, or a Python int applying one modality to all rows.
        eps: variance epsilon (1e-12 in MS-CLIP).
        residual: optional tensor shaped like ``x`` added to ``x`` before normalizing.
        backend: "auto", "reference" or "triton" (CUDA tensors, fp32/fp16/bf16; CPU
            tensors under ``TRITON_INTERPRET=1``; out-of-range ids are not checked on CUDA).
    Returns:
        ``out`` shaped like ``x``; with ``residual``, the pair ``(out, x + residual)``.
    Raises:
        ValueError: shape mismatch, an out-of-range int modality, or an unusable backend.
    """
    return _OP(x, weight, bias, modality_ids, eps=eps, residual=residual, backend=backend)


modality_layer_norm.op = _OP
