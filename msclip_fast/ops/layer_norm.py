"""Modality-indexed LayerNorm: one call normalizes rows of several modalities, each row with
the gain and bias of its own modality (MS-CLIP keeps every LayerNorm modality-specific while
sharing the rest of the block)."""
from __future__ import annotations

import torch

from . import layer_norm_triton as _lnt
from .registry import Backend, Op, host_readable


def validate_modality_layer_norm(x, weight, bias, modality_ids, eps: float = 1e-12, residual=None) -> None:
    """The op's input validation (run once, before backend selection; the reference calls it
    too). Raises ValueError naming the field. Reads no device value back: the range of tensor
    ids is checked on CPU tensors only (:func:`check_ids_host`)."""
    if not eps > 0:
        raise ValueError(f"eps must be > 0, got {eps}")
    if not x.is_floating_point():
        raise ValueError(f"x must be a floating tensor, got dtype {x.dtype}")
    if weight.dim() != 2 or bias.shape != weight.shape:
        raise ValueError(
            f"weight and bias must be (M, D) of one shape, got {tuple(weight.shape)} and {tuple(bias.shape)}"
        )
    if x.shape[-1] != weight.shape[1]:
        raise ValueError(f"x last dim ({x.shape[-1]}) must equal the LayerNorm width D ({weight.shape[1]})")
    if residual is not None:
        if residual.shape != x.shape:
            raise ValueError(f"residual shape {tuple(residual.shape)} must equal x shape {tuple(x.shape)}")
        if not residual.is_floating_point():
            raise ValueError(f"residual must be a floating tensor, got dtype {residual.dtype}")
    M = weight.shape[0]
    if isinstance(modality_ids, int):
        if not 0 <= modality_ids < M:
            raise ValueError(f"modality_ids={modality_ids} out of range for M={M} modalities")
        return
    if modality_ids.shape != x.shape[:-1]:
        raise ValueError(
            f"modality_ids must have shape {tuple(x.shape[:-1])} (one id per row), got {tuple(modality_ids.shape)}"
        )
    if modality_ids.is_floating_point() or modality_ids.is_complex() or modality_ids.dtype == torch.bool:
        raise ValueError(f"modality_ids must be an integer tensor, got dtype {modality_ids.dtype}")
    if host_readable(modality_ids) and modality_ids.numel():  # elsewhere: a host sync
        check_ids_host(modality_ids, M)


def check_ids_host(modality_ids, M: int) -> None:
    """Range check of CPU ``modality_ids`` (part of :func:`validate_modality_layer_norm`, the
    only place of the op that reads tensor values on the host; CUDA kernels trust the ids)."""
    lo, hi = int(modality_ids.min()), int(modality_ids.max())
    if lo < 0 or hi >= M:
        raise ValueError(f"modality_ids hold values in [{lo}, {hi}], out of range for M={M} modalities")


def modality_layer_norm_ref(x, weight, bias, modality_ids, eps: float = 1e-12, residual=None):
    """Plain PyTorch reference for :func:`modality_layer_norm` (same arguments)."""
    validate_modality_layer_norm(x, weight, bias, modality_ids, eps, residual)
    return _modality_layer_norm_ref(x, weight, bias, modality_ids, eps, residual)


def _modality_layer_norm_ref(x, weight, bias, modality_ids, eps: float = 1e-12, residual=None):
    """The "reference" backend (inputs validated by the op). With a residual of another dtype
    the sum, and so the output, is in the promoted dtype (``x + residual``).

    Row statistics are computed once for all rows. The gain and bias are applied per
    contiguous run of one modality (:func:`_id_runs`: CPU ids of a packed batch are two runs)
    by broadcasting the modality's ``(D,)`` row; other ids (many runs, or ids on a device,
    where finding runs would cost a host sync) gather ``weight[ids]``, a ``(rows, D)`` copy
    whose backward is a scatter-add. Both give the same values."""
    if residual is not None:
        x = x + residual
    acc = torch.promote_types(x.dtype, torch.float32)
    xf = x.to(acc)
    xc = xf - xf.mean(-1, keepdim=True)
    y = xc * torch.rsqrt(xc.pow(2).mean(-1, keepdim=True) + eps)
    runs = [(modality_ids, 0, None)] if isinstance(modality_ids, int) else _id_runs(modality_ids, *weight.shape)
    if runs is None:
        ids = modality_ids.long()
        out = y * weight[ids].to(acc) + bias[ids].to(acc)
    elif len(runs) == 1:
        m = runs[0][0]
        out = y * weight[m].to(acc) + bias[m].to(acc)
    else:
        # split, not slices: one backward node (a cat of the pieces' gradients) instead of one
        # zero-filled (rows, D) gradient per slice
        parts = y.reshape(-1, y.shape[-1]).split([n for _, _, n in runs])
        out = torch.cat([p * weight[m].to(acc) + bias[m].to(acc) for p, (m, _, _) in zip(parts, runs)]).view(y.shape)
    out = out.to(x.dtype)
    return (out, x) if residual is not None else out


def _id_runs(modality_ids: torch.Tensor, M: int, D: int) -> list[tuple[int, int, int]] | None:
    """Contiguous runs of equal ids as ``[(modality, first_row, n_rows), ...]`` over the
    flattened ids, or None when the reference should gather instead: ids not on the CPU (reading
    them would be a host sync) or more than :func:`_max_runs` runs. O(rows), against the
    O(rows·D) gather it replaces."""
    if modality_ids.device.type != "cpu":
        return None
    flat = modality_ids.reshape(-1)
    if flat.numel() == 0:
        return None
    vals, counts = torch.unique_consecutive(flat, return_counts=True)
    if vals.numel() > _max_runs(M, flat.numel(), D):
        return None
    runs, a = [], 0
    for m, n in zip(vals.tolist(), counts.tolist()):
        runs.append((m, a, n))
        a += n
    return runs


def _max_runs(M: int, rows: int, D: int) -> int:
    """Most runs for which per-run broadcasting beats the gather. A run costs a few small ops
    forward and backward (~0.13 ms on CPU), the gather and its scatter-add O(rows·D): they
    broke even at about one run per 3,000-6,600 elements (D = 8, 64, 768;
    bench/bench_ref_segments.py's setup); one run per 8,192 elements stays below that, and two
    runs per modality are always allowed."""
    return max(2 * M, rows * D // 8192)


_OP = Op("modality_layer_norm", validate=validate_modality_layer_norm)
_OP.register(Backend("reference", _modality_layer_norm_ref))
# "triton" first: auto takes it for CUDA tensors, the reference for CPU tensors
_OP.register(
    Backend("triton", _lnt.modality_layer_norm_triton, supports=_lnt.triton_supports,
            available=_lnt.triton_available, auto_skip=_lnt.triton_auto_skip),
    before="reference",
)


def modality_layer_norm(x, weight, bias, modality_ids, eps: float = 1e-12, residual=None, backend: str = "auto"):
    """LayerNorm (Ba et al. 2016) whose gain/bias are picked per row by modality.

    Statistics are computed in float32 (float64 for float64 inputs), TF-style eps inside the
    square root, as the official MS-CLIP code does.

    Args:
        x: ``(..., D)`` activations (rows = all leading dims), any float dtype.
        weight, bias: ``(M, D)`` gains and biases, one row per modality.
        modality_ids: ``(...)`` integer tensor (int8/int32/int64) with one id in ``[0, M)`` per
            row, or a Python int applying one modality to all rows.
        eps: variance epsilon (1e-12 in MS-CLIP).
        residual: optional float tensor shaped like ``x`` added to ``x`` before normalizing;
            its dtype may differ from x's (under autocast: an fp32 residual stream and a
            bf16/fp16 update): the sum and the output are then in the promoted dtype, and the
            gradients in x's and residual's own dtypes.
        backend: "auto", "reference" or "triton" (CUDA tensors, fp32/fp16/bf16; CPU
            tensors under ``TRITON_INTERPRET=1``; out-of-range ids are not checked on CUDA).
    Returns:
        ``out`` shaped like ``x`` in x's dtype; with ``residual``, the pair
        ``(out, x + residual)``, both in ``torch.promote_types(x.dtype, residual.dtype)``.
    Raises:
        ValueError: shape mismatch, a non-float ``x``/``residual``, an out-of-range modality
            (tensor ids: checked on CPU tensors), or an unusable backend.
    """
    if torch.compiler.is_compiling():  # one opaque custom-op node (see .custom_ops)
        from . import custom_ops

        return custom_ops.modality_layer_norm(x, weight, bias, modality_ids, eps, residual, backend)
    return _OP(x, weight, bias, modality_ids, eps=eps, residual=residual, backend=backend)


modality_layer_norm.op = _OP
