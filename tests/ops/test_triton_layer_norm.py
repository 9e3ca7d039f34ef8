"""Triton modality-indexed LayerNorm vs its float64 reference (DESIGN §7), forward and every
gradient, on CPU tensors through the Triton interpreter (and on CUDA with ``-m gpu``)."""
import pytest
import torch

from msclip_fast import ops
from _triton_optest import DEVICES, TOL_ELEMENTWISE, f64, randn, rel_err

LN = ops.modality_layer_norm


def _check(T, D, dtype, device, residual, M=2, gen_seed=0, shape=None, ids_int=None):
    g = torch.Generator().manual_seed(gen_seed + T * 1000 + D)
    lead = shape if shape is not None else (T,)
    x = randn(*lead, D, dtype=dtype, device=device, gen=g, scale=2.0)
    r = randn(*lead, D, dtype=dtype, device=device, gen=g) if residual else None
    w = randn(M, D, dtype=dtype, device=device, gen=g)
    b = randn(M, D, dtype=dtype, device=device, gen=g)
    ids = ids_int if ids_int is not None else torch.randint(0, M, lead, generator=g, dtype=torch.int8).to(device)
    out = LN(x, w, b, ids, eps=1e-12, residual=r, backend="triton")
    out, s = out if residual else (out, None)
    go = randn(*out.shape, dtype=dtype, device=device, gen=g, grad=False)
    gs = randn(*out.shape, dtype=dtype, device=device, gen=g, grad=False) if residual else None
    loss = (out.float() * go.float()).sum() + ((s.float() * gs.float()).sum() if residual else 0)
    leaves = [t for t in (x, r, w, b) if t is not None]
    grads = torch.autograd.grad(loss, leaves)

    xd, rd, wd, bd = f64(x, r, w, b)
    ids_ref = ids if isinstance(ids, int) else ids.cpu()
    ref = ops.modality_layer_norm_ref(xd, wd, bd, ids_ref, eps=1e-12, residual=rd)
    ref, sref = ref if residual else (ref, None)
    loss_ref = (ref * go.double().cpu()).sum() + ((sref * gs.double().cpu()).sum() if residual else 0)
    grads_ref = torch.autograd.grad(loss_ref, [t for t in (xd, rd, wd, bd) if t is not None])

    tol = TOL_ELEMENTWISE[dtype]
    assert out.dtype == dtype and out.shape == x.shape
    assert rel_err(out, ref) <= tol, ("out", rel_err(out, ref))
    if residual:
        assert rel_err(s, sref) <= tol
    names = ["dx", "dresidual", "dweight", "dbias"] if residual else ["dx", "dweight", "dbias"]
    for n, a, c in zip(names, grads, grads_ref):
        assert a.dtype == dtype
        assert rel_err(a, c) <= tol, (n, rel_err(a, c))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "T,D,residual",
    [(1, 768, True), (7, 100, False), (50, 768, True), (77, 100, True), (197, 64, False), (257, 100, True)],
)
def test_fp32_matches_fp64_reference(device, T, D, residual):
    _check(T, D, torch.float32, device, residual)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision(device, dtype):
    _check(77, 100, dtype, device, residual=True)


@pytest.mark.parametrize("device", DEVICES)
def test_batched_rows_int_modality_three_modalities(device):
    _check(0, 48, torch.float32, device, residual=True, shape=(3, 5), M=3)
    _check(0, 48, torch.float32, device, residual=False, shape=(2, 9), M=3, ids_int=2)


@pytest.mark.parametrize("device", DEVICES)
def test_more_than_65536_rows(device):
    # rows beyond the 16-bit grid limit and beyond one program's chunk, at a small width
    _check(70_001, 8, torch.float32, device, residual=True)


@pytest.mark.parametrize("device", DEVICES)
def test_zero_variance_rows_give_exactly_the_bias(device):
    D = 100
    w, b = torch.randn(2, D, device=device), torch.randn(2, D, device=device)
    x = torch.tensor([0.1, -3.7, 2.5, 1e4], device=device)[:, None].expand(4, D).contiguous()
    ids = torch.tensor([0, 1, 1, 0], dtype=torch.int32, device=device)
    out = LN(x, w, b, ids, backend="triton")
    assert torch.equal(out, b[ids.long()])
    # constant after the residual add
    out, s = LN(x - 1.0, w, b, ids, residual=torch.ones_like(x), backend="triton")
    assert torch.equal(out, b[ids.long()])


@pytest.mark.parametrize("device", DEVICES)
def test_non_contiguous_input_and_deterministic_backward(device):
    g = torch.Generator().manual_seed(3)
    base = randn(100, 40, gen=g, device=device, grad=False)
    x = base.t().requires_grad_()  # (40, 100), strides (1, 40)
    w = randn(2, 100, gen=g, device=device)
    b = randn(2, 100, gen=g, device=device)
    ids = (torch.arange(40, device=device) % 2).to(torch.int64)
    out = LN(x, w, b, ids, backend="triton")
    ref = ops.modality_layer_norm_ref(*f64(x, w, b), ids.cpu())
    assert rel_err(out, ref) <= 1e-5
    go = torch.randn(out.shape, generator=g).to(device)
    g1 = torch.autograd.grad(out, (x, w, b), go, retain_graph=True)
    g2 = torch.autograd.grad(out, (x, w, b), go)
    for a, c in zip(g1, g2):
        assert torch.equal(a, c)


def test_auto_picks_reference_on_cpu_and_explicit_errors_name_reasons():
    x, w, b = torch.randn(3, 8), torch.randn(2, 8), torch.randn(2, 8)
    assert LN.op.select("auto", x, w, b, 0).name == "reference"
    with pytest.raises(ValueError, match="triton.*float64"):
        LN(x.double(), w.double(), b.double(), 0, backend="triton")
    assert list(LN.op.backends)[0] == "triton"  # tried first by auto (CUDA tensors)
