"""The ``"triton"`` and ``"xformers"`` backends of :func:`msclip_fast.ops.attention`, each with
its ``<backend>_available`` / ``<backend>_supports`` / ``<backend>_auto_skip`` checks (limits of
the backend only: the op's ``validate`` step has checked the inputs).

"triton": an autograd Function over ``msclip_fast.kernels.attention`` (flash forward saving
the fp32 log-sum-exp, deterministic backward), batched and varlen, per-sequence causal flags.
"xformers": ``xformers.ops.memory_efficient_attention`` (CUDA only), batched, or varlen with
one causal flag for all sequences (its block-diagonal masks cannot mix causal and not).
"""
from __future__ import annotations

import functools
import importlib

import torch

from ._triton import interpreter_auto_skip, kernels, tensor_reasons
from ._triton import triton_available  # noqa: F401  (this backend's availability check)

MAX_HEAD_DIM = 128  # kernels.attention.MAX_HEAD_DIM, restated so checks need no Triton


class AttentionFn(torch.autograd.Function):
    """``(q, k, v, cu_seqlens, causal, scale, max_seqlen) -> o``; saves q, k, v, o and the
    fp32 log-sum-exp (``(B, H, L)`` or ``(H, T)``), never the ``L x L`` probabilities.

    Host syncs: none when ``max_seqlen`` (a host int) is given with ``cu_seqlens`` on q's
    device; with ``max_seqlen=None`` the forward reads the longest sequence back once (the
    backward reuses it)."""

    @staticmethod
    def forward(ctx, q, k, v, cu_seqlens, causal, scale, max_seqlen):
        kern = kernels("attention")
        if cu_seqlens is not None:
            cu_seqlens = cu_seqlens.to(device=q.device, dtype=torch.int32).contiguous()
            if max_seqlen is None:  # the one host sync of this op; callers that know it pass it
                max_seqlen = int((cu_seqlens[1:] - cu_seqlens[:-1]).max()) if cu_seqlens.numel() > 1 else 0
        o, lse = kern.attention_fwd(q, k, v, cu_seqlens, causal, scale, max_seqlen)
        flags = causal if isinstance(causal, torch.Tensor) else None
        ctx.save_for_backward(q, k, v, o, lse, cu_seqlens, flags)
        ctx.causal = causal if flags is None else None
        ctx.scale, ctx.max_seqlen = scale, max_seqlen
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse, cu_seqlens, flags = ctx.saved_tensors
        kern = kernels("attention")
        causal = flags if flags is not None else ctx.causal
        dq, dk, dv = kern.attention_bwd(do, q, k, v, o, lse, cu_seqlens, causal, ctx.scale, ctx.max_seqlen)
        return dq, dk, dv, None, None, None, None


def attention_triton(q, k, v, cu_seqlens=None, causal=False, scale=None, max_seqlen=None):
    """Triton implementation of :func:`attention` (inputs validated by the op).
    ``max_seqlen`` (varlen) saves the host sync that computes it."""
    return AttentionFn.apply(q, k, v, cu_seqlens, causal, scale, max_seqlen)


def triton_supports(q, k, v, cu_seqlens=None, causal=False, scale=None, max_seqlen=None) -> list[str]:
    reasons = tensor_reasons(q, k, v)
    if q.shape[-1] > MAX_HEAD_DIM:
        reasons.append(f"head dim {q.shape[-1]} > {MAX_HEAD_DIM}")
    return reasons


def triton_auto_skip(q, k, v, cu_seqlens=None, causal=False, scale=None, max_seqlen=None) -> list[str]:
    return interpreter_auto_skip(q)


# ---------------------------------------------------------------------------- xformers


@functools.lru_cache(maxsize=None)
def _xformers_reasons() -> tuple[str, ...]:
    try:
        importlib.import_module("xformers.ops")
    except Exception as e:
        return (f"xformers not importable ({type(e).__name__}: {e})",)
    return ()


def xformers_available() -> list[str]:
    reasons = list(_xformers_reasons())
    if not torch.cuda.is_available():
        reasons.append("xformers has no CPU kernels and CUDA is unavailable")
    return reasons


def xformers_supports(q, k, v, cu_seqlens=None, causal=False, scale=None, max_seqlen=None) -> list[str]:
    reasons = []
    if not (q.is_cuda and k.is_cuda and v.is_cuda):
        reasons.append(f"needs CUDA tensors, got device {q.device}")
    if q.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        reasons.append(f"dtype {q.dtype} not supported")
    if cu_seqlens is not None and isinstance(causal, torch.Tensor):
        reasons.append("per-sequence causal flags not supported (one block-diagonal mask kind per call)")
    return reasons


def xformers_auto_skip(*args, **kwargs) -> list[str]:
    return ["peer backend: select backend='xformers' by name"]


def attention_xformers(q, k, v, cu_seqlens=None, causal=False, scale=None, max_seqlen=None):
    """xformers ``memory_efficient_attention`` in this op's layouts (it wants (B, L, H, K))."""
    from xformers.ops import fmha

    if cu_seqlens is None:
        bias = fmha.attn_bias.LowerTriangularMask() if causal else None
        o = fmha.memory_efficient_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_bias=bias, scale=scale
        )
        return o.transpose(1, 2)
    seqlens = (cu_seqlens[1:] - cu_seqlens[:-1]).tolist()
    mask_cls = fmha.attn_bias.BlockDiagonalCausalMask if causal else fmha.attn_bias.BlockDiagonalMask
    bias = mask_cls.from_seqlens(seqlens)
    o = fmha.memory_efficient_attention(q[None], k[None], v[None], attn_bias=bias, scale=scale)
    return o[0]
