"""Every fused contrastive backend returns d_scale in the scale's own device, dtype and shape
(issue 7: ``FusedContrastiveLoss.backward`` never moved d_scale to the scale's device).

CPU: a scale of another dtype (float64, bfloat16) and shape ((1,) or 0-d) than the float32
features, through the extension's CPU backend and the Triton backend (interpreter). CUDA
(``-m gpu``): features on the GPU with the scale on the CPU (the Triton backend here; the CUDA
extension's case is in test_cuda_contrastive.py).
"""
import importlib.util
import os

import pytest
import torch

from _triton_optest import DEVICES
from msclip_fast import ops
from msclip_fast.ops import contrastive_fused

GPU = DEVICES[1]

HAS_TRITON = importlib.util.find_spec("triton") is not None
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
needs_interpreter = pytest.mark.skipif(
    not (HAS_TRITON and INTERPRET and importlib.util.find_spec("numpy") is not None),
    reason="needs triton + numpy with TRITON_INTERPRET=1",
)
needs_ext = pytest.mark.skipif(bool(contrastive_fused.cpu_available()),
                               reason="; ".join(contrastive_fused.cpu_available()) or "extension built")
SCALES = [(torch.float64, ()), (torch.bfloat16, (1,)), (torch.float32, (1, 1))]


def rel_err(a, ref):
    a, ref = a.detach().double().cpu(), ref.detach().double().cpu()
    return ((a - ref).norm() / ref.norm()).item()


def _features(n=33, d=24, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    f = [torch.nn.functional.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=-1) for _ in range(2)]
    return [t.float().to(device) for t in f]


def _check(backend, img, txt, scale):
    leaves = [t.detach().clone().requires_grad_() for t in (img, txt, scale)]
    loss = ops.contrastive_loss(*leaves, backend=backend)
    grads = torch.autograd.grad(loss * 3.0, leaves)
    d_scale = grads[2]
    assert d_scale.device == scale.device and d_scale.dtype == scale.dtype and d_scale.shape == scale.shape
    ref_leaves = [t.detach().double().cpu().requires_grad_() for t in (img, txt, scale)]
    ref = ops.contrastive_loss_ref(*ref_leaves)
    ref_grads = torch.autograd.grad(ref * 3.0, ref_leaves)
    tol = 1.6e-2 if scale.dtype == torch.bfloat16 else 1e-4  # d_scale is rounded to the scale's dtype
    assert rel_err(loss, ref) <= 1e-4
    for name, a, b in zip(("d_img", "d_txt", "d_scale"), grads, ref_grads):
        assert rel_err(a, b) <= (tol if name == "d_scale" else 1e-4), name


@needs_ext
@pytest.mark.parametrize("scale_dtype,shape", SCALES, ids=str)
def test_cpu_extension_d_scale_follows_the_scale(scale_dtype, shape):
    img, txt = _features()
    _check("cpu", img, txt, torch.full(shape, 20.0, dtype=scale_dtype))


@needs_interpreter
@pytest.mark.parametrize("scale_dtype,shape", SCALES, ids=str)
def test_triton_d_scale_follows_the_scale(scale_dtype, shape):
    img, txt = _features()
    _check("triton", img, txt, torch.full(shape, 20.0, dtype=scale_dtype))


@pytest.mark.parametrize("device", [GPU])  # gpu marker (CPU tensors in gpu_check's dry run)
@pytest.mark.parametrize("scale_dtype,shape", [(torch.float32, ()), (torch.float64, (1,))], ids=str)
def test_triton_cpu_scale_with_cuda_features(device, scale_dtype, shape):
    img, txt = _features(device=device)
    _check("triton", img, txt, torch.full(shape, 20.0, dtype=scale_dtype))
