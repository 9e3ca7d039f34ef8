"""Shared plumbing of the ``"triton"`` backends: availability, device/dtype limits, lazy kernel import.

Nothing here imports Triton at module import time, so ``msclip_fast.ops`` loads on machines
without it (DESIGN §9, apex-style lazy import). Triton kernels run on CUDA tensors, or on CPU
tensors when ``TRITON_INTERPRET=1`` was set before the kernels were first imported (tests).
"""
from __future__ import annotations

import functools
import importlib
import os

import torch

TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@functools.lru_cache(maxsize=None)
def _import_reasons() -> tuple[str, ...]:
    try:
        importlib.import_module("triton")
    except Exception as e:  # ImportError, or a broken install raising anything
        return (f"triton not importable ({type(e).__name__}: {e})",)
    return ()


def triton_available() -> list[str]:
    """Reasons Triton cannot run at all here (empty list: it can)."""
    reasons = list(_import_reasons())
    if not reasons and not interpreting() and not torch.cuda.is_available():
        reasons.append("no CUDA device (CPU tensors run only under TRITON_INTERPRET=1)")
    return reasons


def interpreting() -> bool:
    """Whether Triton runs kernels through its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() not in ("", "0", "false", "no")


def kernels(name: str):
    """Import ``msclip_fast.kernels.<name>`` on first use (needs Triton).

    setup.py maps the top-level ``kernels/`` folder to ``msclip_fast.kernels``; a checkout
    used through ``PYTHONPATH`` without installing has it as top-level ``kernels`` instead.
    """
    try:
        return importlib.import_module(f"msclip_fast.kernels.{name}")
    except ModuleNotFoundError as e:
        if e.name not in ("msclip_fast.kernels", f"msclip_fast.kernels.{name}"):
            raise
        return importlib.import_module(f"kernels.{name}")


def _loaded_interpreted() -> bool | None:
    """None when no kernel module is imported yet; else whether kernels were built for the
    interpreter (``triton.jit`` decides once, at decoration time)."""
    import sys

    for mod_name in ("layer_norm", "bias_act", "attention", "contrastive", "sigmoid_loss"):
        mod = sys.modules.get(f"msclip_fast.kernels.{mod_name}") or sys.modules.get(f"kernels.{mod_name}")
        if mod is not None:
            return bool(getattr(mod, "INTERPRETED", False))
    return None


def tensor_reasons(*tensors, dtypes=TRITON_DTYPES) -> list[str]:
    """Reasons the Triton kernels cannot take these tensors (device, dtype): the part of every
    ``<op>_triton.triton_supports`` shared by all ops."""
    reasons = []
    ts = [t for t in tensors if isinstance(t, torch.Tensor)]
    if any(not t.is_cuda for t in ts):
        if not interpreting():
            reasons.append("tensors not on CUDA (CPU tensors need TRITON_INTERPRET=1)")
        elif _loaded_interpreted() is False:
            reasons.append("kernels were imported before TRITON_INTERPRET=1 was set")
    if ts and len({t.device for t in ts}) > 1:
        reasons.append(f"tensors on several devices {sorted({str(t.device) for t in ts})}")
    for t in ts:
        if t.is_floating_point() and t.dtype not in dtypes:
            reasons.append(f"dtype {t.dtype} not supported (triton: float32, float16, bfloat16)")
            break
    return reasons


def interpreter_auto_skip(*tensors) -> list[str]:
    """Shared ``triton_auto_skip``: why ``"auto"`` passes over Triton although it could run: CPU tensors (interpreter)."""
    if any(isinstance(t, torch.Tensor) and not t.is_cuda for t in tensors):
        return ["CPU tensors (the Triton interpreter is for tests: select backend='triton' by name)"]
    return []
