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
from .registry import Backend, Op, host_readable


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
    if host_readable(cu_seqlens):  # elsewhere the check would cost a host sync per call
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


def _dense(q, k, v, causal: bool, scale: float, key_padding=None):
    """(..., L, K) attention with fp32 (or fp64) softmax.

    ``key_padding``: optional bool mask broadcastable to the ``(..., L, L)`` scores, True at
    padded keys (set to -inf); the caller keeps at least one key of every row unmasked."""
    acc = torch.promote_types(q.dtype, torch.float32)
    s = torch.matmul(q, k.transpose(-1, -2)).to(acc) * scale
    if causal:
        L = q.shape[-2]
        mask = torch.ones(L, L, dtype=torch.bool, device=q.device).triu_(1)
        s = s.masked_fill(mask, float("-inf"))
    if key_padding is not None:
        s = s.masked_fill(key_padding, float("-inf"))
    p = torch.softmax(s, dim=-1).to(q.dtype)
    return torch.matmul(p, v)


def attention_ref(q, k, v, cu_seqlens=None, causal=False, scale=None, max_seqlen=None):
    """Plain PyTorch attention, the oracle for every other backend (same arguments as
    :func:`attention`; ``max_seqlen`` is validated, not needed). Materializes the ``L x L``
    scores of every sequence (varlen: padded to the longest of its bucket, see
    :func:`_attention_ref`)."""
    validate_attention(q, k, v, cu_seqlens, causal, scale, max_seqlen)
    return _attention_ref(q, k, v, cu_seqlens, causal, scale, max_seqlen)


def _attention_ref(q, k, v, cu_seqlens=None, causal=False, scale=None, max_seqlen=None):
    """The "reference" backend (inputs validated by the op).

    Varlen inputs run as one batched :func:`_dense` call per run of consecutive sequences with
    one causal flag (:func:`varlen_runs`): a run of equal lengths is a zero-copy reshape;
    ragged runs gather their rows, padded, into ``(n, H, Lmax, K)`` (:func:`_ragged_run`), so
    the cost does not grow with a Python loop over sequences."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    if cu_seqlens is None:
        return _dense(q, k, v, bool(causal), scale)
    bounds = cu_seqlens.tolist()
    # reshape: a 0-d flag tensor (one sequence) must still give a list
    flags = causal.reshape(-1).tolist() if isinstance(causal, torch.Tensor) else [bool(causal)] * (len(bounds) - 1)
    H, K = q.shape[1], q.shape[2]
    outs = []
    for a, lens, c in varlen_runs(bounds, flags):
        n, L = len(lens), lens[0]
        if all(x == L for x in lens):
            # n sequences of one length: (n·L, H, K) -> (n, H, L, K) is a view, no copy
            qi, ki, vi = (t[a:a + n * L].reshape(n, L, H, K).transpose(1, 2) for t in (q, k, v))
            outs.append(_dense(qi, ki, vi, c, scale).transpose(1, 2).reshape(n * L, H, K))
        else:
            outs.append(_ragged_run(q, k, v, a, lens, c, scale))
    if not outs:  # every sequence is empty (T == 0): an empty result that is still in the graph
        return _dense(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), False, scale).transpose(0, 1)
    return torch.cat(outs, 0) if len(outs) > 1 else outs[0]


def _ragged_run(q, k, v, start: int, lens: list[int], causal: bool, scale: float):
    """Attention of consecutive sequences of different lengths with one causal flag, rows
    ``start .. start + sum(lens)`` of the ``(T, H, K)`` inputs; returns their ``(sum(lens), H,
    K)`` output in row order.

    One gather of rows per input (index tensors built on the host from ``lens``) lays out every
    bucket of sequences (:func:`_length_buckets`) as ``(n, H, Lmax, K)`` with right padding;
    one :func:`_dense` call per bucket; one gather back. Padded slots repeat the last real row
    of their sequence, so every score is finite and no zero row has to be appended to the
    inputs; they are never read back: causal right padding already hides the padded keys from
    every real query, non-causal runs mask them (-inf; key 0 of every row stays), and padded
    query rows get a zero gradient from the gather back. Their gradient contributions are
    exact zeros, which leaves float64 results exact."""
    H, K = q.shape[1], q.shape[2]
    dev = q.device
    lens_t = torch.tensor(lens)
    starts_t = torch.cumsum(lens_t, 0) - lens_t  # relative to ``start``
    slot = torch.empty(int(lens_t.sum()), dtype=torch.long)  # row -> its position in the padded outputs
    plan, rows, offset = [], [], 0
    for seqs in _length_buckets(lens, H * K):
        sel = torch.tensor(seqs)
        lb = lens_t[sel]
        n, L = len(seqs), int(lb.max())
        j = torch.arange(L)
        src = starts_t[sel, None] + torch.minimum(j, lb[:, None] - 1)  # (n, L) rows; padding repeats the last
        valid = j < lb[:, None]
        slot[src[valid]] = offset + torch.arange(n * L).view(n, L)[valid]
        offset += n * L
        rows.append(src.view(-1))
        plan.append((n, L, None if causal else (~valid).view(n, 1, 1, L).to(dev)))
    index = (torch.cat(rows) + start).to(dev)
    sizes = [n * L for n, L, _ in plan]
    # one gather (and one scatter-add in backward) per input for the whole run
    qs, ks, vs = (t.index_select(0, index).split(sizes) for t in (q, k, v))
    pieces = []
    for (n, L, pad), qi, ki, vi in zip(plan, qs, ks, vs):
        qi, ki, vi = (t.view(n, L, H, K).transpose(1, 2) for t in (qi, ki, vi))
        pieces.append(_dense(qi, ki, vi, causal, scale, pad).transpose(1, 2).reshape(n * L, H, K))
    out = torch.cat(pieces, 0) if len(pieces) > 1 else pieces[0]
    return out.index_select(0, slot.to(dev))


# Fixed cost of one more _dense call (forward + backward, with its gathers) in units of the
# per-call work ``n · L² · H · K``: on CPU about 0.5 ms against 0.8 ns (bench/bench_ref_segments.py).
_CALL_COST = 1 << 19


def _length_buckets(lens: list[int], width: int) -> list[list[int]]:
    """Split a ragged run's sequences (positions in ``lens``) into buckets, each padded to its
    own longest length: lengths within 2x of the bucket's longest share it (so padding costs
    at most 4x the ``L²`` work of a sequence, and a run makes at most ``log2(max/min) + 1``
    calls whatever its number of sequences), then a bucket is merged into the next longer one
    when padding it to that length costs less than a call (:data:`_CALL_COST`; ``width`` is
    ``H·K``). Padding everything to the run's longest length instead was measured as slow as
    the per-sequence loop for captions of 5..40 tokens (mean ~17).

    Returns:
        buckets of positions, each in run order, covering ``range(len(lens))``.
    """
    buckets: list[list] = []  # [longest, positions]
    for i in sorted(range(len(lens)), key=lambda i: -lens[i]):
        if buckets and 2 * lens[i] > buckets[-1][0]:
            buckets[-1][1].append(i)
        else:
            buckets.append([lens[i], [i]])
    merged = [buckets[0]]
    for top, seqs in buckets[1:]:
        longer = merged[-1][0]
        if len(seqs) * (longer * longer - top * top) * width < _CALL_COST:
            merged[-1][1].extend(seqs)
        else:
            merged.append([top, seqs])
    return [sorted(seqs) for _, seqs in merged]


def varlen_runs(bounds: list[int], flags: list[bool]) -> list[tuple[int, list[int], bool]]:
    """Split varlen sequences into runs of consecutive sequences with one causal flag (a packed
    image+text batch is two runs), the unit of one batched reference call. Empty sequences
    hold no rows: they are left out and do not split a run.

    Args:
        bounds: host list of ``S+1`` cumulative sequence starts (``cu_seqlens.tolist()``).
        flags: host list of ``S`` causal flags.
    Returns:
        ``[(start_row, lengths, causal), ...]`` with ``lengths`` a list of ints >= 1, covering
        every non-empty sequence in order.
    """
    runs: list[tuple[int, list[int], bool]] = []
    for i in range(len(bounds) - 1):
        a, L, c = bounds[i], bounds[i + 1] - bounds[i], bool(flags[i])
        if L == 0:
            continue
        if runs and runs[-1][2] == c:
            runs[-1][1].append(L)
        else:
            runs.append((a, [L], c))
    return runs


def varlen_groups(bounds: list[int], flags: list[bool]) -> list[tuple[int, int, int, bool]]:
    """Split varlen sequences into runs of consecutive sequences of equal length and equal
    causal flag: each run is one batched ``(n, H, L, K)`` view of the packed rows. (The
    reference now batches by :func:`varlen_runs`, which also batches ragged lengths; with
    ragged text these groups are one per sequence.)

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
    if torch.compiler.is_compiling():  # one opaque custom-op node (see .custom_ops)
        from . import custom_ops

        return custom_ops.attention(q, k, v, cu_seqlens, causal, scale, max_seqlen, backend)
    return _OP(q, k, v, cu_seqlens=cu_seqlens, causal=causal, scale=scale, max_seqlen=max_seqlen, backend=backend)


attention.op = _OP
