"""Fused CLIP contrastive (InfoNCE) loss in Triton: forward and deterministic backward that never
hold the N x N logits (the GPU fallback of ``csrc/contrastive`` when the extension is not built).

Notation (issue 4, as ``csrc/contrastive/contrastive_tile.h``): I, T are ``(N, D)`` features,
s the logit scale, ``x = s·I·Tᵀ`` the logits (only ever formed one tile at a time)::

    lse_row[i] = log Σ_j exp(x_ij)        lse_col[j] = log Σ_i exp(x_ij)
    loss       = Σ_i (lse_row[i] + lse_col[i] − 2·x_ii) / (2N)
    G_ij       = (exp(x_ij − lse_row[i]) + exp(x_ij − lse_col[j]) − 2·δ_ij) / (2N)
    dI = s·G·T,   dT = s·Gᵀ·I,   dloss/ds = Σ_ij G_ij·(I·Tᵀ)_ij

Both kernels are written for a generic pair ``(A, B)`` of row matrices and run twice, once with
``(A, B) = (I, T)`` and once with ``(T, I)``, because the columns of ``I·Tᵀ`` are the rows of
``T·Iᵀ`` and ``G`` is symmetric under that swap. Each program owns whole output rows, so
nothing is merged across programs and no atomics are used (deterministic, DESIGN §9):

- ``_lse_rows_kernel``: one program per block of A rows streams the blocks of B rows, forms the
  raw tile ``A_blk·B_blkᵀ`` with a loop over D in ``BLOCK_D`` chunks (any D), and merges the
  row log-sum-exp online (running max, rescaled sum; every exponent is ≤ 0, so scales up to
  100 and beyond cannot overflow). The ``(I, T)`` pass also writes the diagonal ``I_i·T_i``.
  Memory: 2N fp32 LSE + N diagonal floats.
- ``_grad_rows_kernel``: one program per (block of A rows, chunk of D output columns)
  recomputes each tile, turns it into G (both softmax terms from the saved LSEs, minus the
  diagonal) and accumulates ``G·B_blk[:, chunk]``; the ``(I, T)`` pass also writes one
  ``Σ G·raw`` partial per row block (summed by the launcher in a fixed order: d(scale)).
  A tile is recomputed once per output chunk (``BLOCK_DO`` up to 256 columns: D ≤ 256 costs
  one recompute, D = 512 two).

Numerics: fp32 accumulation for every dtype; fp16/bf16 tiles go to the tensor cores as they
are, and ``2N·G`` (in [-2, 2]) is rounded to the input dtype for the ``G·B`` product, as flash
attention does with P; the ``1/(2N)`` factor and the upstream gradient are applied to the fp32
accumulator afterwards (applied before, most of an fp16 G underflows at N = 4096). fp32 tiles
use IEEE dots, not TF32. Every dot goes through ``_numerics.dot``, so the CPU interpreter runs
these same numerics (``EMULATE``); only tiles, warps and stages differ there.
Imports torch and triton only (DESIGN §4).
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from ._numerics import dot, round_to


@triton.jit
def _raw_tile(A, B, offs_m, offs_n, mmask, nmask, D, sam, sad, sbn, sbd,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
              EMULATE: tl.constexpr, PREC: tl.constexpr):
    """fp32 ``(BLOCK_M, BLOCK_N)`` tile of ``A[offs_m]·B[offs_n]ᵀ`` (masked rows give 0)."""
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    offs_d0 = tl.arange(0, BLOCK_D)
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + offs_d0
        dmask = offs_d < D
        a = tl.load(A + offs_m[:, None] * sam + offs_d[None, :] * sad,
                    mask=mmask[:, None] & dmask[None, :], other=0.0)
        b = tl.load(B + offs_n[:, None] * sbn + offs_d[None, :] * sbd,
                    mask=nmask[:, None] & dmask[None, :], other=0.0)
        acc = dot(a, tl.trans(b), acc, PREC, EMULATE)
    return acc


@triton.jit(do_not_specialize=["M", "N"])
def _lse_rows_kernel(
    A, B,  # (M, D), (N, D) feature rows, any strides
    LSE,  # (M,) fp32 out: log Σ_j exp(s·A_i·B_j)
    DIAG,  # (M,) fp32 out: A_i·B_i (written when WRITE_DIAG; needs M == N)
    SCALE,  # (1,) fp32 logit scale s (read on the device: no host sync)
    M, N, D,
    sam, sad, sbn, sbd,
    WRITE_DIAG: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    EMULATE: tl.constexpr,  # CPU interpreter: GPU dot numerics in exact fp32 (kernels/_numerics.py)
    PREC: tl.constexpr,  # tl.dot input precision for fp32 tiles
):
    pid = tl.program_id(0)
    offs_m = pid.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)  # 64-bit: N·D may exceed 2^31
    mmask = offs_m < M
    s = tl.load(SCALE).to(tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    diag = tl.zeros([BLOCK_M], dtype=tl.float32)
    offs_n0 = tl.arange(0, BLOCK_N).to(tl.int64)
    for start_n in range(0, N, BLOCK_N):
        offs_n = start_n + offs_n0
        nmask = offs_n < N
        raw = _raw_tile(A, B, offs_m, offs_n, mmask, nmask, D, sam, sad, sbn, sbd,
                        BLOCK_M, BLOCK_N, BLOCK_D, EMULATE, PREC)
        x = tl.where(nmask[None, :], raw * s, float("-inf"))
        # every block holds at least one valid column, so m_new is finite
        m_new = tl.maximum(m_i, tl.max(x, axis=1))
        l_i = l_i * tl.exp(m_i - m_new) + tl.sum(tl.exp(x - m_new[:, None]), axis=1)
        m_i = m_new
        if WRITE_DIAG:
            diag += tl.sum(tl.where(offs_m[:, None] == offs_n[None, :], raw, 0.0), axis=1)
    tl.store(LSE + offs_m, m_i + tl.log(l_i), mask=mmask)
    if WRITE_DIAG:
        tl.store(DIAG + offs_m, diag, mask=mmask)


@triton.jit(do_not_specialize=["M", "N"])
def _grad_rows_kernel(
    A, B,  # (M, D), (N, D) feature rows, any strides
    LSE_A,  # (M,) fp32 LSE of the rows of s·A·Bᵀ
    LSE_B,  # (N,) fp32 LSE of its columns (= rows of s·B·Aᵀ)
    DA,  # (M, D) out (A's dtype, contiguous): s·G·B
    DS_PART,  # (cdiv(M, BLOCK_M),) fp32 out: Σ_row-block G·raw (written when WRITE_DS)
    SCALE,  # (1,) fp32 s
    COEF,  # (1,) fp32 upstream gradient / (2N), applied after the tile products
    M, N, D,
    sam, sad, sbn, sbd,
    WRITE_DS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,  # D chunk of the raw-tile reduction
    BLOCK_DO: tl.constexpr,  # D chunk of the output owned by this program
    EMULATE: tl.constexpr,
    PREC: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_d = tl.program_id(1)
    offs_m = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
    mmask = offs_m < M
    offs_do = pid_d * BLOCK_DO + tl.arange(0, BLOCK_DO)
    domask = offs_do < D
    s = tl.load(SCALE).to(tl.float32)
    coef = tl.load(COEF).to(tl.float32)
    lse_a = tl.load(LSE_A + offs_m, mask=mmask, other=0.0)
    acc = tl.zeros([BLOCK_M, BLOCK_DO], dtype=tl.float32)
    ds = tl.zeros([BLOCK_M], dtype=tl.float32)
    offs_n0 = tl.arange(0, BLOCK_N).to(tl.int64)
    for start_n in range(0, N, BLOCK_N):
        offs_n = start_n + offs_n0
        nmask = offs_n < N
        raw = _raw_tile(A, B, offs_m, offs_n, mmask, nmask, D, sam, sad, sbn, sbd,
                        BLOCK_M, BLOCK_N, BLOCK_D, EMULATE, PREC)
        lse_b = tl.load(LSE_B + offs_n, mask=nmask, other=0.0)
        valid = mmask[:, None] & nmask[None, :]
        # -inf outside the matrix: exp gives exactly 0 there (a padded 0 logit minus a very
        # negative LSE would overflow before any mask)
        x = tl.where(valid, raw * s, float("-inf"))
        # 2N·G, in [-2, 2]: the 1/(2N) factor is applied after the products, so rounding this
        # tile to fp16 for the tensor cores cannot underflow (G itself is ~1/N² at N = 4096,
        # below fp16's smallest normal)
        g = tl.exp(x - lse_a[:, None]) + tl.exp(x - lse_b[None, :])
        g = tl.where(valid & (offs_m[:, None] == offs_n[None, :]), g - 2.0, g)
        if WRITE_DS:
            ds += tl.sum(g * raw, axis=1)
        b = tl.load(B + offs_n[:, None] * sbn + offs_do[None, :] * sbd,
                    mask=nmask[:, None] & domask[None, :], other=0.0)
        acc = dot(round_to(g, b.dtype, EMULATE), b, acc, PREC, EMULATE)
    out = round_to(acc * (s * coef), DA.dtype.element_ty, EMULATE)
    tl.store(DA + offs_m[:, None] * D + offs_do[None, :], out, mask=mmask[:, None] & domask[None, :])
    if WRITE_DS:
        if pid_d == 0:
            tl.store(DS_PART + pid_m, tl.sum(ds, axis=0) * coef)


# ----------------------------------------------------------------------------- launchers


class LossConfig(NamedTuple):
    """One launch configuration. ``emulate`` and ``prec`` affect numerics and depend on the dtype
    only (DESIGN §8); the tiles, warps and stages depend on where the kernel runs."""

    block_m: int
    block_n: int
    block_d: int  # D chunk of the raw-tile reduction
    block_do: int  # D chunk of the output owned by one backward program
    num_warps: int
    num_stages: int
    emulate: bool  # CPU interpreter: GPU dot numerics in exact fp32 (kernels/_numerics.py)
    prec: str  # tl.dot input precision for fp32 tiles


def numerics(dtype: torch.dtype) -> str:
    """``tl.dot`` input precision for this input dtype, the same on every device: IEEE for fp32
    (TF32 alone would exceed the fp32 1e-4 tolerance of DESIGN §7 at scale 100); 16-bit tiles
    go to the tensor cores as they are, with fp32 accumulation."""
    return "ieee"


def _config(d: int, dtype: torch.dtype, device: torch.device, bwd: bool, n: int = 0) -> LossConfig:
    """Launch configuration for ``n`` pairs of feature width ``d``."""
    bd = max(16, min(triton.next_power_of_2(d), 128))
    bdo = max(16, min(triton.next_power_of_2(d), 256))
    prec = numerics(dtype)
    if device.type != "cuda":
        # interpreter: few, large tiles (its cost is per op, not per flop): N = 4096 in 8 x 8 tiles
        t = min(512, max(64, triton.next_power_of_2(n) // 8))
        return LossConfig(t, t, bd, bdo, 4, 1, True, prec)
    fp32 = dtype == torch.float32
    if bwd:
        if fp32:  # a (64, 256) fp32 accumulator spills: 128 output columns (D = 512: 4 recomputes)
            return LossConfig(64, 32, 32, min(bdo, 128), 8, 1, False, prec)
        return LossConfig(64, 64, min(bd, 64), bdo, 8, 2, False, prec)
    return LossConfig((64 if fp32 else 128), 64, min(bd, 32 if fp32 else 64), bdo, (4 if fp32 else 8),
                      (2 if fp32 else 3), False, prec)


def _check(img, txt, scale):
    if img.dim() != 2 or txt.shape != img.shape:
        raise ValueError(f"img and txt must both be (N, D), got {tuple(img.shape)} and {tuple(txt.shape)}")
    if img.shape[0] < 1 or img.shape[1] < 1:
        raise ValueError(f"need N >= 1 and D >= 1, got img shape {tuple(img.shape)}")
    if img.dtype != txt.dtype or img.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"img/txt dtype must be one of float32/float16/bfloat16, got {img.dtype}/{txt.dtype}")
    if scale.numel() != 1 or scale.dtype != torch.float32 or scale.device != img.device:
        raise ValueError(f"scale must be a 1-element float32 tensor on {img.device}, got "
                         f"{tuple(scale.shape)} {scale.dtype} on {scale.device}")


def contrastive_fwd(img: torch.Tensor, txt: torch.Tensor, scale: torch.Tensor):
    """Forward launches.

    Args:
        img, txt: ``(N, D)`` float32/float16/bfloat16, one dtype and device, any strides;
            N >= 1, any D.
        scale: 1-element float32 tensor on the same device (the logit scale s).
    Returns:
        ``(loss, lse_row, lse_col)``: ``loss`` 0-d float32 (mean of both cross-entropy
        directions), ``lse_row``/``lse_col`` ``(N,)`` float32 (saved for the backward).
    Raises:
        ValueError: shapes, dtypes or scale as above.
    """
    _check(img, txt, scale)
    n, d = img.shape
    cfg = _config(d, img.dtype, img.device, bwd=False, n=n)
    f32 = dict(dtype=torch.float32, device=img.device)
    lse_row, lse_col, diag = torch.empty(n, **f32), torch.empty(n, **f32), torch.empty(n, **f32)
    grid = (triton.cdiv(n, cfg.block_m),)
    common = dict(BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_D=cfg.block_d, EMULATE=cfg.emulate,
                  PREC=cfg.prec, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    _lse_rows_kernel[grid](img, txt, lse_row, diag, scale, n, n, d,
                           img.stride(0), img.stride(1), txt.stride(0), txt.stride(1),
                           WRITE_DIAG=True, **common)
    _lse_rows_kernel[grid](txt, img, lse_col, diag, scale, n, n, d,
                           txt.stride(0), txt.stride(1), img.stride(0), img.stride(1),
                           WRITE_DIAG=False, **common)
    # N terms, summed in float64 on the device (fixed-shape reduction: deterministic)
    s = scale.reshape(()).double()
    loss = (lse_row.double().sum() + lse_col.double().sum() - 2.0 * s * diag.double().sum()) / (2.0 * n)
    return loss.float(), lse_row, lse_col


def contrastive_bwd(img, txt, scale, lse_row, lse_col, grad_out):
    """Backward launches (deterministic). Arguments as :func:`contrastive_fwd` plus the saved
    ``lse_row``/``lse_col`` and ``grad_out`` (1-element tensor, gradient of the loss).

    Returns:
        ``(d_img, d_txt, d_scale)``: ``d_img``/``d_txt`` contiguous ``(N, D)`` in the inputs'
        dtype, ``d_scale`` 0-d float32.
    """
    _check(img, txt, scale)
    n, d = img.shape
    cfg = _config(d, img.dtype, img.device, bwd=True, n=n)
    coef = (grad_out.detach().to(device=img.device, dtype=torch.float64).reshape(1) / (2.0 * n)).float()
    d_img = torch.empty((n, d), dtype=img.dtype, device=img.device)
    d_txt = torch.empty((n, d), dtype=txt.dtype, device=txt.device)
    ds_part = torch.empty(triton.cdiv(n, cfg.block_m), dtype=torch.float32, device=img.device)
    grid = (triton.cdiv(n, cfg.block_m), triton.cdiv(d, cfg.block_do))
    common = dict(BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_D=cfg.block_d, BLOCK_DO=cfg.block_do,
                  EMULATE=cfg.emulate, PREC=cfg.prec, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    _grad_rows_kernel[grid](img, txt, lse_row, lse_col, d_img, ds_part, scale, coef, n, n, d,
                            img.stride(0), img.stride(1), txt.stride(0), txt.stride(1),
                            WRITE_DS=True, **common)
    _grad_rows_kernel[grid](txt, img, lse_col, lse_row, d_txt, ds_part, scale, coef, n, n, d,
                            txt.stride(0), txt.stride(1), img.stride(0), img.stride(1),
                            WRITE_DS=False, **common)
    d_scale = ds_part.double().sum().float()
    return d_img, d_txt, d_scale


def _interpreted() -> bool:
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(_lse_rows_kernel, InterpretedFunction)


# whether these kernels were built for the CPU interpreter (decided once, at import)
INTERPRETED = _interpreted()
