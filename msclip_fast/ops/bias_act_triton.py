"""The ``"triton"`` backend of :func:`msclip_fast.ops.bias_act`: an autograd Function over
``msclip_fast.kernels.bias_act``, and its ``triton_available`` / ``triton_supports`` /
``triton_auto_skip`` checks (limits of the backend only: the op's ``validate`` step has checked
the inputs). The FFN op's backend, over the same kernels, is :mod:`.ffn_triton`."""
from __future__ import annotations

import torch

from ._triton import interpreter_auto_skip, kernels, tensor_reasons
from ._triton import triton_available  # noqa: F401  (this backend's availability check)


class BiasActFn(torch.autograd.Function):
    """``act(x + bias)``; saves ``x`` (the pre-activation) and ``bias`` only."""

    @staticmethod
    def forward(ctx, x, bias, act):
        k = kernels("bias_act")
        shape = x.shape
        x2 = x.reshape(-1, shape[-1]).contiguous()
        y = k.bias_act_fwd(x2, bias, act)
        ctx.save_for_backward(x2, bias)
        ctx.act, ctx.shape = act, shape
        return y.view(shape)

    @staticmethod
    def backward(ctx, dy):
        x2, bias = ctx.saved_tensors
        k = kernels("bias_act")
        dx, db = k.bias_act_bwd(dy.reshape(x2.shape), x2, bias, ctx.act)
        return dx.view(ctx.shape), (db.to(bias.dtype) if bias is not None else None), None


def bias_act_triton(x, bias=None, act: str = "quick_gelu"):
    """Triton implementation of :func:`bias_act` (inputs validated by the op)."""
    return BiasActFn.apply(x, bias, act)


def triton_supports(x, bias=None, act="quick_gelu") -> list[str]:
    return tensor_reasons(x, bias)


def triton_auto_skip(x, bias=None, act="quick_gelu") -> list[str]:
    return interpreter_auto_skip(x)
