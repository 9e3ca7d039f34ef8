"""Helpers shared by tests/ops/test_triton_*.py (device parametrization, error measures).

DESIGN §7 tolerances: relative error ``‖out − ref‖ / ‖ref‖`` against a float64 reference.
"""
import importlib.util
import os

import pytest
import torch

HAS_TRITON = importlib.util.find_spec("triton") is not None
HAS_NUMPY = importlib.util.find_spec("numpy") is not None  # the interpreter needs it; the GPU does not
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
# bench/gpu_check.sh sets these: REQUIRE_GPU on the GPU machine, so a gpu test whose needs are
# missing fails instead of being skipped; DRY_RUN on the CPU, so the gpu tests run on CPU
# tensors through the interpreter (the same test code and shapes, checked before a GPU is lent)
REQUIRE_GPU = os.environ.get("MSCLIP_FAST_REQUIRE_GPU", "0") == "1"
DRY_RUN = os.environ.get("MSCLIP_FAST_GPU_DRY_RUN", "0") == "1"
GPU_DEVICE = "cpu" if DRY_RUN else "cuda"


def _gpu_marks():
    marks = [pytest.mark.gpu]
    if DRY_RUN:
        ok, why = HAS_TRITON and HAS_NUMPY and INTERPRET, "dry run needs triton + numpy with TRITON_INTERPRET=1"
    else:
        ok, why = HAS_TRITON and torch.cuda.is_available(), "needs triton and CUDA"
    if not REQUIRE_GPU:
        marks.append(pytest.mark.skipif(not ok, reason=why))
    return marks


# "cpu": the interpreter (skipped when it is off, e.g. on a CUDA machine); "cuda": gpu marker
DEVICES = [
    pytest.param(
        "cpu",
        marks=pytest.mark.skipif(not (HAS_TRITON and HAS_NUMPY and INTERPRET),
                                 reason="needs triton + numpy with TRITON_INTERPRET=1"),
    ),
    pytest.param(GPU_DEVICE, marks=_gpu_marks(), id="cuda"),
]


TOL_ELEMENTWISE = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
TOL_MATMUL = {torch.float32: 1e-4, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    """‖a − ref‖ / ‖ref‖ in float64 (0 when both are 0)."""
    a, ref = a.detach().double().cpu(), ref.detach().double().cpu()
    den = ref.norm().item()
    num = (a - ref).norm().item()
    return num / den if den > 0 else num


def f64(*ts):
    """float64 leaf copies (requires_grad) of ``ts`` for the reference."""
    return [t.detach().double().requires_grad_(t.requires_grad) if t is not None else None for t in ts]


def randn(*shape, dtype=torch.float32, device="cpu", gen=None, scale=1.0, grad=True):
    t = (torch.randn(*shape, generator=gen, dtype=torch.float64) * scale).to(device=device, dtype=dtype)
    return t.requires_grad_(grad)
