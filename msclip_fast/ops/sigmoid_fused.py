"""Fused sigmoid (SigLIP) loss through the compiled extension ``msclip_fast._C`` (csrc/sigmoid).

Neither pass holds the N_I x N_T logits: the extension sweeps tiles of ``s·I·Tᵀ + b`` (see
``csrc/sigmoid/sigmoid_tile.h`` for the math).

- CPU: when any input needs a gradient, the forward computes the loss and the gradients in
  ONE sweep (each tile's logits are formed once: 3 tile-product FLOP units per element instead
  of 4 for forward + recomputing backward), keeps the fp32 gradients of ``loss`` and the
  backward only scales them by the upstream gradient (no copy for fp32 inputs and an upstream
  gradient of 1: the saved buffers are handed over). A second backward through the same graph
  (``retain_graph``) recomputes the tiles, as the CUDA path always does. Without gradients it sums the loss only.
- CUDA: the forward saves nothing but the inputs; the backward recomputes the tiles, as the
  InfoNCE kernels do (no host sync anywhere).
"""
from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from .contrastive_fused import load_extension

_FUSED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _ext_reasons() -> list[str]:
    ext, reason = load_extension()
    if reason:
        return [reason]
    if not hasattr(ext, "sigmoid_forward"):
        return ["msclip_fast._C predates the sigmoid loss (rebuild: pip install -e .)"]
    return []


def cpu_available() -> list[str]:
    return _ext_reasons()


def cuda_available() -> list[str]:
    reasons = _ext_reasons()
    if reasons:
        return reasons
    ext, _ = load_extension()
    if not getattr(ext, "with_cuda", False):
        reasons.append("msclip_fast._C was built without CUDA")
    if not torch.cuda.is_available():
        reasons.append("no CUDA device")
    return reasons


def _input_reasons(image, text, logit_scale, logit_bias, *, cuda: bool) -> list[str]:
    """Limits of the extension (the op's ``validate`` step has checked shapes and dtypes being
    floating): device, supported dtypes, one dtype for both, CPU scale/bias for CPU features."""
    reasons = []
    where = "CUDA" if cuda else "CPU"
    for name, t in (("image", image), ("text", text)):
        if t.is_cuda != cuda:
            reasons.append(f"needs {where} tensors, got {name} on {t.device}")
        if t.dtype not in _FUSED_DTYPES:
            reasons.append(f"{name} dtype {t.dtype} not supported (float32/float16/bfloat16)")
    if image.dtype != text.dtype:
        reasons.append(f"image dtype {image.dtype} differs from text dtype {text.dtype}")
    if not cuda:
        for name, t in (("logit_scale", logit_scale), ("logit_bias", logit_bias)):
            if t is not None and t.is_cuda:
                reasons.append(f"{name} must be on the CPU, got {t.device}")
    return reasons


def cpu_supports(image, text, logit_scale, logit_bias=None, negative_only=False) -> list[str]:
    return _input_reasons(image, text, logit_scale, logit_bias, cuda=False)


def cuda_supports(image, text, logit_scale, logit_bias=None, negative_only=False) -> list[str]:
    return _input_reasons(image, text, logit_scale, logit_bias, cuda=True)


def _param_grad(g: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return g.to(device=like.device, dtype=like.dtype).reshape(like.shape)


class FusedSigmoidLoss(torch.autograd.Function):
    """``(image (N_I, D), text (N_T, D), scale, bias, negative_only, tile) -> loss`` 0-d float32.

    Gradients: image, text in their dtype; scale and bias in their own dtype, shape and device.
    Non-contiguous inputs are made contiguous here (the extension itself rejects them)."""

    @staticmethod
    def forward(ctx, image, text, scale, bias, negative_only: bool, tile: int):
        ext, reason = load_extension()
        if ext is None:
            raise RuntimeError(reason)
        img_c, txt_c = image.contiguous(), text.contiguous()
        s, b = scale.detach(), bias.detach()
        ctx.negative_only, ctx.tile = negative_only, tile
        ctx.metas = (scale, bias)  # only dtype/shape/device are read back
        ctx.cpu_grads = None
        if img_c.is_cuda:
            (loss,) = ext.sigmoid_forward(img_c, txt_c, s, b, negative_only, False, tile)
            ctx.save_for_backward(img_c, txt_c, s, b)
            return loss
        if not any(ctx.needs_input_grad[:4]):
            (loss,) = ext.sigmoid_forward(img_c, txt_c, s, b, negative_only, False, tile)
            return loss
        # fp32 gradients of the loss itself; cast to the inputs' dtype once the upstream gradient
        # is known (a 16-bit copy scaled by a loss-scaler's 2^16 could overflow)
        loss, d_img, d_txt, d_s, d_b = ext.sigmoid_forward(img_c, txt_c, s, b, negative_only, True, tile)
        ctx.cpu_grads = (d_img, d_txt, d_s, d_b)
        ctx.dtypes = (image.dtype, text.dtype)
        # the inputs (references, no copies) let a second backward (retain_graph) recompute
        ctx.save_for_backward(img_c, txt_c, s, b)
        return loss

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        scale, bias = ctx.metas
        if ctx.cpu_grads is not None:
            # handed over, not kept: a gradient still referenced here would make autograd's
            # accumulation copy it (N x D x 2 more floats at the peak); a second backward
            # (retain_graph) recomputes below instead
            saved, ctx.cpu_grads = ctx.cpu_grads, None
            g = float(grad)  # CPU tensors: reading it is free
            grads = saved if g == 1.0 else tuple(t * g for t in saved)
            del saved
            grads = (grads[0].to(ctx.dtypes[0]), grads[1].to(ctx.dtypes[1]), *grads[2:])
        else:
            ext, _ = load_extension()
            img, txt, s, b = ctx.saved_tensors
            grads = ext.sigmoid_backward(img, txt, s, b, grad.reshape(()).float(), ctx.negative_only,
                                         ctx.tile)
        d_img, d_txt, d_s, d_b = grads
        needs = ctx.needs_input_grad
        return (d_img if needs[0] else None, d_txt if needs[1] else None,
                _param_grad(d_s, scale) if needs[2] else None,
                _param_grad(d_b, bias) if needs[3] else None, None, None)


def sigmoid_loss_fused(image, text, logit_scale, logit_bias=None, negative_only=False, tile: int = 0):
    """Fused loss on the extension (CPU or CUDA per the inputs' device); see
    :func:`msclip_fast.ops.sigmoid_loss`. ``tile``: rows/columns per tile on the CPU (0: 1024)."""
    if logit_bias is None:
        logit_bias = torch.zeros((), dtype=torch.float32, device=logit_scale.device)
    return FusedSigmoidLoss.apply(image, text, logit_scale, logit_bias, bool(negative_only), int(tile))
