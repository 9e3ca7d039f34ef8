"""The ``"triton"`` backend of :func:`msclip_fast.ops.contrastive_loss`: an autograd Function over
``msclip_fast.kernels.contrastive`` (the GPU fallback when ``msclip_fast._C`` has no CUDA).

Forward keeps ``(img, txt, scale, lse_row, lse_col)`` (2N fp32 beyond the inputs); backward
recomputes the logits tiles. Never holds the N x N logits. Inputs may be non-contiguous (the
kernels take strides). Triton is imported on first use only (see :mod:`._triton`).
"""
from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from ._triton import interpreter_auto_skip, kernels, tensor_reasons
from ._triton import triton_available  # noqa: F401  (this backend's availability check)


class TritonContrastiveLoss(torch.autograd.Function):
    """``(img (N, D), txt (N, D), scale) -> loss`` 0-d float32. Gradients: img and txt in their
    dtype, scale in its own dtype and shape."""

    @staticmethod
    def forward(ctx, img, txt, scale):
        kern = kernels("contrastive")
        s = scale.detach().to(device=img.device, dtype=torch.float32).reshape(1).contiguous()
        loss, lse_row, lse_col = kern.contrastive_fwd(img, txt, s)
        ctx.save_for_backward(img, txt, s, lse_row, lse_col)
        ctx.scale_meta = (scale.dtype, scale.shape, scale.device)
        return loss

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        img, txt, s, lse_row, lse_col = ctx.saved_tensors
        d_img, d_txt, d_scale = kernels("contrastive").contrastive_bwd(img, txt, s, lse_row, lse_col, grad)
        dtype, shape, device = ctx.scale_meta
        needs = ctx.needs_input_grad
        return (d_img if needs[0] else None, d_txt if needs[1] else None,
                d_scale.to(device=device, dtype=dtype).reshape(shape) if needs[2] else None)


def contrastive_loss_triton(img, txt, scale):
    """Triton implementation of :func:`msclip_fast.ops.contrastive_loss` (inputs validated by
    the op): float32/float16/bfloat16 features with fp32 accumulation, any N >= 1 and D."""
    return TritonContrastiveLoss.apply(img, txt, scale)


def triton_supports(img, txt, scale) -> list[str]:
    """Limits of the Triton backend (the op's ``validate`` step has checked shapes and dtypes
    being floating): devices, supported dtypes, one dtype for both, D >= 1."""
    reasons = tensor_reasons(img, txt)
    if img.dtype != txt.dtype:
        reasons.append(f"img dtype {img.dtype} differs from txt dtype {txt.dtype}")
    if img.shape[1] < 1:
        reasons.append("needs D >= 1 columns")
    return reasons


def triton_auto_skip(img, txt, scale) -> list[str]:
    return interpreter_auto_skip(img, txt)
