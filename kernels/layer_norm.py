"""Modality-indexed LayerNorm: Triton forward/backward kernels and their launchers.

One launch normalizes the rows of every modality, each row with the gain/bias row of its
modality (``weight``/``bias`` are ``(M, D)``), optionally after a fused residual add whose sum
is also written (it is the next block's residual stream). ``x`` and the residual may have
different dtypes (autocast: bf16/fp16 update, fp32 stream): both are read as fp32 and the sum
and output are stored in the launcher's promoted dtype.

Numerics (DESIGN §7): statistics in fp32 whatever the input dtype; eps inside the rsqrt
(TF style, as MS-CLIP); the row is shifted by its first element before the mean/variance
(``c = (x - x0) - mean(x - x0)``), so a constant row gives ``c == 0`` exactly and the output
is exactly the bias, and large row means do not cancel digits.

Backward is deterministic: each program owns a contiguous chunk of rows, writes ``dx`` for
them and its own partial ``dweight``/``dbias`` sums ``(P, M, D)``; the launcher reduces the
partials with one ``sum(0)`` (fixed order), no atomics.

This module imports torch and triton only (DESIGN §4). Source: the Triton layer-norm
tutorial's structure (fp32 statistics, per-program partial weight gradients), extended with
modality indexing, 2-D row tiles and 64-bit offsets.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

# Elements per program tile: rows per tile = max(1, TILE_ELEMS // BLOCK_D).
_TILE_ELEMS = 4096


@triton.jit(do_not_specialize=["T", "MOD"])  # rows and the modality vary per call
def _ln_fwd_kernel(
    X,  # (T, D) input rows, contiguous
    R,  # (T, D) residual rows (read when HAS_RES)
    S,  # (T, D) out: x + residual (written when HAS_RES)
    Y,  # (T, D) out: normalized rows
    W,  # (M, D) gains
    B,  # (M, D) biases
    IDS,  # (T,) modality id per row (read when HAS_IDS)
    SHIFT,  # (T,) fp32 out: mean of (row - row[0])
    RSTD,  # (T,) fp32 out: 1/sqrt(var + eps)
    T,  # number of rows
    D,  # row width
    MOD,  # the modality of every row when not HAS_IDS
    eps,
    HAS_RES: tl.constexpr,
    HAS_IDS: tl.constexpr,
    ROWS: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid.to(tl.int64) * ROWS + tl.arange(0, ROWS).to(tl.int64)  # 64-bit: T*D may exceed 2^31
    cols = tl.arange(0, BLOCK_D)
    rmask = rows < T
    cmask = cols < D
    mask = rmask[:, None] & cmask[None, :]
    offs = rows[:, None] * D + cols[None, :]
    x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
    x0 = tl.load(X + rows * D, mask=rmask, other=0.0).to(tl.float32)
    if HAS_RES:
        x = x + tl.load(R + offs, mask=mask, other=0.0).to(tl.float32)
        x0 = x0 + tl.load(R + rows * D, mask=rmask, other=0.0).to(tl.float32)
        # the stored sum is rounded to the io dtype; normalize that rounded value so that
        # forward and backward (which reloads S) see the same numbers
        s_io = x.to(S.dtype.element_ty)
        tl.store(S + offs, s_io, mask=mask)
        x = s_io.to(tl.float32)
        x0 = x0.to(S.dtype.element_ty).to(tl.float32)
    d = tl.where(mask, x - x0[:, None], 0.0)
    shift = tl.sum(d, axis=1) / D
    c = tl.where(mask, d - shift[:, None], 0.0)
    var = tl.sum(c * c, axis=1) / D
    rstd = 1.0 / tl.sqrt(var + eps)
    if HAS_IDS:
        m = tl.load(IDS + rows, mask=rmask, other=0).to(tl.int64)
    else:
        m = tl.zeros([ROWS], dtype=tl.int64) + MOD
    woffs = m[:, None] * D + cols[None, :]
    w = tl.load(W + woffs, mask=mask, other=0.0).to(tl.float32)
    b = tl.load(B + woffs, mask=mask, other=0.0).to(tl.float32)
    y = c * rstd[:, None] * w + b
    tl.store(Y + offs, y.to(Y.dtype.element_ty), mask=mask)
    tl.store(SHIFT + rows, shift, mask=rmask)
    tl.store(RSTD + rows, rstd, mask=rmask)


@triton.jit(do_not_specialize=["T", "MOD", "rows_per_prog"])  # rows and the modality vary per call
def _ln_bwd_kernel(
    X,  # (T, D) the normalized input (x, or x + residual as stored by the forward)
    DY,  # (T, D) gradient of the normalized output
    DS,  # (T, D) gradient of the returned sum (read when HAS_DS)
    DX,  # (T, D) out: gradient of x (= gradient of the residual)
    W,  # (M, D) gains
    IDS,  # (T,) modality ids (read when HAS_IDS)
    SHIFT,  # (T,) fp32 from the forward
    RSTD,  # (T,) fp32 from the forward
    DW,  # (P, M, D) fp32 out: this program's partial dweight
    DB,  # (P, M, D) fp32 out: this program's partial dbias
    T,
    D,
    MOD,
    rows_per_prog,  # rows owned by one program (a multiple of ROWS)
    M: tl.constexpr,
    M_PAD: tl.constexpr,  # next power of two >= M (tile height of the partial sums)
    HAS_DS: tl.constexpr,
    HAS_IDS: tl.constexpr,
    ROWS: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_D)
    cmask = cols < D
    mrow = tl.arange(0, M_PAD)
    dw_acc = tl.zeros([M_PAD, BLOCK_D], dtype=tl.float32)
    db_acc = tl.zeros([M_PAD, BLOCK_D], dtype=tl.float32)
    start = pid.to(tl.int64) * rows_per_prog
    for r0 in range(0, rows_per_prog, ROWS):
        rows = start + r0 + tl.arange(0, ROWS).to(tl.int64)
        rmask = rows < T
        mask = rmask[:, None] & cmask[None, :]
        offs = rows[:, None] * D + cols[None, :]
        if HAS_IDS:
            m = tl.load(IDS + rows, mask=rmask, other=0).to(tl.int64)
        else:
            m = tl.zeros([ROWS], dtype=tl.int64) + MOD
        x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
        x0 = tl.load(X + rows * D, mask=rmask, other=0.0).to(tl.float32)
        shift = tl.load(SHIFT + rows, mask=rmask, other=0.0)
        rstd = tl.load(RSTD + rows, mask=rmask, other=0.0)
        # same expression as the forward's c * rstd, from the same fp32 inputs
        xhat = tl.where(mask, (x - x0[:, None] - shift[:, None]) * rstd[:, None], 0.0)
        dy = tl.load(DY + offs, mask=mask, other=0.0).to(tl.float32)
        w = tl.load(W + m[:, None] * D + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        g = dy * w
        mean_g = tl.sum(g, axis=1) / D
        mean_gx = tl.sum(g * xhat, axis=1) / D
        dx = (g - mean_g[:, None] - xhat * mean_gx[:, None]) * rstd[:, None]
        if HAS_DS:
            dx = dx + tl.load(DS + offs, mask=mask, other=0.0).to(tl.float32)
        tl.store(DX + offs, dx.to(DX.dtype.element_ty), mask=mask)
        dyx = dy * xhat
        # per-modality column sums of this tile, placed in row mi of the (M_PAD, D) partials
        for mi in tl.static_range(M):
            sel = (m == mi)[:, None]
            pw = tl.sum(tl.where(sel, dyx, 0.0), axis=0)
            pb = tl.sum(tl.where(sel, dy, 0.0), axis=0)
            hit = (mrow == mi)[:, None]
            dw_acc += tl.where(hit, pw[None, :], 0.0)
            db_acc += tl.where(hit, pb[None, :], 0.0)
    poffs = (pid.to(tl.int64) * M + mrow[:, None]) * D + cols[None, :]
    pmask = (mrow < M)[:, None] & cmask[None, :]
    tl.store(DW + poffs, dw_acc, mask=pmask)
    tl.store(DB + poffs, db_acc, mask=pmask)


def _blocks(D: int) -> tuple[int, int, int]:
    """(BLOCK_D, ROWS, num_warps) for width D."""
    block_d = triton.next_power_of_2(max(D, 1))
    rows = max(1, _TILE_ELEMS // block_d)
    num_warps = min(max(block_d * rows // 512, 1), 8)
    return block_d, rows, num_warps


def _ids_arg(x2: torch.Tensor, modality_ids):
    """(IDS tensor, MOD int, HAS_IDS) for the kernels."""
    if isinstance(modality_ids, int):
        return x2, int(modality_ids), False  # IDS unused: any pointer will do
    return modality_ids.reshape(-1).contiguous(), 0, True


def layer_norm_fwd(x, weight, bias, modality_ids, eps: float, residual=None):
    """Launch the forward.

    Args:
        x: ``(T, D)`` contiguous fp32/fp16/bf16 rows.
        weight, bias: ``(M, D)`` (any float dtype; read as fp32).
        modality_ids: ``(T,)`` integer tensor or a Python int.
        eps: variance epsilon.
        residual: optional contiguous ``(T, D)`` fp32/fp16/bf16 rows, of x's dtype or another
            one (mixed precision: e.g. an fp32 residual stream and a bf16 update ``x``).
    Returns:
        ``(y, s, shift, rstd)``: ``s`` the sum ``x + residual`` (``None`` without residual) in
        ``torch.promote_types(x.dtype, residual.dtype)``, as torch's ``x + residual``; ``y``
        ``(T, D)`` in the dtype of what was normalized (x's, or the sum's);
        ``shift``/``rstd`` ``(T,)`` fp32 statistics for the backward.
    """
    T, D = x.shape
    if residual is not None:
        # the kernel reads both as fp32 and stores S and Y in their own element types
        sdt = torch.promote_types(x.dtype, residual.dtype)
        s = torch.empty((T, D), dtype=sdt, device=x.device)
        y = torch.empty((T, D), dtype=sdt, device=x.device)
    else:
        s, y = None, torch.empty_like(x)
    shift = torch.empty(T, dtype=torch.float32, device=x.device)
    rstd = torch.empty(T, dtype=torch.float32, device=x.device)
    if T == 0:
        return y, s, shift, rstd
    block_d, rows, num_warps = _blocks(D)
    ids, mod, has_ids = _ids_arg(x, modality_ids)
    grid = (triton.cdiv(T, rows),)
    _ln_fwd_kernel[grid](
        x, residual if residual is not None else x, s if s is not None else y, y,
        weight.contiguous(), bias.contiguous(), ids, shift, rstd, T, D, mod, float(eps),
        HAS_RES=residual is not None, HAS_IDS=has_ids, ROWS=rows, BLOCK_D=block_d,
        num_warps=num_warps,
    )
    return y, s, shift, rstd


def layer_norm_bwd(dy, xs, weight, modality_ids, shift, rstd, ds=None, max_programs: int | None = None):
    """Launch the backward.

    Args:
        dy: ``(T, D)`` gradient of the normalized output.
        xs: ``(T, D)`` what was normalized (``x`` or the stored sum ``x + residual``); ``dy``
            and ``ds`` may have other float dtypes (each is read as fp32).
        weight: ``(M, D)``.
        modality_ids: as in :func:`layer_norm_fwd`.
        shift, rstd: ``(T,)`` fp32 from the forward.
        ds: optional ``(T, D)`` gradient of the returned sum.
        max_programs: cap on programs (partial-sum buffers); default 4 x SMs on CUDA, 64 else.
    Returns:
        ``(dx, dweight, dbias)``: ``dx`` ``(T, D)`` in xs's dtype (also the residual's
        gradient); ``dweight``/``dbias`` ``(M, D)`` fp32.
    """
    T, D = xs.shape
    M = weight.shape[0]
    dy = dy.contiguous()
    ds = ds.contiguous() if ds is not None else None
    dx = torch.empty_like(xs)
    if T == 0:
        z = torch.zeros(M, D, dtype=torch.float32, device=xs.device)
        return dx, z, z.clone()
    block_d, rows, num_warps = _blocks(D)
    if max_programs is None:
        max_programs = 4 * torch.cuda.get_device_properties(xs.device).multi_processor_count if xs.is_cuda else 64
    tiles = triton.cdiv(T, rows)
    progs = min(tiles, max_programs)
    rows_per_prog = triton.cdiv(tiles, progs) * rows
    progs = triton.cdiv(T, rows_per_prog)
    dw = torch.empty(progs, M, D, dtype=torch.float32, device=xs.device)
    db = torch.empty(progs, M, D, dtype=torch.float32, device=xs.device)
    ids, mod, has_ids = _ids_arg(xs, modality_ids)
    _ln_bwd_kernel[(progs,)](
        xs, dy, ds if ds is not None else dy, dx, weight.contiguous(), ids, shift, rstd, dw, db,
        T, D, mod, rows_per_prog,
        M=M, M_PAD=triton.next_power_of_2(M), HAS_DS=ds is not None, HAS_IDS=has_ids, ROWS=rows, BLOCK_D=block_d, num_warps=num_warps,
    )
    # fixed-order reduction of the per-program partials: deterministic
    return dx, dw.sum(0), db.sum(0)


def _interpreted() -> bool:
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(_ln_fwd_kernel, InterpretedFunction)


# whether these kernels were built for the CPU interpreter (decided once, at import)
INTERPRETED = _interpreted()
