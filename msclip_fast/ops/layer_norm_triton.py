"""The ``"triton"`` backend of :func:`msclip_fast.ops.modality_layer_norm`: an autograd
Function over ``msclip_fast.kernels.layer_norm`` (one launch for every modality, fused
residual add, deterministic backward)."""
from __future__ import annotations

import torch

from ._triton import kernels, triton_auto_skip, triton_supports


class ModalityLayerNormFn(torch.autograd.Function):
    """``(x, weight, bias, ids, mod, eps, residual) -> out`` or ``(out, x + residual)``.

    ``ids`` is a ``(T,)`` integer tensor or None (then every row has modality ``mod``).
    Saved for backward: the normalized input (``x`` or the sum, which is returned anyway),
    the ``(T,)`` fp32 shift and rstd, weight and ids; nothing of size ``T x D`` besides it.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, ids, mod, eps, residual):
        k = kernels("layer_norm")
        shape, D = x.shape, x.shape[-1]
        x2 = x.reshape(-1, D).contiguous()
        r2 = residual.reshape(-1, D).contiguous() if residual is not None else None
        ids2 = ids.reshape(-1) if ids is not None else None
        y, s, shift, rstd = k.layer_norm_fwd(x2, weight, bias, ids2 if ids2 is not None else mod, eps, r2)
        ctx.save_for_backward(s if s is not None else x2, weight, ids2, shift, rstd)
        ctx.mod, ctx.has_res, ctx.shape = mod, residual is not None, shape
        ctx.bias_dtype = bias.dtype
        ctx.set_materialize_grads(False)
        if s is not None:
            return y.view(shape), s.view(shape)
        return y.view(shape)

    @staticmethod
    def backward(ctx, dy, ds=None):
        xs, weight, ids2, shift, rstd = ctx.saved_tensors
        D = xs.shape[-1]
        ds2 = ds.reshape(-1, D) if ds is not None else None
        if dy is None:  # only the sum was used downstream
            dx2 = ds2 if ds2 is not None else torch.zeros_like(xs)
            dw = torch.zeros_like(weight)
            db = torch.zeros(weight.shape, dtype=ctx.bias_dtype, device=weight.device)
        else:
            k = kernels("layer_norm")
            dx2, dw, db = k.layer_norm_bwd(
                dy.reshape(-1, D), xs, weight, ids2 if ids2 is not None else ctx.mod, shift, rstd, ds2
            )
            dw, db = dw.to(weight.dtype), db.to(ctx.bias_dtype)
        dx = dx2.view(ctx.shape)
        return dx, dw, db, None, None, None, (dx if ctx.has_res else None)


def modality_layer_norm_triton(x, weight, bias, modality_ids, eps: float = 1e-12, residual=None):
    """Triton implementation (arguments and returns as :func:`modality_layer_norm`; inputs
    already validated by the caller)."""
    if isinstance(modality_ids, int):
        ids, mod = None, int(modality_ids)
    else:
        ids, mod = modality_ids, 0
        if not ids.is_cuda and ids.numel():
            # on CUDA a range check would cost a host sync per call; the kernel trusts the ids
            lo, hi = int(ids.min()), int(ids.max())
            if lo < 0 or hi >= weight.shape[0]:
                raise ValueError(f"modality_ids must lie in [0, {weight.shape[0]}), got values in [{lo}, {hi}]")
    return ModalityLayerNormFn.apply(x, weight, bias, ids, mod, float(eps), residual)


def supports(x, weight, bias, modality_ids, eps=1e-12, residual=None) -> list[str]:
    """Reasons the Triton backend cannot run these inputs."""
    reasons = triton_supports(x, weight, bias, residual, modality_ids if isinstance(modality_ids, torch.Tensor) else None)
    if isinstance(modality_ids, torch.Tensor) and modality_ids.is_floating_point():
        reasons.append(f"modality_ids must be an integer tensor, got {modality_ids.dtype}")
    if residual is not None and residual.dtype != x.dtype:
        reasons.append(f"residual dtype {residual.dtype} differs from x dtype {x.dtype}")
    return reasons


def auto_skip(x, weight, bias, modality_ids, eps=1e-12, residual=None) -> list[str]:
    return triton_auto_skip(x)
