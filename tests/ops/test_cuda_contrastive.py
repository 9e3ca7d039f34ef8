"""The CUDA backend of the fused contrastive loss (csrc/contrastive/contrastive_cuda.cu,
``backend="cuda"``) against the float64 reference on the GPU (DESIGN §7, issue 7): fp32, fp16
and bf16, awkward N (1, 7, 77, 130, 257, 4096: one partial 64-row block, several, many) and D
(1, 7, 96, 512: below, across and at multiples of the 32/64-wide feature chunks), scale 100;
loss and every gradient (img, txt, scale).

The grid covers each N and each D in every dtype without the full cross product (18 cases, a
few seconds on a GPU). Needs only torch and pytest; skipped, with the reason, without a CUDA
device or without a CUDA build of ``msclip_fast._C`` -- except under bench/gpu_check.sh
(``MSCLIP_FAST_REQUIRE_GPU=1``), where a missing build fails the tests (the backend's ValueError
names why), and in its CPU dry run (``MSCLIP_FAST_GPU_DRY_RUN=1``), where nothing of this runs.
"""
import os

import pytest
import torch

from msclip_fast import ops
from msclip_fast.ops import contrastive_fused


def _skip_reason():
    if os.environ.get("MSCLIP_FAST_GPU_DRY_RUN", "0") == "1":
        return "dry run: the CUDA extension runs on a GPU only (no Triton kernels to count here)"
    if os.environ.get("MSCLIP_FAST_REQUIRE_GPU", "0") == "1":
        return None
    if not torch.cuda.is_available():
        return "needs a CUDA device"
    reasons = contrastive_fused.cuda_available()
    if reasons:
        return "needs the CUDA build of msclip_fast._C: " + "; ".join(reasons)
    return None


_REASON = _skip_reason()
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(_REASON is not None, reason=_REASON or "")]

NAMES = ("loss", "d_img", "d_txt", "d_scale")
TOL = {torch.float32: 1e-4, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}  # DESIGN §7, matmul-based
F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16
# (N, D) per dtype: every N and every D once per dtype, N = 4096 at the CLIP width
GRID = {
    F32: [(1, 7), (7, 96), (77, 512), (130, 1), (257, 7), (4096, 512)],
    F16: [(1, 512), (7, 1), (77, 7), (130, 96), (257, 512), (4096, 512)],
    BF16: [(1, 96), (7, 512), (77, 1), (130, 7), (257, 96), (4096, 512)],
}
CASES = [(n, d, dt) for dt, nd in GRID.items() for n, d in nd]


def rel_err(a, ref):
    a, ref = a.detach().double(), ref.detach().double()
    den = ref.norm().item()
    return (a - ref).norm().item() / den if den > 0 else (a - ref).norm().item()


def features(n, d, dtype, seed, device="cuda"):
    """L2-normalized pairs drawn in float64 on the CPU (same numbers on every machine), with
    the second half of the rows duplicating the first half (duplicated pairs) where n >= 7."""
    g = torch.Generator().manual_seed(seed)
    img = torch.nn.functional.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=-1)
    txt = torch.nn.functional.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=-1)
    if n >= 7 and d > 1:
        h = n // 2
        img[h:2 * h], txt[h:2 * h] = img[:h], txt[:h]
    return img.to(device=device, dtype=dtype), txt.to(device=device, dtype=dtype)


def loss_and_grads(fn, img, txt, scale):
    img = img.detach().clone().requires_grad_()
    txt = txt.detach().clone().requires_grad_()
    scale = scale.detach().clone().requires_grad_()
    loss = fn(img, txt, scale)
    return (loss, *torch.autograd.grad(loss, (img, txt, scale)))


def cuda_loss(img, txt, scale):
    return ops.contrastive_loss(img, txt, scale, backend="cuda")


def torch_native(img, txt, scale):
    """Plain PyTorch in the inputs' own dtype (the 'PyTorch error' baseline of DESIGN §7)."""
    logits = scale.to(img.dtype) * img @ txt.t()
    labels = torch.arange(img.shape[0], device=img.device)
    ce = torch.nn.functional.cross_entropy
    return ((ce(logits, labels) + ce(logits.t(), labels)) / 2).float()


@pytest.mark.parametrize("n,d,dtype", CASES, ids=lambda v: str(v).replace("torch.", ""))
def test_cuda_matches_float64_reference(n, d, dtype):
    img, txt = features(n, d, dtype, seed=n * 1000 + d)
    scale = torch.tensor(100.0, device="cuda")
    out = loss_and_grads(cuda_loss, img, txt, scale)
    # the oracle sees the same (already rounded) inputs, in float64, on the GPU
    ref = loss_and_grads(ops.contrastive_loss_ref, img.double(), txt.double(), scale.double())
    assert out[0].dtype == torch.float32 and out[0].dim() == 0
    assert out[1].dtype == dtype and out[2].dtype == dtype and out[3].dtype == scale.dtype
    native = loss_and_grads(torch_native, img, txt, scale) if dtype != F32 else None
    tol = TOL[dtype]
    for i, (name, a, b) in enumerate(zip(NAMES, out, ref)):
        assert a.is_cuda and torch.isfinite(a).all(), name
        if n == 1 and name != "loss":  # a single pair has zero gradient
            assert a.abs().max().item() < 1e-6, name
            continue
        err = rel_err(a, b)
        assert err <= tol, f"N={n} D={d} {dtype} {name}: rel err {err:.3g} > {tol}"
        # (the 2x-PyTorch bound needs a non-zero reference: at N = 1 the loss is exactly 0)
        if native is not None and n > 1 and name in ("loss", "d_scale"):
            assert err <= 2 * rel_err(native[i], b) + 1e-6, f"N={n} D={d} {dtype} {name}: worse than 2x PyTorch"


@pytest.mark.parametrize("scale_dtype,scale_shape", [(torch.float32, ()), (torch.float64, (1,))], ids=str)
def test_cpu_scale_with_cuda_features_gets_its_gradient_on_the_cpu(scale_dtype, scale_shape):
    """Issue 7: d_scale is returned on the scale's device (here the CPU), dtype and shape."""
    img, txt = features(130, 96, torch.bfloat16, seed=5)
    scale = torch.full(scale_shape, 100.0, dtype=scale_dtype)  # on the CPU
    out = loss_and_grads(cuda_loss, img, txt, scale)
    d_scale = out[3]
    assert d_scale.device.type == "cpu" and d_scale.dtype == scale_dtype and d_scale.shape == scale.shape
    ref = loss_and_grads(ops.contrastive_loss_ref, img.double(), txt.double(), scale.double().cuda())
    for name, a, b in zip(NAMES, out, ref):
        assert rel_err(a.cpu(), b.cpu()) <= TOL[torch.bfloat16], name
