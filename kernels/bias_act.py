"""Bias + activation (QuickGELU, GELU erf, GELU tanh): Triton forward/backward kernels.

Forward ``y = act(x + b)``; backward ``dx = dy * act'(x + b)`` and ``dbias = sum_rows dx``,
recomputing ``x + b`` from the saved input (the pre-activation is the only saved tensor).
``dbias`` is deterministic: each program owns a chunk of rows and a block of columns and
writes a partial sum ``(P, N)``; the launcher reduces partials with ``sum(0)``, no atomics.
The FFN's memory-saving backward recomputes ``act(h + b)`` with :func:`bias_act_fwd`.

Math in fp32 whatever the io dtype. Activation codes: 0 QuickGELU ``h·σ(1.702h)`` (CLIP),
1 GELU ``0.5h(1+erf(h/√2))``, 2 GELU tanh ``0.5h(1+tanh(√(2/π)(h+0.044715h³)))``.
Imports torch and triton only (DESIGN §4).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

ACT_CODES = {"quick_gelu": 0, "gelu": 1, "gelu_tanh": 2}

_SQRT1_2 = 0.7071067811865476
_INV_SQRT_2PI = 0.3989422804014327
_SQRT_2_OVER_PI = 0.7978845608028654


@triton.jit
def _act(h, ACT: tl.constexpr):
    """act(h) for fp32 h."""
    if ACT == 0:
        return h * tl.sigmoid(1.702 * h)
    elif ACT == 1:
        return 0.5 * h * (1.0 + tl.erf(h * 0.7071067811865476))
    else:
        u = 0.7978845608028654 * (h + 0.044715 * h * h * h)
        t = 2.0 * tl.sigmoid(2.0 * u) - 1.0  # tanh(u) without overflow
        return 0.5 * h * (1.0 + t)


@triton.jit
def _act_grad(h, ACT: tl.constexpr):
    """d act / d h for fp32 h."""
    if ACT == 0:
        s = tl.sigmoid(1.702 * h)
        return s + 1.702 * h * s * (1.0 - s)
    elif ACT == 1:
        cdf = 0.5 * (1.0 + tl.erf(h * 0.7071067811865476))
        return cdf + h * 0.3989422804014327 * tl.exp(-0.5 * h * h)
    else:
        u = 0.7978845608028654 * (h + 0.044715 * h * h * h)
        t = 2.0 * tl.sigmoid(2.0 * u) - 1.0
        du = 0.7978845608028654 * (1.0 + 3.0 * 0.044715 * h * h)
        return 0.5 * (1.0 + t) + 0.5 * h * (1.0 - t * t) * du


@triton.jit(do_not_specialize=["R"])  # rows vary per call
def _bias_act_fwd_kernel(
    X,  # (R, N) pre-activations without bias, contiguous
    BIAS,  # (N,) bias (read when HAS_BIAS)
    Y,  # (R, N) out: act(x + bias)
    R,
    N,
    ACT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    pid_r = tl.program_id(0)
    pid_n = tl.program_id(1)
    rows = pid_r.to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R).to(tl.int64)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (rows < R)[:, None] & (cols < N)[None, :]
    offs = rows[:, None] * N + cols[None, :]
    h = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        h += tl.load(BIAS + cols, mask=cols < N, other=0.0).to(tl.float32)[None, :]
    tl.store(Y + offs, _act(h, ACT).to(Y.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["R", "rows_per_prog"])  # rows vary per call
def _bias_act_bwd_kernel(
    X,  # (R, N) saved input (pre-activation without bias)
    BIAS,  # (N,) (read when HAS_BIAS)
    DY,  # (R, N) gradient of the output
    DX,  # (R, N) out: gradient of x
    DB,  # (P, N) fp32 out: per-row-chunk partial dbias (written when HAS_BIAS)
    R,
    N,
    rows_per_prog,  # rows owned by one program along axis 0 (multiple of BLOCK_R)
    ACT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    pid_r = tl.program_id(0)
    pid_n = tl.program_id(1)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    cmask = cols < N
    if HAS_BIAS:
        b = tl.load(BIAS + cols, mask=cmask, other=0.0).to(tl.float32)
    acc = tl.zeros([BLOCK_R, BLOCK_N], dtype=tl.float32)
    start = pid_r.to(tl.int64) * rows_per_prog
    for r0 in range(0, rows_per_prog, BLOCK_R):
        rows = start + r0 + tl.arange(0, BLOCK_R).to(tl.int64)
        mask = (rows < R)[:, None] & cmask[None, :]
        offs = rows[:, None] * N + cols[None, :]
        h = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
        if HAS_BIAS:
            h += b[None, :]
        dy = tl.load(DY + offs, mask=mask, other=0.0).to(tl.float32)
        dx = tl.where(mask, dy * _act_grad(h, ACT), 0.0)
        tl.store(DX + offs, dx.to(DX.dtype.element_ty), mask=mask)
        acc += dx
    if HAS_BIAS:
        tl.store(DB + pid_r.to(tl.int64) * N + cols, tl.sum(acc, axis=0), mask=cmask)


def _blocks(N: int) -> tuple[int, int]:
    block_n = min(triton.next_power_of_2(max(N, 1)), 1024)
    block_r = max(1, 4096 // block_n)
    return block_r, block_n


def bias_act_fwd(x: torch.Tensor, bias: torch.Tensor | None, act: str) -> torch.Tensor:
    """``act(x + bias)`` for contiguous ``x`` ``(R, N)`` (fp32/fp16/bf16) and ``bias`` ``(N,)``
    or None; returns ``(R, N)`` in x's dtype. ``act`` one of :data:`ACT_CODES`."""
    R, N = x.shape
    y = torch.empty_like(x)
    if x.numel() == 0:
        return y
    block_r, block_n = _blocks(N)
    grid = (triton.cdiv(R, block_r), triton.cdiv(N, block_n))
    _bias_act_fwd_kernel[grid](
        x, bias if bias is not None else x, y, R, N,
        ACT=ACT_CODES[act], HAS_BIAS=bias is not None, BLOCK_R=block_r, BLOCK_N=block_n, num_warps=4,
    )
    return y


def bias_act_bwd(dy, x, bias, act: str, max_row_programs: int | None = None):
    """Gradients of :func:`bias_act_fwd`.

    Args:
        dy: ``(R, N)`` gradient of the output.
        x: ``(R, N)`` contiguous saved input; ``bias`` ``(N,)`` or None.
        max_row_programs: cap on programs along rows (partial buffers); default 2 x SMs on
            CUDA, 16 else.
    Returns:
        ``(dx, dbias)``: ``dx`` ``(R, N)`` in x's dtype; ``dbias`` ``(N,)`` fp32 or None.
    """
    R, N = x.shape
    dy = dy.contiguous()
    dx = torch.empty_like(x)
    if x.numel() == 0:
        return dx, (torch.zeros(N, dtype=torch.float32, device=x.device) if bias is not None else None)
    block_r, block_n = _blocks(N)
    if max_row_programs is None:
        max_row_programs = 2 * torch.cuda.get_device_properties(x.device).multi_processor_count if x.is_cuda else 16
    tiles = triton.cdiv(R, block_r)
    progs = min(tiles, max_row_programs)
    rows_per_prog = triton.cdiv(tiles, progs) * block_r
    progs = triton.cdiv(R, rows_per_prog)
    db = torch.empty(progs, N, dtype=torch.float32, device=x.device) if bias is not None else x
    _bias_act_bwd_kernel[(progs, triton.cdiv(N, block_n))](
        x, bias if bias is not None else x, dy, dx, db, R, N, rows_per_prog,
        ACT=ACT_CODES[act], HAS_BIAS=bias is not None, BLOCK_R=block_r, BLOCK_N=block_n, num_warps=4,
    )
    return dx, (db.sum(0) if bias is not None else None)


def _interpreted() -> bool:
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(_bias_act_fwd_kernel, InterpretedFunction)


# whether these kernels were built for the CPU interpreter (decided once, at import)
INTERPRETED = _interpreted()
