"""The CLIP contrastive (InfoNCE) loss over a batch of matched image/text pairs."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from . import contrastive_fused as _fused
from . import contrastive_triton as _triton
from .registry import Backend, Op


def validate_contrastive_loss(img, txt, scale) -> None:
    """The op's input validation (run once, before backend selection; the reference calls it
    too). Raises ValueError naming the field. Reads no device value back."""
    if img.dim() != 2 or txt.dim() != 2:
        raise ValueError(f"img and txt must be (N, D), got {tuple(img.shape)} and {tuple(txt.shape)}")
    if img.shape[1] != txt.shape[1]:
        raise ValueError(f"img and txt must share D, got {img.shape[1]} and {txt.shape[1]}")
    if not isinstance(scale, torch.Tensor) or scale.numel() != 1:
        raise ValueError(f"scale must be a 1-element tensor (exp(logit_scale)), got {scale!r}")
    if img.shape[0] < 1 or txt.shape[0] < 1:
        raise ValueError(f"img and txt need at least one row, got N={img.shape[0]} and {txt.shape[0]}")
    for name, t in (("img", img), ("txt", txt), ("scale", scale)):
        if not t.is_floating_point():
            raise ValueError(f"{name} must be a floating tensor, got dtype {t.dtype}")
    if img.shape[0] != txt.shape[0]:
        raise ValueError(f"img and txt must have one row count N, got {img.shape[0]} and {txt.shape[0]}")


def contrastive_loss_ref(img, txt, scale):
    """Plain PyTorch reference for :func:`contrastive_loss` (materializes the N x N logits)."""
    validate_contrastive_loss(img, txt, scale)
    return _contrastive_loss_ref(img, txt, scale)


def _contrastive_loss_ref(img, txt, scale):
    """The "reference" backend (inputs validated by the op)."""
    acc = torch.promote_types(img.dtype, torch.float32)
    logits = scale.to(acc).reshape(()) * (img.to(acc) @ txt.to(acc).t())
    labels = torch.arange(img.shape[0], device=img.device)
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels)) / 2


_OP = Op("contrastive_loss", validate=validate_contrastive_loss)
# registration order is the "auto" preference: cuda > triton > cpu > reference; "auto" never
# picks triton for CPU tensors (interpreter: tests name it explicitly)
_OP.register(Backend("cuda", _fused.contrastive_loss_fused, supports=_fused.cuda_supports,
                     available=_fused.cuda_available))
_OP.register(Backend("triton", _triton.contrastive_loss_triton, supports=_triton.triton_supports,
                     available=_triton.triton_available, auto_skip=_triton.triton_auto_skip))
_OP.register(Backend("cpu", _fused.contrastive_loss_fused, supports=_fused.cpu_supports,
                     available=_fused.cpu_available))
_OP.register(Backend("reference", _contrastive_loss_ref))


def contrastive_loss(img, txt, scale, backend: str = "auto"):
    """Symmetric InfoNCE loss of CLIP (Radford et al. 2021, Fig. 3)::

        logits = scale · img @ txtᵀ
        loss = (CE(logits, arange(N)) + CE(logitsᵀ, arange(N))) / 2

    Args:
        img: ``(N, D)`` image features (normally L2-normalized), float32/16/bf16/64.
        txt: ``(N, D)`` text features, row i paired with ``img[i]``.
        scale: 0-d tensor ``exp(logit_scale)``; receives a gradient.
        backend: "auto", "cuda" (extension built with CUDA, CUDA tensors), "triton"
            (``kernels/contrastive.py``: CUDA tensors, or CPU tensors under
            ``TRITON_INTERPRET=1`` for tests), "cpu" (extension, CPU tensors; these three are
            fused: O(N) memory, float32/16/bf16 inputs, fp32 accumulation, deterministic) or
            "reference" (materializes the N x N logits; any float dtype). "auto" takes the first
            of cuda, triton, cpu, reference that can run the inputs, and never picks triton for
            CPU tensors.
    Returns:
        0-d float32 (float64 for float64 inputs) tensor: the mean of both directions.
    Raises:
        ValueError: shape mismatch or an unusable backend.
    """
    if torch.compiler.is_compiling():  # one opaque custom-op node (see .custom_ops)
        from . import custom_ops

        return custom_ops.contrastive_loss(img, txt, scale, backend)
    return _OP(img, txt, scale, backend=backend)


contrastive_loss.op = _OP
