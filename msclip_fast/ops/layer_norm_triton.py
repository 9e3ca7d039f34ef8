"""The ``"triton"`` backend of :func:`msclip_fast.ops.modality_layer_norm`: an autograd
Function over ``msclip_fast.kernels.layer_norm`` (one launch for every modality, fused
residual add, deterministic backward), and its ``triton_available`` / ``triton_supports`` /
``triton_auto_skip`` checks (limits of the backend only: the op's ``validate`` step has checked
the inputs).

Mixed dtypes (autocast): ``x`` (the block's update, e.g. bf16) and ``residual`` (the residual
stream, e.g. fp32) may differ. The kernels read both as fp32; the sum and the normalized output
are written in ``promote_types(x.dtype, residual.dtype)``, as the reference's ``x + residual``;
the backward returns ``dx`` in x's dtype and ``d_residual`` in the residual's dtype.
"""
from __future__ import annotations

import torch

from ._triton import interpreter_auto_skip, kernels, tensor_reasons
from ._triton import triton_available  # noqa: F401  (this backend's availability check)


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
        ctx.mod, ctx.shape = mod, shape
        ctx.x_dtype = x.dtype
        ctx.res_dtype = residual.dtype if residual is not None else None
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
            dxs = ds2.to(xs.dtype) if ds2 is not None else torch.zeros_like(xs)
            dw = torch.zeros_like(weight)
            db = torch.zeros(weight.shape, dtype=ctx.bias_dtype, device=weight.device)
        else:
            k = kernels("layer_norm")
            dxs, dw, db = k.layer_norm_bwd(
                dy.reshape(-1, D), xs, weight, ids2 if ids2 is not None else ctx.mod, shift, rstd, ds2
            )
            dw, db = dw.to(weight.dtype), db.to(ctx.bias_dtype)
        # the gradient of what was normalized (x, or the sum in the promoted dtype) is the
        # gradient of x and of the residual, each in its own dtype
        dxs = dxs.view(ctx.shape)
        dx = dxs.to(ctx.x_dtype)
        dres = dxs.to(ctx.res_dtype) if ctx.res_dtype is not None else None
        return dx, dw, db, None, None, None, dres


def modality_layer_norm_triton(x, weight, bias, modality_ids, eps: float = 1e-12, residual=None):
    """Triton implementation (arguments and returns as :func:`modality_layer_norm`; inputs
    validated by the op)."""
    if isinstance(modality_ids, int):
        ids, mod = None, int(modality_ids)
    else:
        ids, mod = modality_ids, 0
    return ModalityLayerNormFn.apply(x, weight, bias, ids, mod, float(eps), residual)


def triton_supports(x, weight, bias, modality_ids, eps=1e-12, residual=None) -> list[str]:
    """Reasons the Triton backend cannot run these inputs (device and dtype limits)."""
    return tensor_reasons(x, weight, bias, residual, modality_ids if isinstance(modality_ids, torch.Tensor) else None)


def triton_auto_skip(x, weight, bias, modality_ids, eps=1e-12, residual=None) -> list[str]:
    return interpreter_auto_skip(x)
