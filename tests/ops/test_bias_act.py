import math

import pytest
import torch

from msclip_fast import ops


def oracle(x, act):
    if act == "quick_gelu":
        return x / (1 + torch.exp(-1.702 * x))
    if act == "gelu":
        return 0.5 * x * (1 + torch.erf(x / math.sqrt(2)))
    return 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))


@pytest.mark.parametrize("act", ["quick_gelu", "gelu", "gelu_tanh"])
@pytest.mark.parametrize("shape", [(1, 3072), (7, 50, 13), (77, 768)])
def test_matches_formula_fp64(act, shape):
    x = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
    b = torch.randn(shape[-1], dtype=torch.float64, requires_grad=True)
    out = ops.bias_act(x, b, act)
    ref = oracle(x + b, act)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    go = torch.randn_like(out)
    for a, c in zip(torch.autograd.grad(out, (x, b), go), torch.autograd.grad(ref, (x, b), go)):
        torch.testing.assert_close(a, c, rtol=1e-10, atol=1e-10)


def test_bad_arguments():
    with pytest.raises(ValueError, match="act must be"):
        ops.bias_act(torch.randn(2, 3), None, "relu6")
    with pytest.raises(ValueError, match="bias must be"):
        ops.bias_act(torch.randn(2, 3), torch.randn(4))
