"""Scaled dot-product attention: dispatch, the plain-PyTorch reference and the SDPA peer.

Layouts (FlashAttention conventions):
- batched: ``q, k, v`` of shape ``(B, H, L, K)``; ``causal`` a bool.
- varlen (packed): ``q, k, v`` of shape ``(T, H, K)`` with ``cu_seqlens`` ``(S+1,)`` int32
  cumulative sequence starts (``cu_seqlens[0] == 0``, ``cu_seqlens[-1] == T``); ``causal`` a
  bool or a ``(S,)`` bool tensor (one flag per sequence, e.g. text causal, images not).
"""
from __future__ import annotations

import math
import numbers

import torch
import torch.nn.functional as F

from . import attention_triton as _att
from .registry import Backend, Op


def validate_attention(q, k, v, cu_seqlens=None, causal=False, scale=None, max_seqlen=None) -> None:
    """The op's input validation (run once, before backend selection; ``attention_ref`` calls
    it too). Raises ValueError naming the field. Reads no device value back: the checks of
    ``cu_seqlens``' values run only for CPU tensors (:func:`check_cu_seqlens_host`)."""
    if q.shape != k.shape or q.shape != v.shape:
        raise ValueError(f"q, k, v must have one shape, got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if not q.is_floating_point() or q.dtype != k.dtype or q.dtype != v.dtype:
        raise ValueError(f"q, k, v must share one floating dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if cu_seqlens is None:
        if q.dim() != 4:
            raise ValueError(f"q must be (B, H, L, K) without cu_seqlens, got shape {tuple(q.shape)}")
        if isinstance(causal, torch.Tensor):
            raise ValueError("a per-sequence causal tensor needs cu_seqlens")
        if max_seqlen is not None:
            raise ValueError(f"max_seqlen={max_seqlen!r} is for the varlen layout (it needs cu_seqlens)")
        return
    if q.dim() != 3:
        raise ValueError(f"q must be (T, H, K) with cu_seqlens, got shape {tuple(q.shape)}")
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
        raise ValueError(f"cu_seqlens must be (S+1,) with S >= 1, got shape {tuple(cu_seqlens.shape)}")
    if cu_seqlens.is_floating_point() or cu_seqlens.is_complex() or cu_seqlens.dtype == torch.bool:
        raise ValueError(f"cu_seqlens must be an integer tensor (int32), got dtype {cu_seqlens.dtype}")
    if isinstance(causal, torch.Tensor) and causal.numel() != cu_seqlens.numel() - 1:
        raise ValueError(
            f"causal must have one flag per sequence ({cu_seqlens.numel() - 1}), got {causal.numel()}"
        )
    if max_seqlen is not None:
        if isinstance(max_seqlen, (bool, torch.Tensor)) or not isinstance(max_seqlen, numbers.Integral):
            raise ValueError(
                f"max_seqlen must be a host int (a tensor would cost a host sync), got {type(max_seqlen).__name__}"
            )
        if max_seqlen < 0:
            raise ValueError(f"max_seqlen must be >= 0, got {max_seqlen}")
    if cu_seqlens.device.type == "cpu":  # elsewhere the check would cost a host sync per call
        check_cu_seqlens_host(cu_seqlens, q.shape[0], max_seqlen)


def check_cu_seqlens_host(cu_seqlens, total: int, max_seqlen=None) -> None:
    """Value checks of a CPU ``cu_seqlens`` (part of :func:`validate_attention`; the only place
    of the op that reads tensor values on the host): rises from 0 to ``total`` (non-decreasing),
    and ``max_seqlen``, when given, is at least the longest sequence."""
    b = cu_seqlens.tolist()
    if b[0] != 0 or b[-1] != total or any(y < x for x, y in zip(b, b[1:])):
        raise ValueError(
            f"cu_seqlens must rise from 0 to T={total} (non-decreasing), got {b[:8]}"
            + ("..." if len(b) > 8 else "")
        )
    if max_seqlen is not None:
        longest = max(y - x for x, y in zip(b, b[1:]))
        if max_seqlen < longest:
            raise ValueError(f"max_seqlen={max_seqlen} is less than the longest sequence in cu_seqlens ({longest})")


def _dense(q, k, v, causal: bool, scale: float):
    """(..., L, K) attention with fp32 (or fp64) softmax."""
    acc = torch.promote_types(q.dtype, torch.float32)
    s = torch.matmul(q, k.transpose(-1, -2)).to(acc) * scale
    if causal:
        L = q.shape[-2]
        mask = torch.ones(L, L, dtype=torch.bool, device=q.device).triu_(1)
        s = s.masked_fill(mask, float("-inf"))
    p = torch.softmax(s, dim=-1).to(q.dtype)
    return torch.matmul(p, v)


def attention_ref(q, k, v, cu_seqlens=None, causal=False, scale=None, max_seqlen=None):
    """Plain PyTorch attention, the oracle for every other backend (same arguments as
    :func:`attention`; ``max_seqlen`` is validated, not needed). Materializes the ``L x L``
    scores per sequence."""
    validate_attention(q, k, v, cu_seqlens, causal, scale, max_seqlen)
    return _attention_ref(q, k, v, cu_seqlens, causal, scale, max_seqlen)


def _attention_ref(q, k, v, cu_seqlens=None, causal=False, scale=None, max_seqlen=None):
    """The "reference" backend (inputs validated by the op)."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    if cu_seqlens is None:
        return _dense(q, k, v, bool(causal), scale)
    bounds = cu_seqlens.tolist()
    flags = causal.tolist() if isinstance(causal, torch.Tensor) else [bool(causal)] * (len(bounds) - 1)
    H, K = q.shape[1], q.shape[2]
    outs = []
    for a, n, L, c in varlen_groups(bounds, flags):
        # n consecutive sequences of length L with one causal flag: one batched call.
        # (n·L, H, K) -> (n, H, L, K)
        qi, ki, vi = (t[a:a + n * L].reshape(n, L, H, K).transpose(1, 2) for t in (q, k, v))
        outs.append(_dense(qi, ki, vi, c, scale).transpose(1, 2).reshape(n * L, H, K))
    return torch.cat(outs, 0) if len(outs) > 1 else outs[0]


def varlen_groups(bounds: list[int], flags: list[bool]) -> list[tuple[int, int, int, bool]]:
    """Split varlen sequences into runs of consecutive sequences of equal length and equal
    causal flag, so the reference computes each run as one batched ``(n, H, L, K)`` call
    instead of a Python loop over sequences (a packed image+text batch is two runs).

    Args:
        bounds: host list of ``S+1`` cumulative sequence starts (``cu_seqlens.tolist()``).
        flags: host list of ``S`` causal flags.
    Returns:
        ``[(start_row, n_sequences, length, causal), ...]`` covering every sequence in order.
    """
    groups: list[list] = []
    for i in range(len(bounds) - 1):
        a, L, c = bounds[i], bounds[i + 1] - bounds[i], bool(flags[i])
        if groups and groups[-1][2] == L and groups[-1][3] == c:
            groups[-1][1] += 1
        else:
            groups.append([a, 1, L, c])
    return [tuple(g) for g in groups]


def _sdpa(q, k, v, cu_seqlens=None, causal=False, scale=None, max_seqlen=None):
    """The "sdpa" backend: torch's scaled_dot_product_attention (batched layout)."""
    return F.scaled_dot_product_attention(q, k, v, is_causal=bool(causal), scale=scale)


def sdpa_supports(q, k, v, cu_seqlens=None, causal=False, scale=None, max_seqlen=None) -> list[str]:
    return ["varlen (cu_seqlens) layout not supported"] if cu_seqlens is not None else []


_OP = Op("attention", validate=validate_attention)
_OP.register(Backend("reference", _attention_ref))
_OP.register(Backend("sdpa", _sdpa, supports=sdpa_supports))
# "triton" first: auto takes it for CUDA tensors, the reference for CPU tensors
_OP.register(
    Backend("triton", _att.attention_triton, supports=_att.triton_supports, available=_att.triton_available,
            auto_skip=_att.triton_auto_skip),
    before="reference",
)
# a peer for benchmarks and users; never chosen by "auto" (Triton or the reference is)
_OP.register(
    Backend("xformers", _att.attention_xformers, supports=_att.xformers_supports,
            available=_att.xformers_available, auto_skip=_att.xformers_auto_skip)
)


def attention(q, k, v, cu_seqlens=None, causal=False, scale=None, max_seqlen=None, backend: str = "auto"):
    """Softmax attention ``softmax(q kᵀ · scale [+ causal mask]) v`` (Vaswani et al. 2017).

    Args:
        q, k, v: ``(B, H, L, K)``, or ``(T, H, K)`` packed sequences with ``cu_seqlens``;
            float32/float16/bfloat16/float64, any device.
        cu_seqlens: ``(S+1,)`` int32 sequence boundaries for the varlen layout, or None.
        causal: bool, or ``(S,)`` bool tensor with one flag per packed sequence.
        scale: softmax scale; default ``1/sqrt(K)``.
        max_seqlen: varlen only: a host int >= the longest sequence (FlashAttention's
            ``max_seqlen``). The caller knows it (e.g. :class:`~msclip_fast.modules.PackedBatch`);
            when None the Triton backend reads it from ``cu_seqlens`` with one host sync per
            call. Checked against ``cu_seqlens`` when that is a CPU tensor.
        backend: "auto" (Triton for CUDA tensors, else the reference), "reference", "sdpa"
            (torch SDPA, batched layout only), "triton" (fp32/fp16/bf16, head dim <= 128,
            deterministic backward; CPU tensors only under ``TRITON_INTERPRET=1``),
            "xformers" (CUDA, when installed; varlen only with one causal flag for all).
    Returns:
        Tensor shaped like ``q``, in ``q.dtype``.
    Raises:
        ValueError: mismatched shapes, a bad ``cu_seqlens``/``causal``/``max_seqlen``, or an
            explicit backend that cannot run these inputs.
    """
    return _OP(q, k, v, cu_seqlens=cu_seqlens, causal=causal, scale=scale, max_seqlen=max_seqlen, backend=backend)


attention.op = _OP
