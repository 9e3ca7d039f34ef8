"""Fused sigmoid (SigLIP) loss in Triton: forward and deterministic backward that never hold the
N_I x N_T logits (the GPU fallback of ``csrc/sigmoid`` when the extension is not built).

Source: Zhai et al. 2023, "Sigmoid Loss for Language Image Pre-Training" (the loss), with the
flash-attention-style tiling of ``kernels/contrastive.py`` (the schedule). Notation (issue 10,
as ``csrc/sigmoid/sigmoid_tile.h``): I is ``(N_I, D)``, T is ``(N_T, D)``, s the logit scale,
b the logit bias, ``raw = I·Tᵀ`` (only ever formed one tile at a time), ``y = s·raw + b``,
``z_ij = +1`` for the positive pair ``i == j`` (none when ``negative_only``) and -1 otherwise,
``q = -z·y``::

    loss = (1/N_I) Σ_ij softplus(q_ij)
    G_ij = dloss/dy_ij = -z_ij·σ(q_ij) / N_I
    dI = s·G·T,   dT = s·Gᵀ·I,   dloss/ds = Σ_ij G_ij·raw_ij,   dloss/db = Σ_ij G_ij

softplus and σ both come from ``e = exp(-|q|) <= 1``, so nothing overflows for any s and b:
``softplus(q) = max(q, 0) + log1p(e)`` with log1p by the atanh series of
``csrc/common/tile_math.h::log1p_unit`` (tiny e keep their full relative precision, where
``log(1 + e)`` would round to 0), and ``σ(q) = (q >= 0 ? 1 : e) / (1 + e)``. A positive is
computed as its own term, never as a negative plus a correction (which cancels for large y).

Both kernels take a generic pair ``(A, B)`` of row matrices; the positives sit on the diagonal
``row == column`` of either orientation (``N_I == N_T`` when there are positives), and the
coefficient is ``1/N_I`` in both (the loss is normalized by the image count whichever matrix
is A). No state is kept between passes (the loss is a plain sum: no LSE), and each program owns
whole output rows, so nothing is merged across programs and no atomics are used:

- ``_sig_loss_rows_kernel``: one program per block of A rows streams the blocks of B rows,
  forms the raw tile with ``contrastive._raw_tile`` (any D, in ``BLOCK_D`` chunks) and writes
  the row sums of softplus; the launcher sums the rows in float64 in a fixed order. The loss is
  symmetric in the swap, so A is whichever matrix has more rows (more programs).
- ``_sig_grad_rows_kernel``: one program per (block of A rows, chunk of D output columns)
  recomputes each tile, turns it into ``N_I·G`` and accumulates ``N_I·G·B_blk[:, chunk]``; run
  with ``(A, B) = (I, T)`` for dI (also writing one ``Σ G·raw`` and one ``Σ G`` partial per row
  block: d(scale), d(bias)) and with ``(T, I)`` for dT.

Numerics: fp32 accumulation for every dtype; fp16/bf16 tiles go to the tensor cores as they
are, and ``G_SCALE·N_I·G`` is rounded to the input dtype for the ``G·B`` product (as flash
attention does with P): ``N_I·G = -z·σ(q)`` lies in [-1, 1] and ``G_SCALE`` is 2^15 for fp16
(a σ(y) of a SigLIP negative at bias -10 is ~4.5e-5, below fp16's smallest normal; scaled, it
keeps 11 bits, and 2^15·1 stays below fp16's maximum) and 1 for bf16 (fp32's exponent range).
The power of two, the ``1/N_I`` and the upstream gradient are applied to the fp32 accumulator
afterwards. fp32 tiles use IEEE dots, not TF32. Every dot goes through ``_numerics.dot``, so
the CPU interpreter runs these same numerics (``EMULATE``), and so does every rounding to bf16
(``_numerics.round_to``: the interpreter would truncate); only tiles, warps and stages differ there.
Imports torch and triton only (DESIGN §4).
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from ._numerics import dot, round_to
from .contrastive import _raw_tile


@triton.jit
def _log1p_unit(e):
    """``log(1 + e)`` for fp32 ``e`` in [0, 1], a few ulp relative for every e (tiny ones too):
    ``2·atanh(t)``, ``t = e / (2 + e)`` in [0, 1/3], the atanh series truncated after t^14
    (``csrc/common/tile_math.h::log1p_unit``, term for term)."""
    t = e / (2.0 + e)
    t2 = t * t
    p = 0.06666666666666667  # 1/15
    p = p * t2 + 0.07692307692307693  # 1/13
    p = p * t2 + 0.09090909090909091  # 1/11
    p = p * t2 + 0.1111111111111111  # 1/9
    p = p * t2 + 0.14285714285714285  # 1/7
    p = p * t2 + 0.2
    p = p * t2 + 0.3333333333333333
    p = p * t2 + 1.0
    return 2.0 * t * p


@triton.jit
def _signed_logits(A, B, s, b, offs_m, offs_n, mmask, nmask, D, sam, sad, sbn, sbd,
                   HAS_POS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   BLOCK_D: tl.constexpr, EMULATE: tl.constexpr, PREC: tl.constexpr):
    """``(raw, q, pos, valid)`` of one tile: fp32 raw products, ``q = -z·(s·raw + b)`` (``s``,
    ``b`` fp32 scalars), the positive mask (diagonal, only with ``HAS_POS``) and the in-matrix
    mask."""
    raw = _raw_tile(A, B, offs_m, offs_n, mmask, nmask, D, sam, sad, sbn, sbd,
                    BLOCK_M, BLOCK_N, BLOCK_D, EMULATE, PREC)
    y = raw * s + b
    valid = mmask[:, None] & nmask[None, :]
    if HAS_POS:
        pos = valid & (offs_m[:, None] == offs_n[None, :])
    else:
        pos = valid & False
    q = tl.where(pos, -y, y)
    return raw, q, pos, valid


@triton.jit(do_not_specialize=["M", "N"])
def _sig_loss_rows_kernel(
    A, B,  # (M, D), (N, D) feature rows, any strides
    LOSS_ROWS,  # (M,) fp32 out: Σ_j softplus(q_ij) of each A row (before 1/N_I)
    SCALE,  # (1,) fp32 logit scale s (read on the device: no host sync)
    BIAS,  # (1,) fp32 logit bias b
    M, N, D,
    sam, sad, sbn, sbd,
    HAS_POS: tl.constexpr,  # positives on the diagonal (not negative_only; needs M == N)
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
    bias = tl.load(BIAS).to(tl.float32)
    acc = tl.zeros([BLOCK_M], dtype=tl.float32)
    offs_n0 = tl.arange(0, BLOCK_N).to(tl.int64)
    for start_n in range(0, N, BLOCK_N):
        offs_n = start_n + offs_n0
        nmask = offs_n < N
        raw, q, pos, valid = _signed_logits(A, B, s, bias, offs_m, offs_n, mmask, nmask, D,
                                            sam, sad, sbn, sbd, HAS_POS, BLOCK_M, BLOCK_N, BLOCK_D,
                                            EMULATE, PREC)
        # padding holds y = b, a finite nonzero term: it must be dropped, not merely masked in the load
        term = tl.maximum(q, 0.0) + _log1p_unit(tl.exp(-tl.abs(q)))
        acc += tl.sum(tl.where(valid, term, 0.0), axis=1)
    tl.store(LOSS_ROWS + offs_m, acc, mask=mmask)


@triton.jit(do_not_specialize=["M", "N"])
def _sig_grad_rows_kernel(
    A, B,  # (M, D), (N, D) feature rows, any strides
    DA,  # (M, D) out (A's dtype, contiguous): s·G·B
    DS_PART,  # (cdiv(M, BLOCK_M),) fp32 out: Σ_row-block G·raw (written when WRITE_DS)
    DB_PART,  # (cdiv(M, BLOCK_M),) fp32 out: Σ_row-block G (written when WRITE_DS)
    SCALE,  # (1,) fp32 s
    BIAS,  # (1,) fp32 b
    COEF,  # (1,) fp32 upstream gradient / N_I, applied after the tile products
    M, N, D,
    sam, sad, sbn, sbd,
    HAS_POS: tl.constexpr,
    WRITE_DS: tl.constexpr,
    G_SCALE: tl.constexpr,  # power of two applied to N_I·G before its rounding to B's dtype
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
    bias = tl.load(BIAS).to(tl.float32)
    coef = tl.load(COEF).to(tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DO], dtype=tl.float32)
    ds = tl.zeros([BLOCK_M], dtype=tl.float32)
    db = tl.zeros([BLOCK_M], dtype=tl.float32)
    offs_n0 = tl.arange(0, BLOCK_N).to(tl.int64)
    for start_n in range(0, N, BLOCK_N):
        offs_n = start_n + offs_n0
        nmask = offs_n < N
        raw, q, pos, valid = _signed_logits(A, B, s, bias, offs_m, offs_n, mmask, nmask, D,
                                            sam, sad, sbn, sbd, HAS_POS, BLOCK_M, BLOCK_N, BLOCK_D,
                                            EMULATE, PREC)
        e = tl.exp(-tl.abs(q))
        sig = tl.where(q >= 0.0, 1.0, e) / (1.0 + e)
        # N_I·G = -z·σ(q); padding (y = b there) must give exactly 0 to the products and sums
        g = tl.where(valid, tl.where(pos, -sig, sig), 0.0)
        if WRITE_DS:
            ds += tl.sum(g * raw, axis=1)
            db += tl.sum(g, axis=1)
        b = tl.load(B + offs_n[:, None] * sbn + offs_do[None, :] * sbd,
                    mask=nmask[:, None] & domask[None, :], other=0.0)
        if G_SCALE != 1.0:
            g = g * G_SCALE
        acc = dot(round_to(g, b.dtype, EMULATE), b, acc, PREC, EMULATE)
    out = round_to(acc * (s * coef * (1.0 / G_SCALE)), DA.dtype.element_ty, EMULATE)
    tl.store(DA + offs_m[:, None] * D + offs_do[None, :], out, mask=mmask[:, None] & domask[None, :])
    if WRITE_DS:
        if pid_d == 0:
            tl.store(DS_PART + pid_m, tl.sum(ds, axis=0) * coef)
            tl.store(DB_PART + pid_m, tl.sum(db, axis=0) * coef)


# ----------------------------------------------------------------------------- launchers


class SigmoidConfig(NamedTuple):
    """One launch configuration. ``emulate``, ``prec`` and ``g_scale`` affect numerics and
    depend on the dtype only (DESIGN §8); the tiles, warps and stages depend on where the kernel
    runs."""

    block_m: int
    block_n: int
    block_d: int  # D chunk of the raw-tile reduction
    block_do: int  # D chunk of the output owned by one backward program
    num_warps: int
    num_stages: int
    emulate: bool  # CPU interpreter: GPU dot numerics in exact fp32 (kernels/_numerics.py)
    prec: str  # tl.dot input precision for fp32 tiles
    g_scale: float  # power of two on N_I·G before its rounding to the input dtype


def numerics(dtype: torch.dtype) -> str:
    """``tl.dot`` input precision for this input dtype, the same on every device: IEEE for fp32
    (TF32 would exceed the fp32 1e-4 tolerance of DESIGN §7 at scale 100, as for InfoNCE);
    16-bit tiles go to the tensor cores as they are, with fp32 accumulation."""
    return "ieee"


def g_scale(dtype: torch.dtype) -> float:
    """Power of two applied to ``N_I·G`` (in [-1, 1]) before its rounding to ``dtype``: 2^15
    for fp16 (keeps σ down to ~2e-9 normal; 2^15 < fp16's max 65504), 1 for bf16 and fp32."""
    return 32768.0 if dtype == torch.float16 else 1.0


def _config(d: int, dtype: torch.dtype, device: torch.device, bwd: bool, n: int = 0) -> SigmoidConfig:
    """Launch configuration for feature width ``d`` and ``n`` rows (the larger of N_I, N_T)."""
    bd = max(16, min(triton.next_power_of_2(d), 128))
    bdo = max(16, min(triton.next_power_of_2(d), 256))
    prec, gs = numerics(dtype), g_scale(dtype)
    if device.type != "cuda":
        # interpreter: few, large tiles (its cost is per op, not per flop): N = 4096 in 8 x 8 tiles
        t = min(512, max(64, triton.next_power_of_2(n) // 8))
        return SigmoidConfig(t, t, bd, bdo, 4, 1, True, prec, gs)
    # the InfoNCE kernels' GPU tiles: the same tile products, with a few more elementwise ops
    fp32 = dtype == torch.float32
    if bwd:
        if fp32:  # a (64, 256) fp32 accumulator spills: 128 output columns
            return SigmoidConfig(64, 32, 32, min(bdo, 128), 8, 1, False, prec, gs)
        return SigmoidConfig(64, 64, min(bd, 64), bdo, 8, 2, False, prec, gs)
    return SigmoidConfig((64 if fp32 else 128), 64, min(bd, 32 if fp32 else 64), bdo, (4 if fp32 else 8),
                         (2 if fp32 else 3), False, prec, gs)


def _param(t, name: str, device) -> None:
    if t.numel() != 1 or t.dtype != torch.float32 or t.device != device:
        raise ValueError(f"{name} must be a 1-element float32 tensor on {device}, got "
                         f"{tuple(t.shape)} {t.dtype} on {t.device}")


def _check(img, txt, scale, bias, negative_only):
    if img.dim() != 2 or txt.dim() != 2 or img.shape[1] != txt.shape[1]:
        raise ValueError(f"img and txt must be (N_I, D) and (N_T, D), got {tuple(img.shape)} and "
                         f"{tuple(txt.shape)}")
    if img.shape[0] < 1 or txt.shape[0] < 1 or img.shape[1] < 1:
        raise ValueError(f"need N_I, N_T >= 1 and D >= 1, got {tuple(img.shape)} and {tuple(txt.shape)}")
    if not negative_only and img.shape[0] != txt.shape[0]:
        raise ValueError(f"positive pairs need N_I == N_T, got {img.shape[0]} and {txt.shape[0]} "
                         "(only negative_only scores unequal counts)")
    if img.dtype != txt.dtype or img.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"img/txt dtype must be one of float32/float16/bfloat16, got {img.dtype}/{txt.dtype}")
    if txt.device != img.device:
        raise ValueError(f"img and txt on different devices: {img.device}, {txt.device}")
    _param(scale, "scale", img.device)
    _param(bias, "bias", img.device)


def _bias(bias, img):
    return torch.zeros(1, dtype=torch.float32, device=img.device) if bias is None else bias


def _int32_columns(x: torch.Tensor) -> torch.Tensor:
    """``x``, copied to row-major when a column offset ``d·stride(1)`` could pass 2^31: the
    kernels (and ``contrastive._raw_tile``) keep row offsets in int64 but column offsets in
    int32 (cheaper), which only a column-major-like layout of > 2^31 elements overflows."""
    return x.contiguous() if x.shape[1] * abs(x.stride(1)) >= 2**31 else x


def sigmoid_fwd(img: torch.Tensor, txt: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None,
                negative_only: bool) -> torch.Tensor:
    """Forward launch.

    Args:
        img: ``(N_I, D)``, txt: ``(N_T, D)``; float32/float16/bfloat16, one dtype and device,
            any strides; N_I, N_T >= 1 (equal unless ``negative_only``), any D >= 1.
        scale, bias: 1-element float32 tensors on the same device (s and b; ``bias`` None: 0).
        negative_only: no positive pairs (every pair scores as a negative).
    Returns:
        0-d float32 loss ``(1/N_I) Σ_ij softplus(q_ij)`` (row sums reduced in float64 in a
        fixed order: deterministic).
    Raises:
        ValueError: shapes, dtypes, devices or scale/bias as above.
    """
    bias = _bias(bias, img)
    _check(img, txt, scale, bias, negative_only)
    img, txt = _int32_columns(img), _int32_columns(txt)
    n_img = img.shape[0]
    a, b = (txt, img) if txt.shape[0] > img.shape[0] else (img, txt)  # more rows, more programs
    m, n, d = a.shape[0], b.shape[0], a.shape[1]
    cfg = _config(d, img.dtype, img.device, bwd=False, n=max(m, n))
    rows = torch.empty(m, dtype=torch.float32, device=img.device)
    _sig_loss_rows_kernel[(triton.cdiv(m, cfg.block_m),)](
        a, b, rows, scale, bias, m, n, d, a.stride(0), a.stride(1), b.stride(0), b.stride(1),
        HAS_POS=not negative_only, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_D=cfg.block_d,
        EMULATE=cfg.emulate, PREC=cfg.prec, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return (rows.double().sum() / n_img).float()


def sigmoid_bwd(img, txt, scale, bias, grad_out, negative_only):
    """Backward launches (deterministic). Arguments as :func:`sigmoid_fwd` plus ``grad_out``
    (1-element tensor on the device, the gradient of the loss).

    Returns:
        ``(d_img, d_txt, d_scale, d_bias)``: ``d_img`` ``(N_I, D)`` and ``d_txt`` ``(N_T, D)``
        contiguous in the inputs' dtype, ``d_scale``/``d_bias`` 0-d float32.
    """
    bias = _bias(bias, img)
    _check(img, txt, scale, bias, negative_only)
    img, txt = _int32_columns(img), _int32_columns(txt)
    n_img, d = img.shape
    n_txt = txt.shape[0]
    cfg = _config(d, img.dtype, img.device, bwd=True, n=max(n_img, n_txt))
    coef = (grad_out.detach().to(device=img.device, dtype=torch.float64).reshape(1) / n_img).float()
    d_img = torch.empty((n_img, d), dtype=img.dtype, device=img.device)
    d_txt = torch.empty((n_txt, d), dtype=txt.dtype, device=txt.device)
    parts = torch.empty(2, triton.cdiv(n_img, cfg.block_m), dtype=torch.float32, device=img.device)
    common = dict(HAS_POS=not negative_only, G_SCALE=cfg.g_scale, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
                  BLOCK_D=cfg.block_d, BLOCK_DO=cfg.block_do, EMULATE=cfg.emulate, PREC=cfg.prec,
                  num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    n_do = triton.cdiv(d, cfg.block_do)
    _sig_grad_rows_kernel[(triton.cdiv(n_img, cfg.block_m), n_do)](
        img, txt, d_img, parts[0], parts[1], scale, bias, coef, n_img, n_txt, d,
        img.stride(0), img.stride(1), txt.stride(0), txt.stride(1), WRITE_DS=True, **common)
    _sig_grad_rows_kernel[(triton.cdiv(n_txt, cfg.block_m), n_do)](
        txt, img, d_txt, parts[0], parts[1], scale, bias, coef, n_txt, n_img, d,
        txt.stride(0), txt.stride(1), img.stride(0), img.stride(1), WRITE_DS=False, **common)
    sums = parts.double().sum(dim=1).float()
    return d_img, d_txt, sums[0], sums[1]


def _interpreted() -> bool:
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(_sig_loss_rows_kernel, InterpretedFunction)


# whether these kernels were built for the CPU interpreter (decided once, at import)
INTERPRETED = _interpreted()
