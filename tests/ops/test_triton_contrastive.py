"""Triton fused contrastive loss (kernels/contrastive.py, backend "triton") against the float64
reference (DESIGN §7): loss, d_img, d_txt, d_scale, on CPU tensors through the Triton
interpreter and on CUDA tensors with ``-m gpu``."""
import pytest
import torch
import torch.nn.functional as F

from msclip_fast import ops
from _contrastive_data import features
from _triton_optest import DEVICES, HAS_NUMPY, HAS_TRITON, INTERPRET, TOL_MATMUL, rel_err

NAMES = ("loss", "d_img", "d_txt", "d_scale")


def loss_and_grads(fn, img, txt, scale, upstream=1.0):
    img = img.detach().clone().requires_grad_()
    txt = txt.detach().clone().requires_grad_()
    scale = scale.detach().clone().requires_grad_()
    loss = fn(img, txt, scale)
    grads = torch.autograd.grad(loss * upstream, (img, txt, scale))
    return (loss, *grads)


def triton_loss(img, txt, scale):
    return ops.contrastive_loss(img, txt, scale, backend="triton")


def torch_native(img, txt, scale):
    """Plain PyTorch in the inputs' own dtype (the 'PyTorch error' baseline of DESIGN §7)."""
    logits = scale.to(img.dtype) * img @ txt.t()
    labels = torch.arange(img.shape[0], device=img.device)
    return ((F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels)) / 2).float()


# (N, D, dtype, scale, duplicated pairs): every N in {1, 3, 7, 64, 130} and D in {1, 7, 64, 96},
# each dtype at scales 1 and 100; N = 130 crosses the 64-row blocks, D = 96 the padded D chunk.
CASES = [
    (1, 7, torch.float32, 1.0, False),
    (3, 64, torch.float32, 100.0, False),
    (7, 1, torch.float16, 100.0, True),
    (7, 96, torch.bfloat16, 100.0, False),
    (64, 7, torch.float32, 100.0, True),
    (64, 96, torch.bfloat16, 1.0, True),
    (130, 64, torch.float16, 1.0, False),
    (130, 96, torch.float32, 100.0, True),
    (130, 7, torch.bfloat16, 100.0, False),
    (130, 1, torch.float16, 100.0, False),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("n,d,dtype,s,dup", CASES, ids=lambda v: str(v).replace("torch.", ""))
def test_matches_float64_reference(device, n, d, dtype, s, dup):
    img, txt = features(n, d, dtype, device=device, seed=n * 1000 + d, dup=dup)
    scale = torch.tensor(s, device=device)
    out = loss_and_grads(triton_loss, img, txt, scale)
    # the oracle sees the same (already rounded) inputs in float64
    ref = loss_and_grads(ops.contrastive_loss_ref, img.double().cpu(), txt.double().cpu(), scale.double().cpu())
    assert out[0].dtype == torch.float32 and out[0].dim() == 0
    assert out[1].dtype == dtype and out[2].dtype == dtype and out[3].dtype == scale.dtype
    tol = TOL_MATMUL[dtype]
    native = loss_and_grads(torch_native, img, txt, scale) if dtype != torch.float32 else None
    for i, (name, a, b) in enumerate(zip(NAMES, out, ref)):
        assert torch.isfinite(a).all(), name
        if n == 1 and name != "loss":  # a single pair has zero gradient
            assert a.abs().max() < 1e-6, name
            continue
        err = rel_err(a, b)
        assert err <= tol, f"{name}: rel err {err:.3g} > {tol}"
        if native is not None and name in ("loss", "d_scale"):
            assert err <= 2 * rel_err(native[i], b) + 1e-6, f"{name}: worse than 2x plain PyTorch"


@pytest.mark.parametrize("device", DEVICES)
def test_upstream_gradient_scale_shapes_and_determinism(device):
    img, txt = features(70, 24, torch.float32, device=device, seed=3)
    for scale in (torch.tensor(20.0, dtype=torch.float64, device=device), torch.tensor([20.0], device=device)):
        a = loss_and_grads(triton_loss, img, txt, scale, upstream=3.0)
        b = loss_and_grads(ops.contrastive_loss_ref, img.double().cpu(), txt.double().cpu(), scale.double().cpu(), 3.0)
        assert a[3].shape == scale.shape and a[3].dtype == scale.dtype
        for name, x, y in zip(NAMES, a, b):
            assert rel_err(x, y) < 1e-4, name
    again = loss_and_grads(triton_loss, img, txt, scale, upstream=3.0)
    for x, y in zip(a, again):  # no atomics: bitwise reproducible
        assert torch.equal(x, y)


@pytest.mark.parametrize("device", DEVICES)
def test_non_contiguous_inputs(device):
    img, txt = features(33, 24, torch.float32, device=device, seed=5)
    wide = torch.cat([img, torch.zeros_like(img)], 1)[:, :24]  # row stride 48
    txt_t = txt.t().contiguous().t()  # column-major
    assert not wide.is_contiguous() and not txt_t.is_contiguous()
    scale = torch.tensor(10.0, device=device)
    a = loss_and_grads(triton_loss, wide, txt_t, scale)
    b = loss_and_grads(ops.contrastive_loss_ref, img.double().cpu(), txt.double().cpu(), scale.double().cpu())
    for name, x, y in zip(NAMES, a, b):
        assert rel_err(x, y) < 1e-5, name


@pytest.mark.skipif(not (HAS_TRITON and HAS_NUMPY and INTERPRET), reason="needs triton + numpy with TRITON_INTERPRET=1")
def test_auto_never_picks_triton_for_cpu_tensors():
    img, txt = features(4, 8, torch.float32, device="cpu", seed=1)
    op = ops.contrastive_loss.op
    assert list(op.backends)[:2] == ["cuda", "triton"]  # auto: cuda first, then triton (CUDA tensors)
    assert op.select("triton", img, txt, torch.tensor(1.0)).name == "triton"  # runs by name
    assert op.select("auto", img, txt, torch.tensor(1.0)).name != "triton"
    with pytest.raises(ValueError, match="triton"):
        ops.contrastive_loss(img.double(), txt.double(), torch.tensor(1.0), backend="triton")


FULL_GRID = [(n, d, s) for n in (1, 3, 7, 64, 130) for d in (1, 7, 64, 96) for s in (1.0, 100.0)]
# on the GPU every launch of a new (dtype, D) is a compile: cover every N, D and scale with each
# dtype, without the cross product (8 cases instead of 40)
GPU_GRID = [(1, 1, 1.0), (3, 7, 100.0), (7, 64, 1.0), (64, 96, 100.0), (130, 1, 100.0), (130, 7, 1.0),
            (7, 96, 100.0), (64, 64, 100.0)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_full_grid(request, device, dtype):
    """Every (N, D, scale) of the issue in one dtype (the interpreter runs the cross product, the
    GPU a covering subset); pairs duplicated where N >= 7 and D > 1.
    (With N = 3 one duplicated pair is most of the batch and the exact gradient nearly cancels,
    e.g. to 0 exactly for D = 1, where features are ±1: any method that keeps the fp32 LSE,
    the C++ backend included, leaves an absolute error of about s·ulp(lse), ~1e-5 at s = 100,
    which the relative measure then magnifies past 1e-4. CASES covers duplicates at N >= 7.)"""
    tol = TOL_MATMUL[dtype]
    grid = GPU_GRID if request.node.get_closest_marker("gpu") else FULL_GRID
    assert {n for n, _, _ in grid} == {1, 3, 7, 64, 130} and {d for _, d, _ in grid} == {1, 7, 64, 96}
    for n, d, s in grid:
        img, txt = features(n, d, dtype, device=device, seed=n + 7 * d, dup=n >= 7 and d > 1)
        scale = torch.tensor(s, device=device)
        out = loss_and_grads(triton_loss, img, txt, scale)
        ref = loss_and_grads(ops.contrastive_loss_ref, img.double().cpu(), txt.double().cpu(),
                             scale.double().cpu())
        for name, a, b in zip(NAMES, out, ref):
            err = rel_err(a, b) if (n > 1 or name == "loss") else a.abs().max().item()
            assert err <= tol, f"N={n} D={d} scale={s} {name}: {err:.3g} > {tol}"


@pytest.mark.slow
@pytest.mark.parametrize("device", DEVICES)
def test_fp16_backward_at_realistic_batch(device):
    """N = 4096, D = 512, fp16, scale 100: a G scaled by 1/(2N) before its fp16 rounding
    underflows for most entries (G ~ 1/N² here, fp16's smallest normal is 6e-5) and gave
    d_img/d_txt relative errors of 1.3e-3 under these numerics, within the 2e-3 fp16 tolerance
    but 6x the error of a schedule that rounds only values in [-2, 2] (2.3e-4; the C++
    extension, which never rounds G, 2.1e-4). The bound holds the kernel to the latter."""
    img, txt = features(4096, 512, torch.float16, device=device, seed=11)
    scale = torch.tensor(100.0, device=device)
    out = loss_and_grads(triton_loss, img, txt, scale)
    ref = loss_and_grads(ops.contrastive_loss_ref, img.double().cpu(), txt.double().cpu(), scale.double().cpu())
    errs = {name: rel_err(a, b) for name, a, b in zip(NAMES, out, ref)}
    assert errs["loss"] < 1e-6 and errs["d_scale"] < 1e-5, errs
    assert errs["d_img"] < 4e-4 and errs["d_txt"] < 4e-4, errs
