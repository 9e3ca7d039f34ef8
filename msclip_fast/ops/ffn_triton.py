"""The ``"triton"`` backend of :func:`msclip_fast.ops.ffn`: an autograd Function over the
bias+activation kernels of ``msclip_fast.kernels.bias_act`` (GEMMs by torch), and its
``triton_available`` / ``triton_supports`` / ``triton_auto_skip`` checks (limits of the backend
only: the op's ``validate`` step has checked the inputs)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ._triton import interpreter_auto_skip, kernels, tensor_reasons
from ._triton import triton_available  # noqa: F401  (this backend's availability check)


class FFNFn(torch.autograd.Function):
    """``proj(act(fc(x)))`` that saves ``x`` and the pre-activation ``h = x W1ᵀ`` only.

    The activation ``a = act(h + b1)`` (as large as ``h``) is not kept for the second GEMM's
    weight gradient: the backward recomputes it with one elementwise kernel. Eager PyTorch
    (Linear → act → Linear) keeps both ``h`` and ``a``, so this halves the FFN's hidden-width
    activation memory for the cost of one extra read/write of ``h``.
    """

    @staticmethod
    @torch.amp.custom_fwd(device_type="cuda")
    def forward(ctx, x, w1, b1, w2, b2, act):
        k = kernels("bias_act")
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        h = F.linear(x2, w1).contiguous()
        a = k.bias_act_fwd(h, b1, act)
        y = F.linear(a, w2, b2)
        ctx.save_for_backward(x2, w1, b1, w2, h)
        ctx.act, ctx.shape, ctx.has_b2 = act, shape, b2 is not None
        return y.view(*shape[:-1], w2.shape[0])

    @staticmethod
    @torch.amp.custom_bwd(device_type="cuda")
    def backward(ctx, dy):
        x2, w1, b1, w2, h = ctx.saved_tensors
        k = kernels("bias_act")
        dy2 = dy.reshape(-1, dy.shape[-1])
        a = k.bias_act_fwd(h, b1, ctx.act)  # recomputed, see the class docstring
        dw2 = dy2.t().mm(a.to(dy2.dtype))
        db2 = dy2.sum(0) if ctx.has_b2 else None
        da = dy2.mm(w2.to(dy2.dtype))
        dh, db1 = k.bias_act_bwd(da, h, b1, ctx.act)
        dw1 = dh.t().mm(x2.to(dh.dtype))
        dx = dh.mm(w1.to(dh.dtype))
        return (
            dx.view(ctx.shape),
            dw1.to(w1.dtype),
            db1.to(b1.dtype) if b1 is not None else None,
            dw2.to(w2.dtype),
            db2,
            None,
        )


def ffn_triton(x, fc_weight, fc_bias, proj_weight, proj_bias, act: str = "quick_gelu"):
    """Triton implementation of :func:`ffn` (inputs validated by the op)."""
    return FFNFn.apply(x, fc_weight, fc_bias, proj_weight, proj_bias, act)


def triton_supports(x, fc_weight, fc_bias, proj_weight, proj_bias, act="quick_gelu") -> list[str]:
    return tensor_reasons(x, fc_weight, fc_bias, proj_weight, proj_bias)


def triton_auto_skip(x, fc_weight, fc_bias, proj_weight, proj_bias, act="quick_gelu") -> list[str]:
    return interpreter_auto_skip(x)
