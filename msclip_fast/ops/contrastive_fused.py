"""Fused contrastive loss through the compiled extension ``msclip_fast._C`` (csrc/contrastive).

Forward and backward never hold the N x N logits: the extension sweeps tiles of ``s·I·Tᵀ``,
keeping 2N floats of log-sum-exp (forward) and recomputing each tile once (backward); see
``csrc/contrastive/contrastive_tile.h`` for the math. The extension is imported lazily and a
missing or broken build turns into a reason string, never an import error.
"""
from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

_FUSED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_EXT = None
_EXT_REASON: str | None = None


def load_extension():
    """``(module, None)`` when ``msclip_fast._C`` imports, else ``(None, reason)``."""
    global _EXT, _EXT_REASON
    if _EXT is None and _EXT_REASON is None:
        try:
            from msclip_fast import _C  # noqa: PLC0415 - lazy on purpose

            _EXT = _C
        except ImportError as e:  # not built, or built against another torch
            _EXT_REASON = f"msclip_fast._C is not importable ({e})"
    return _EXT, _EXT_REASON


def _input_reasons(img, txt, scale, *, cuda: bool) -> list[str]:
    """Limits of the extension (the op's ``validate`` step has checked shapes, N >= 1 and
    floating dtypes): device, supported dtypes, one dtype for both, a CPU scale for CPU
    features (a CUDA kernel reads the scale on the device; the extension copies it there)."""
    reasons = []
    where = "CUDA" if cuda else "CPU"
    for name, t in (("img", img), ("txt", txt)):
        if t.is_cuda != cuda:
            reasons.append(f"needs {where} tensors, got {name} on {t.device}")
        if t.dtype not in _FUSED_DTYPES:
            reasons.append(f"{name} dtype {t.dtype} not supported (float32/float16/bfloat16)")
    if img.dtype != txt.dtype:
        reasons.append(f"img dtype {img.dtype} differs from txt dtype {txt.dtype}")
    if not cuda and scale.is_cuda:
        reasons.append(f"scale must be on the CPU, got {scale.device}")
    return reasons


def cpu_available() -> list[str]:
    _, reason = load_extension()
    return [reason] if reason else []


def cuda_available() -> list[str]:
    ext, reason = load_extension()
    if reason:
        return [reason]
    reasons = []
    if not getattr(ext, "with_cuda", False):
        reasons.append("msclip_fast._C was built without CUDA")
    if not torch.cuda.is_available():
        reasons.append("no CUDA device")
    return reasons


# "cpu" and "cuda" backends: <backend>_available / <backend>_supports (no auto_skip: "auto" may
# take either whenever it can run)
def cpu_supports(img, txt, scale) -> list[str]:
    return _input_reasons(img, txt, scale, cuda=False)


def cuda_supports(img, txt, scale) -> list[str]:
    return _input_reasons(img, txt, scale, cuda=True)


class FusedContrastiveLoss(torch.autograd.Function):
    """Autograd wrapper: forward keeps (img, txt, scale, lse_row, lse_col); backward calls the
    extension, which recomputes the tiles. Non-contiguous inputs are made contiguous here (the
    extension itself rejects them). Gradients: img, txt in their dtype; scale in its dtype,
    shape and device (the extension returns d_scale on the features' device: a CPU scale with
    CUDA features gets its gradient back on the CPU)."""

    @staticmethod
    def forward(ctx, img, txt, scale, tile: int = 0):
        ext, reason = load_extension()
        if ext is None:
            raise RuntimeError(reason)
        img_c, txt_c = img.contiguous(), txt.contiguous()
        s = scale.detach()
        loss, lse_row, lse_col = ext.contrastive_forward(img_c, txt_c, s, tile)
        ctx.save_for_backward(img_c, txt_c, s, lse_row, lse_col)
        ctx.tile = tile
        ctx.scale_meta = (scale.dtype, scale.shape, scale.device)
        return loss

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        ext, _ = load_extension()
        img, txt, s, lse_row, lse_col = ctx.saved_tensors
        d_img, d_txt, d_scale = ext.contrastive_backward(
            img, txt, s, lse_row, lse_col, grad.reshape(()).float(), ctx.tile
        )
        dtype, shape, device = ctx.scale_meta
        d_scale = d_scale.to(device=device, dtype=dtype).reshape(shape)
        needs = ctx.needs_input_grad
        return (d_img if needs[0] else None, d_txt if needs[1] else None,
                d_scale if needs[2] else None, None)


def contrastive_loss_fused(img, txt, scale, tile: int = 0):
    """Fused loss on the extension (CPU or CUDA per the inputs' device); see
    :func:`msclip_fast.ops.contrastive_loss`. ``tile``: rows per tile on the CPU (0: 1024)."""
    return FusedContrastiveLoss.apply(img, txt, scale, tile)
