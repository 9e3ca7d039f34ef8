import pytest
import torch

from msclip_fast import ops


def oracle(img, txt, scale):
    """Explicit per-row log-softmax loops in float64."""
    img, txt, s = img.double(), txt.double(), scale.double()
    n = img.shape[0]
    total = 0.0
    for i in range(n):
        row = s * (img[i] @ txt.t())
        col = s * (txt[i] @ img.t())
        total = total + (torch.logsumexp(row, 0) - row[i]) + (torch.logsumexp(col, 0) - col[i])
    return total / (2 * n)


@pytest.mark.parametrize("N,D", [(1, 7), (3, 1), (7, 512), (64, 33)])
@pytest.mark.parametrize("logit_scale", [1.0, 100.0])
def test_loss_and_grads_fp64(N, D, logit_scale):
    g = torch.Generator().manual_seed(N * D)
    img = torch.nn.functional.normalize(torch.randn(N, D, generator=g, dtype=torch.float64), dim=-1).requires_grad_()
    txt = torch.nn.functional.normalize(torch.randn(N, D, generator=g, dtype=torch.float64), dim=-1).requires_grad_()
    scale = torch.tensor(logit_scale, dtype=torch.float64, requires_grad=True)
    out = ops.contrastive_loss(img, txt, scale)
    ref = oracle(img, txt, scale)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-12)
    for a, b in zip(torch.autograd.grad(out, (img, txt, scale)), torch.autograd.grad(ref, (img, txt, scale))):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-12)


def test_duplicate_pairs_and_half_inputs():
    x = torch.nn.functional.normalize(torch.randn(8, 16), dim=-1)
    img = torch.cat([x, x])  # duplicated rows
    txt = torch.cat([x, x])
    scale = torch.tensor(100.0)
    ref = oracle(img, txt, scale)
    for dtype, tol in ((torch.float32, 1e-4), (torch.float16, 2e-3), (torch.bfloat16, 1.6e-2)):
        out = ops.contrastive_loss(img.to(dtype), txt.to(dtype), scale)
        assert torch.isfinite(out)
        assert abs(out.double() - ref) / abs(ref) <= tol


def test_shape_errors():
    with pytest.raises(ValueError, match="share D"):
        ops.contrastive_loss(torch.randn(3, 4), torch.randn(3, 5), torch.tensor(1.0))
    with pytest.raises(ValueError, match="row count"):
        ops.contrastive_loss(torch.randn(3, 4), torch.randn(2, 4), torch.tensor(1.0))
    with pytest.raises(ValueError, match="scale"):
        ops.contrastive_loss(torch.randn(3, 4), torch.randn(3, 4), 2.0)


def test_empty_and_integer_inputs_rejected():
    with pytest.raises(ValueError, match="at least one row"):
        ops.contrastive_loss(torch.randn(0, 4), torch.randn(0, 4), torch.tensor(1.0))
    with pytest.raises(ValueError, match="img must be a floating tensor"):
        ops.contrastive_loss(torch.ones(3, 4, dtype=torch.long), torch.randn(3, 4), torch.tensor(1.0))
    with pytest.raises(ValueError, match="x must be a floating tensor"):
        ops.bias_act(torch.ones(3, 4, dtype=torch.long), None)
