import pytest
import torch
import torch.nn.functional as F

from msclip_fast import ops


def oracle(x, w, b, ids, eps):
    out = torch.empty_like(x)
    for m in range(w.shape[0]):
        sel = ids == m
        out[sel] = F.layer_norm(x[sel], x.shape[-1:], w[m], b[m], eps)
    return out


@pytest.mark.parametrize("T,D", [(1, 8), (7, 768), (50, 100), (257, 37)])
def test_matches_per_modality_layer_norm_fp64(T, D):
    g = torch.Generator().manual_seed(T + D)
    x = torch.randn(T, D, generator=g, dtype=torch.float64, requires_grad=True)
    r = torch.randn(T, D, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(2, D, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(2, D, generator=g, dtype=torch.float64, requires_grad=True)
    ids = torch.randint(0, 2, (T,), generator=g, dtype=torch.int8)
    out, s = ops.modality_layer_norm(x, w, b, ids, eps=1e-12, residual=r)
    ref_s = x + r
    ref = oracle(ref_s, w, b, ids, 1e-12)
    torch.testing.assert_close(s, ref_s)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    go, gs = torch.randn_like(out), torch.randn_like(out)
    g1 = torch.autograd.grad((out * go).sum() + (s * gs).sum(), (x, r, w, b))
    g2 = torch.autograd.grad((ref * go).sum() + (ref_s * gs).sum(), (x, r, w, b))
    for a, c in zip(g1, g2):
        torch.testing.assert_close(a, c, rtol=1e-9, atol=1e-9)


def test_int_modality_and_zero_variance_rows():
    w, b = torch.randn(2, 16), torch.randn(2, 16)
    x = torch.full((3, 16), 2.5)
    out = ops.modality_layer_norm(x, w, b, 1)
    assert torch.equal(out, b[1].expand(3, 16))


def test_many_rows_and_low_precision():
    x = torch.randn(70_000, 8)
    w, b = torch.randn(2, 8), torch.randn(2, 8)
    ids = torch.randint(0, 2, (70_000,))
    ref = oracle(x.double(), w.double(), b.double(), ids, 1e-12)
    for dtype, tol in ((torch.float32, 1e-5), (torch.float16, 2e-3), (torch.bfloat16, 1.6e-2)):
        out = ops.modality_layer_norm(x.to(dtype), w.to(dtype), b.to(dtype), ids)
        assert out.dtype == dtype
        assert (out.double() - ref).norm() / ref.norm() <= tol


def test_errors_name_the_field():
    x = torch.randn(4, 8)
    w = torch.randn(2, 8)
    with pytest.raises(ValueError, match="modality_ids=2"):
        ops.modality_layer_norm(x, w, w, 2)
    with pytest.raises(ValueError, match="modality_ids must have shape"):
        ops.modality_layer_norm(x, w, w, torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="width"):
        ops.modality_layer_norm(torch.randn(4, 7), w, w, 0)


def test_bad_ids_and_eps_rejected():
    x, w = torch.randn(2, 8), torch.randn(2, 8)
    with pytest.raises(ValueError, match=r"modality_ids hold values in \[0, 2\]"):
        ops.modality_layer_norm(x, w, w, torch.tensor([0, 2]))
    with pytest.raises(ValueError, match="integer tensor"):
        ops.modality_layer_norm(x, w, w, torch.tensor([0.5, 1.7]))
    with pytest.raises(ValueError, match="integer tensor"):
        ops.modality_layer_norm(x, w, w, torch.tensor([True, False]))
    with pytest.raises(ValueError, match="eps must be > 0, got -1"):
        ops.modality_layer_norm(x, w, w, 0, eps=-1)
