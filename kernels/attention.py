"""Flash-style softmax attention: Triton forward and deterministic backward, batched and varlen.

Layouts (one kernel family for both; strides are passed, so inputs may be non-contiguous):
- batched ``(B, H, L, K)``: program ``b`` reads rows ``b*stride_b + l*stride_t``;
- varlen ``(T, H, K)`` with ``cu_seqlens`` ``(S+1,)`` int32: sequence ``b`` is rows
  ``cu[b] .. cu[b+1]`` (``stride_b = 0``).
Causal masking: none, all, or per sequence from an ``(S,)`` int8 flag tensor (text causal and
images not, in one launch).

Forward (Dao et al. 2022, FlashAttention-2 loop order): one program per (query block,
sequence, head) streams key blocks with an online softmax in fp32 and writes ``O`` and the
row log-sum-exp ``LSE`` (fp32, base 2, of ``q·k·scale·log2(e)``); no ``L x L`` matrix exists.

Backward, deterministic (no atomics): ``delta = rowsum(dO ∘ O)`` (one kernel), then one
kernel where each program owns a key block and accumulates ``dK``/``dV`` over query blocks,
and one where each program owns a query block and accumulates ``dQ`` over key blocks (the
scores are recomputed in both; that is the price of owning every output element).

Head dims up to 128: the head dim is padded to ``BLOCK_K = max(16, next_pow2(K))`` by masked
loads (80 and 96 run as 128). Tiles are chosen for the sequence length (:func:`seq_block`:
32-row tiles for 77 text tokens, 64 for 50 image tokens), not fixed at 128 rows.
Numerics: fp16/bf16 tiles go to the tensor cores with fp32 accumulation, P and dS are rounded to
the input dtype for their products (as FlashAttention does); fp32 inputs use IEEE (not TF32)
dots. Every dot goes through ``_numerics.dot``, so the CPU interpreter runs these same numerics
(``EMULATE``); only tiles, warps and stages differ there.
Imports torch and triton only (DESIGN §4).
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from ._numerics import dot

LOG2E = 1.4426950408889634
MAX_HEAD_DIM = 128


@triton.jit
def _seq_bounds(CU, b, L, VARLEN: tl.constexpr):
    """(first row of sequence b along the token axis (int64), its length (int32))."""
    if VARLEN:
        lo = tl.load(CU + b)
        start = lo.to(tl.int64)
        seqlen = (tl.load(CU + b + 1) - lo).to(tl.int32)
    else:
        start = tl.zeros([], dtype=tl.int64)
        seqlen = tl.zeros([], dtype=tl.int32) + L
    return start, seqlen


@triton.jit
def _causal_flag(CAUSAL, b, CAUSAL_MODE: tl.constexpr):
    """int32 scalar, nonzero when sequence b is causal. Modes 0/1 give a compile-time
    constant, so the masks below fold away; mode 2 reads the per-sequence flag."""
    if CAUSAL_MODE == 2:
        f = tl.load(CAUSAL + b).to(tl.int32)
    else:
        f = tl.full([], CAUSAL_MODE, tl.int32)
    return f


@triton.jit(do_not_specialize=["L", "slb", "slh"])  # sizes vary per call; strides keep their alignment
def _attn_fwd_kernel(
    Q, K, V, O,  # q/k/v/o base pointers (layouts in the module docstring)
    LSE,  # fp32 out, element (b, h, row) at b*stride_lb + h*stride_lh + start + row
    CU,  # (S+1,) int32 sequence starts (VARLEN)
    CAUSAL,  # (S,) int8 per-sequence causal flags (CAUSAL_MODE == 2)
    qk_scale,  # softmax scale * log2(e)
    L,  # sequence length (batched layout)
    H,  # heads
    HEAD_DIM,  # true head dim (<= BLOCK_K)
    sqb, sqt, sqh, sqk,
    skb, skt, skh, skk,
    svb, svt, svh, svk,
    sob, sot, soh, sok,
    slb, slh,
    VARLEN: tl.constexpr,
    CAUSAL_MODE: tl.constexpr,  # 0 none, 1 all, 2 per sequence
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    EMULATE: tl.constexpr,  # CPU interpreter: GPU dot numerics in exact fp32 (kernels/_numerics.py)
    PREC: tl.constexpr,  # tl.dot input precision for fp32 tiles
):
    pid_bh = tl.program_id(0)
    pid_m = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    start, seqlen = _seq_bounds(CU, b, L, VARLEN)
    if pid_m * BLOCK_M >= seqlen:
        return
    causal = _causal_flag(CAUSAL, b, CAUSAL_MODE)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n0 = tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    kmask = offs_k < HEAD_DIM
    mmask = offs_m < seqlen
    q_base = Q + b * sqb + start * sqt + h * sqh
    k_base = K + b * skb + start * skt + h * skh
    v_base = V + b * svb + start * svt + h * svh
    q = tl.load(q_base + offs_m[:, None] * sqt + offs_k[None, :] * sqk, mask=mmask[:, None] & kmask[None, :], other=0.0)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_K], dtype=tl.float32)
    hi = seqlen
    if CAUSAL_MODE != 0:  # keys after the block's last query are all masked: skip them
        hi = tl.where(causal != 0, tl.minimum(seqlen, (pid_m + 1) * BLOCK_M), seqlen)
    for start_n in range(0, hi, BLOCK_N):
        offs_n = start_n + offs_n0
        nmask = offs_n < seqlen
        kv_mask = nmask[:, None] & kmask[None, :]
        k = tl.load(k_base + offs_n[:, None] * skt + offs_k[None, :] * skk, mask=kv_mask, other=0.0)
        v = tl.load(v_base + offs_n[:, None] * svt + offs_k[None, :] * svk, mask=kv_mask, other=0.0)
        s = dot(q, tl.trans(k), tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32), PREC, EMULATE) * qk_scale
        valid = nmask[None, :]
        if CAUSAL_MODE != 0:
            valid = valid & ((offs_n[None, :] <= offs_m[:, None]) | (causal == 0))
        s = tl.where(valid, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = dot(p.to(v.dtype), v, acc * alpha[:, None], PREC, EMULATE)
        m_i = m_new
    o = acc / l_i[:, None]
    o_base = O + b * sob + start * sot + h * soh
    tl.store(o_base + offs_m[:, None] * sot + offs_k[None, :] * sok, o.to(O.dtype.element_ty),
             mask=mmask[:, None] & kmask[None, :])
    tl.store(LSE + b * slb + h * slh + start + offs_m, m_i + tl.log2(l_i), mask=mmask)


@triton.jit(do_not_specialize=["L", "slb", "slh"])  # sizes vary per call; strides keep their alignment
def _attn_bwd_delta_kernel(
    O, DO, DELTA,  # DELTA fp32 out, laid out like LSE
    CU, L, H, HEAD_DIM,
    sob, sot, soh, sok,
    sdb, sdt, sdh, sdk,
    slb, slh,
    VARLEN: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid_bh = tl.program_id(0)
    pid_m = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    start, seqlen = _seq_bounds(CU, b, L, VARLEN)
    if pid_m * BLOCK_M >= seqlen:
        return
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = tl.arange(0, BLOCK_K)
    mmask = offs_m < seqlen
    mask = mmask[:, None] & (offs_k < HEAD_DIM)[None, :]
    o = tl.load(O + b * sob + (start + offs_m[:, None]) * sot + h * soh + offs_k[None, :] * sok, mask=mask, other=0.0)
    do = tl.load(DO + b * sdb + (start + offs_m[:, None]) * sdt + h * sdh + offs_k[None, :] * sdk, mask=mask, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), axis=1)
    tl.store(DELTA + b * slb + h * slh + start + offs_m, delta, mask=mmask)


@triton.jit(do_not_specialize=["L", "slb", "slh"])  # sizes vary per call; strides keep their alignment
def _attn_bwd_dkdv_kernel(
    Q, K, V, DO, DK, DV,
    LSE, DELTA,
    CU, CAUSAL,
    qk_scale,  # scale * log2(e)
    sm_scale,  # scale
    L, H, HEAD_DIM,
    sqb, sqt, sqh, sqk,
    skb, skt, skh, skk,
    svb, svt, svh, svk,
    sdb, sdt, sdh, sdk,  # dO
    sgb, sgt, sgh, sgk,  # dK and dV (allocated alike)
    slb, slh,
    VARLEN: tl.constexpr,
    CAUSAL_MODE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    EMULATE: tl.constexpr,  # CPU interpreter: GPU dot numerics in exact fp32 (kernels/_numerics.py)
    PREC: tl.constexpr,
):
    pid_bh = tl.program_id(0)
    pid_n = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    start, seqlen = _seq_bounds(CU, b, L, VARLEN)
    if pid_n * BLOCK_N >= seqlen:
        return
    causal = _causal_flag(CAUSAL, b, CAUSAL_MODE)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m0 = tl.arange(0, BLOCK_M)
    offs_k = tl.arange(0, BLOCK_K)
    kmask = offs_k < HEAD_DIM
    nmask = offs_n < seqlen
    kv_mask = nmask[:, None] & kmask[None, :]
    k = tl.load(K + b * skb + (start + offs_n[:, None]) * skt + h * skh + offs_k[None, :] * skk, mask=kv_mask, other=0.0)
    v = tl.load(V + b * svb + (start + offs_n[:, None]) * svt + h * svh + offs_k[None, :] * svk, mask=kv_mask, other=0.0)
    q_base = Q + b * sqb + start * sqt + h * sqh
    do_base = DO + b * sdb + start * sdt + h * sdh
    l_base = LSE + b * slb + h * slh + start
    d_base = DELTA + b * slb + h * slh + start
    dk = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    lo = 0
    if CAUSAL_MODE != 0:  # queries before this key block see none of its keys
        lo = tl.where(causal != 0, (pid_n * BLOCK_N) // BLOCK_M * BLOCK_M, 0)
    for start_m in range(lo, seqlen, BLOCK_M):
        offs_m = start_m + offs_m0
        mmask = offs_m < seqlen
        q_mask = mmask[:, None] & kmask[None, :]
        q = tl.load(q_base + offs_m[:, None] * sqt + offs_k[None, :] * sqk, mask=q_mask, other=0.0)
        do = tl.load(do_base + offs_m[:, None] * sdt + offs_k[None, :] * sdk, mask=q_mask, other=0.0)
        lse = tl.load(l_base + offs_m, mask=mmask, other=float("inf"))
        delta = tl.load(d_base + offs_m, mask=mmask, other=0.0)
        # transposed scores (BLOCK_N, BLOCK_M): no tl.trans of the large accumulators
        st = dot(k, tl.trans(q), tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32), PREC, EMULATE) * qk_scale
        valid = mmask[None, :] & nmask[:, None]
        if CAUSAL_MODE != 0:
            valid = valid & ((offs_m[None, :] >= offs_n[:, None]) | (causal == 0))
        pt = tl.where(valid, tl.exp2(st - lse[None, :]), 0.0)
        dv = dot(pt.to(do.dtype), do, dv, PREC, EMULATE)
        dpt = dot(v, tl.trans(do), tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32), PREC, EMULATE)
        dst = pt * (dpt - delta[None, :])
        dk = dot(dst.to(q.dtype), q, dk, PREC, EMULATE)
    dk = dk * sm_scale
    g_off = b * sgb + (start + offs_n[:, None]) * sgt + h * sgh + offs_k[None, :] * sgk
    tl.store(DK + g_off, dk.to(DK.dtype.element_ty), mask=kv_mask)
    tl.store(DV + g_off, dv.to(DV.dtype.element_ty), mask=kv_mask)


@triton.jit(do_not_specialize=["L", "slb", "slh"])  # sizes vary per call; strides keep their alignment
def _attn_bwd_dq_kernel(
    Q, K, V, DO, DQ,
    LSE, DELTA,
    CU, CAUSAL,
    qk_scale,
    sm_scale,
    L, H, HEAD_DIM,
    sqb, sqt, sqh, sqk,
    skb, skt, skh, skk,
    svb, svt, svh, svk,
    sdb, sdt, sdh, sdk,  # dO
    sgb, sgt, sgh, sgk,  # dQ
    slb, slh,
    VARLEN: tl.constexpr,
    CAUSAL_MODE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    EMULATE: tl.constexpr,  # CPU interpreter: GPU dot numerics in exact fp32 (kernels/_numerics.py)
    PREC: tl.constexpr,
):
    pid_bh = tl.program_id(0)
    pid_m = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    start, seqlen = _seq_bounds(CU, b, L, VARLEN)
    if pid_m * BLOCK_M >= seqlen:
        return
    causal = _causal_flag(CAUSAL, b, CAUSAL_MODE)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n0 = tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    kmask = offs_k < HEAD_DIM
    mmask = offs_m < seqlen
    q_mask = mmask[:, None] & kmask[None, :]
    q = tl.load(Q + b * sqb + (start + offs_m[:, None]) * sqt + h * sqh + offs_k[None, :] * sqk, mask=q_mask, other=0.0)
    do = tl.load(DO + b * sdb + (start + offs_m[:, None]) * sdt + h * sdh + offs_k[None, :] * sdk, mask=q_mask, other=0.0)
    lse = tl.load(LSE + b * slb + h * slh + start + offs_m, mask=mmask, other=float("inf"))
    delta = tl.load(DELTA + b * slb + h * slh + start + offs_m, mask=mmask, other=0.0)
    k_base = K + b * skb + start * skt + h * skh
    v_base = V + b * svb + start * svt + h * svh
    dq = tl.zeros([BLOCK_M, BLOCK_K], dtype=tl.float32)
    hi = seqlen
    if CAUSAL_MODE != 0:  # keys after the block's last query are all masked: skip them
        hi = tl.where(causal != 0, tl.minimum(seqlen, (pid_m + 1) * BLOCK_M), seqlen)
    for start_n in range(0, hi, BLOCK_N):
        offs_n = start_n + offs_n0
        nmask = offs_n < seqlen
        kv_mask = nmask[:, None] & kmask[None, :]
        k = tl.load(k_base + offs_n[:, None] * skt + offs_k[None, :] * skk, mask=kv_mask, other=0.0)
        v = tl.load(v_base + offs_n[:, None] * svt + offs_k[None, :] * svk, mask=kv_mask, other=0.0)
        s = dot(q, tl.trans(k), tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32), PREC, EMULATE) * qk_scale
        valid = mmask[:, None] & nmask[None, :]
        if CAUSAL_MODE != 0:
            valid = valid & ((offs_n[None, :] <= offs_m[:, None]) | (causal == 0))
        p = tl.where(valid, tl.exp2(s - lse[:, None]), 0.0)
        dp = dot(do, tl.trans(v), tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32), PREC, EMULATE)
        ds = p * (dp - delta[:, None])
        dq = dot(ds.to(k.dtype), k, dq, PREC, EMULATE)
    dq = dq * sm_scale
    tl.store(DQ + b * sgb + (start + offs_m[:, None]) * sgt + h * sgh + offs_k[None, :] * sgk,
             dq.to(DQ.dtype.element_ty), mask=q_mask)


# ----------------------------------------------------------------------------- launchers


def _strides(t: torch.Tensor, varlen: bool) -> tuple[int, int, int, int]:
    """(batch, token, head, dim) element strides; batch stride 0 in the varlen layout."""
    if varlen:
        return 0, t.stride(0), t.stride(1), t.stride(2)
    return t.stride(0), t.stride(2), t.stride(1), t.stride(3)


class AttnConfig(NamedTuple):
    """One launch configuration. ``emulate`` and ``prec`` affect numerics and depend on the dtype
    only (DESIGN §8); the tiles, warps and stages depend on the device and the shapes."""

    block_m: int  # query rows per tile
    block_n: int  # key rows per tile
    block_k: int  # padded head dim
    num_warps: int
    num_stages: int
    emulate: bool  # CPU interpreter: GPU dot numerics in exact fp32 (kernels/_numerics.py)
    prec: str  # tl.dot input precision for fp32 tiles


def numerics(dtype: torch.dtype) -> str:
    """``tl.dot`` input precision, the same on every device: IEEE for fp32 (TF32 would exceed the
    fp32 1e-4 tolerance of DESIGN §7); 16-bit tiles go to the tensor cores as they are."""
    return "ieee"


def padding_waste(length: int, block: int) -> float:
    """Fraction of a sequence's tile rows that are padding: ``1 - L / (ceil(L / block) * block)``."""
    if length <= 0:
        return 0.0
    return 1.0 - length / (triton.cdiv(length, block) * block)


def seq_block(length: int, choices: tuple[int, ...], slack: float = 0.15) -> int:
    """The largest tile in ``choices`` whose padded row count ``ceil(L / b) * b`` is within
    ``slack`` of the smallest, for sequences of ``length`` tokens (CLIP: 50 image tokens at
    B/32, 77 text tokens, 197 at B/16): larger tiles amortize loads and reach wgmma, but a 64-
    or 128-row tile over 77 tokens computes 40% padding where 32-row tiles compute 20%. Gives
    64 for 50 tokens, 32 for 77 and 128 for 197 from (32, 64, 128)."""
    if length <= 0:
        return max(choices)
    padded = {c: triton.cdiv(length, c) * c for c in choices}
    least = min(padded.values())
    return max(c for c in choices if padded[c] <= (1.0 + slack) * least)


def _config(head_dim: int, dtype: torch.dtype, device: torch.device, bwd: bool,
            max_seqlen: int | None = None) -> AttnConfig:
    """Launch configuration for ``head_dim`` and sequences of at most ``max_seqlen`` tokens
    (None: long sequences, the largest tiles)."""
    block_k = max(16, triton.next_power_of_2(head_dim))
    prec = numerics(dtype)
    if device.type != "cuda":
        # interpreter: few, large tiles (its cost is per op, not per flop)
        return AttnConfig(64, 64, block_k, 4, 1, True, prec)
    length = 1 << 20 if max_seqlen is None else int(max_seqlen)
    # Every choice below was compiled for sm_90 with ptxas (python -m bench.kernel_report): no
    # register spills, and 16-bit tiles of 64 rows use wgmma, 32-row tiles mma.sync.
    if dtype == torch.float32:
        # fp32 tiles hold twice the registers of 16-bit ones: 32x32 tiles on 8 warps keep them out
        # of spills with Triton 3.8 and 3.6 (4 warps spilled under 3.6)
        if block_k <= 64:
            return AttnConfig(32, 32, block_k, 8, 1 if bwd else 2, False, prec)
        return AttnConfig(32 if bwd else 16, 16 if bwd else 32, block_k, 4, 1, False, prec)
    if bwd:
        if block_k > 64:
            return AttnConfig(32, 32, block_k, 8, 2, False, prec)
        b = seq_block(length, (32, 64))
        return AttnConfig(b, b, block_k, 8 if b == 64 else 4, 2, False, prec)
    if block_k > 64:
        return AttnConfig(seq_block(length, (32, 64)), 32, block_k, 8, 3, False, prec)
    return AttnConfig(seq_block(length, (32, 64, 128)), seq_block(length, (32, 64)), block_k, 4, 3, False, prec)


def _layout(q, cu_seqlens, max_seqlen):
    """(S, L, H, D, max_len, varlen)."""
    if cu_seqlens is None:
        B, H, L, D = q.shape
        return B, L, H, D, L, False
    T, H, D = q.shape
    S = cu_seqlens.numel() - 1
    if max_seqlen is None:
        max_seqlen = int((cu_seqlens[1:] - cu_seqlens[:-1]).max()) if S > 0 else 0
    return S, 0, H, D, int(max_seqlen), True


def _causal_args(causal, device):
    """(CAUSAL_MODE, flag tensor or None)."""
    if isinstance(causal, torch.Tensor):
        return 2, causal.to(device=device, dtype=torch.int8).contiguous()
    return (1 if causal else 0), None


def _lse_buffer(q, S, H, L, varlen):
    """fp32 buffer laid out (B, H, L) or (H, T) and its (batch, head) strides."""
    if varlen:
        T = q.shape[0]
        buf = torch.empty(H, T, dtype=torch.float32, device=q.device)
        return buf, 0, T
    buf = torch.empty(S, H, L, dtype=torch.float32, device=q.device)
    return buf, H * L, L


def attention_fwd(q, k, v, cu_seqlens=None, causal=False, scale=None, max_seqlen=None):
    """Forward launch.

    Args:
        q, k, v: ``(B, H, L, K)`` or, with ``cu_seqlens``, ``(T, H, K)``; fp32/fp16/bf16, one
            dtype, any strides; head dim ``K <= 128``.
        cu_seqlens: ``(S+1,)`` int32 on q's device with ``cu[0] == 0`` and ``cu[-1] == T``
            (rows past ``cu[-1]`` are left unwritten), or None.
        causal: bool, or ``(S,)`` bool/int tensor (varlen).
        scale: softmax scale (default ``1/sqrt(K)``).
        max_seqlen: longest sequence (varlen); computed with one host sync when None.
    Returns:
        ``(o, lse)``: ``o`` contiguous, shaped and typed like ``q``; ``lse`` fp32 ``(B, H, L)``
        or ``(H, T)``, base-2 log-sum-exp of ``q·k·scale·log2(e)`` per row (for backward).
    """
    S, L, H, D, max_len, varlen = _layout(q, cu_seqlens, max_seqlen)
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    o = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse, slb, slh = _lse_buffer(q, S, H, L, varlen)
    if q.numel() == 0 or max_len == 0:
        return o, lse
    mode, flags = _causal_args(causal, q.device)
    cfg = _config(D, q.dtype, q.device, bwd=False, max_seqlen=max_len)
    cu = cu_seqlens if varlen else q  # CU unused when not VARLEN
    grid = (S * H, triton.cdiv(max_len, cfg.block_m))
    _attn_fwd_kernel[grid](
        q, k, v, o, lse, cu, flags if flags is not None else q,
        scale * LOG2E, L, H, D,
        *_strides(q, varlen), *_strides(k, varlen), *_strides(v, varlen), *_strides(o, varlen),
        slb, slh,
        VARLEN=varlen, CAUSAL_MODE=mode, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
        EMULATE=cfg.emulate, PREC=cfg.prec, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return o, lse


def attention_bwd(do, q, k, v, o, lse, cu_seqlens=None, causal=False, scale=None, max_seqlen=None):
    """Backward launches (deterministic). Arguments as :func:`attention_fwd` plus ``do``
    (gradient of ``o``, any strides), ``o`` and ``lse`` from the forward.

    Returns:
        ``(dq, dk, dv)`` contiguous, shaped and typed like ``q``.
    """
    S, L, H, D, max_len, varlen = _layout(q, cu_seqlens, max_seqlen)
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    dq = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    dk = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    dv = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    if q.numel() == 0 or max_len == 0:
        return dq.zero_(), dk.zero_(), dv.zero_()
    mode, flags = _causal_args(causal, q.device)
    flags = flags if flags is not None else q
    cfg = _config(D, q.dtype, q.device, bwd=True, max_seqlen=max_len)
    bm, bn, bk = cfg.block_m, cfg.block_n, cfg.block_k
    cu = cu_seqlens if varlen else q
    delta = torch.empty_like(lse)
    slb, slh = (0, lse.shape[1]) if varlen else (H * L, L)
    _attn_bwd_delta_kernel[(S * H, triton.cdiv(max_len, bm))](
        o, do, delta, cu, L, H, D, *_strides(o, varlen), *_strides(do, varlen), slb, slh,
        VARLEN=varlen, BLOCK_M=bm, BLOCK_K=bk, num_warps=4,
    )
    common = (
        *_strides(q, varlen), *_strides(k, varlen), *_strides(v, varlen), *_strides(do, varlen),
    )
    _attn_bwd_dkdv_kernel[(S * H, triton.cdiv(max_len, bn))](
        q, k, v, do, dk, dv, lse, delta, cu, flags, scale * LOG2E, scale, L, H, D,
        *common, *_strides(dk, varlen), slb, slh,
        VARLEN=varlen, CAUSAL_MODE=mode, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, EMULATE=cfg.emulate, PREC=cfg.prec,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    _attn_bwd_dq_kernel[(S * H, triton.cdiv(max_len, bm))](
        q, k, v, do, dq, lse, delta, cu, flags, scale * LOG2E, scale, L, H, D,
        *common, *_strides(dq, varlen), slb, slh,
        VARLEN=varlen, CAUSAL_MODE=mode, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, EMULATE=cfg.emulate, PREC=cfg.prec,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return dq, dk, dv


def _interpreted() -> bool:
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(_attn_fwd_kernel, InterpretedFunction)


# whether these kernels were built for the CPU interpreter (decided once, at import)
INTERPRETED = _interpreted()
