"""The ``"triton"`` backend of :func:`msclip_fast.ops.sigmoid_loss`: an autograd Function over
``msclip_fast.kernels.sigmoid_loss`` (the GPU fallback when ``msclip_fast._C`` has no CUDA).

SigLIP's sigmoid loss (Zhai et al. 2023) with flash-attention-style tiling: the forward saves
only the inputs (no LSE: the loss is a plain sum), the backward recomputes the logits tiles.
Never holds the N_I x N_T logits. Inputs may be non-contiguous (the kernels take strides).
Scale, bias and the upstream gradient are read on the device (no host sync). Triton is imported
on first use only (see :mod:`._triton`).
"""
from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from ._triton import interpreter_auto_skip, kernels, tensor_reasons
from ._triton import triton_available  # noqa: F401  (this backend's availability check)


def _param_grad(g: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return g.to(device=like.device, dtype=like.dtype).reshape(like.shape)


def _device_f32(t: torch.Tensor, device) -> torch.Tensor:
    return t.detach().to(device=device, dtype=torch.float32).reshape(1).contiguous()


class TritonSigmoidLoss(torch.autograd.Function):
    """``(image (N_I, D), text (N_T, D), scale, bias or None, negative_only) -> loss`` 0-d
    float32. Gradients: image and text in their dtype; scale and bias in their own dtype,
    shape and device."""

    @staticmethod
    def forward(ctx, image, text, scale, bias, negative_only: bool):
        kern = kernels("sigmoid_loss")
        s = _device_f32(scale, image.device)
        b = (torch.zeros(1, dtype=torch.float32, device=image.device) if bias is None
             else _device_f32(bias, image.device))
        loss = kern.sigmoid_fwd(image, text, s, b, negative_only)
        ctx.save_for_backward(image, text, s, b)
        ctx.negative_only = negative_only
        ctx.metas = (scale, bias)  # only dtype/shape/device are read back
        return loss

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        image, text, s, b = ctx.saved_tensors
        d_img, d_txt, d_s, d_b = kernels("sigmoid_loss").sigmoid_bwd(image, text, s, b, grad, ctx.negative_only)
        scale, bias = ctx.metas
        needs = ctx.needs_input_grad
        return (d_img if needs[0] else None, d_txt if needs[1] else None,
                _param_grad(d_s, scale) if needs[2] else None,
                _param_grad(d_b, bias) if bias is not None and needs[3] else None, None)


def sigmoid_loss_triton(image, text, logit_scale, logit_bias=None, negative_only=False):
    """Triton implementation of :func:`msclip_fast.ops.sigmoid_loss` (inputs validated by the
    op).

    Args:
        image: ``(N_I, D)``, text: ``(N_T, D)``, float32/float16/bfloat16 of one dtype, on
            CUDA (or the CPU under ``TRITON_INTERPRET=1``), any strides; ``N_T == N_I`` unless
            ``negative_only``; any D >= 1.
        logit_scale, logit_bias: 1-element floating tensors (bias may be None: no bias).
        negative_only: every pair is a negative.
    Returns:
        0-d float32 loss; fp32 accumulation, deterministic, O(N_I + N_T) extra memory.
    """
    return TritonSigmoidLoss.apply(image, text, logit_scale, logit_bias, bool(negative_only))


def triton_supports(image, text, logit_scale, logit_bias=None, negative_only=False) -> list[str]:
    """Limits of the Triton backend (the op's ``validate`` step has checked shapes and dtypes
    being floating): devices, supported dtypes, one dtype for both, D >= 1. Scale and bias may
    live anywhere (they are copied to the features' device, without a host sync)."""
    reasons = tensor_reasons(image, text)
    if image.dtype != text.dtype:
        reasons.append(f"image dtype {image.dtype} differs from text dtype {text.dtype}")
    if image.shape[1] < 1:
        reasons.append("needs D >= 1 columns")
    return reasons


def triton_auto_skip(image, text, logit_scale, logit_bias=None, negative_only=False) -> list[str]:
    return interpreter_auto_skip(image, text)
