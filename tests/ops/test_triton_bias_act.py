"""Triton bias + activation and the memory-saving FFN vs their float64 references
(DESIGN §7), forward and every gradient, on CPU tensors through the Triton interpreter
(and on CUDA with ``-m gpu``)."""
import warnings

import pytest
import torch

from msclip_fast import ops
from _triton_optest import DEVICES, TOL_ELEMENTWISE, TOL_MATMUL, f64, randn, rel_err

# the interpreter evaluates sigmoid with numpy exp, which warns on overflow for large |x|
pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")


def _check(shape, act, dtype, device, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed + sum(shape))
    x = randn(*shape, dtype=dtype, device=device, gen=g, scale=3.0)
    b = randn(shape[-1], dtype=dtype, device=device, gen=g) if bias else None
    y = ops.bias_act(x, b, act=act, backend="triton")
    gy = randn(*shape, dtype=dtype, device=device, gen=g, grad=False)
    leaves = [t for t in (x, b) if t is not None]
    grads = torch.autograd.grad(y, leaves, gy)
    xd, bd = f64(x, b)
    ref = ops.bias_act_ref(xd, bd, act=act)
    grads_ref = torch.autograd.grad(ref, [t for t in (xd, bd) if t is not None], gy.double().cpu())
    tol = TOL_ELEMENTWISE[dtype]
    assert y.dtype == dtype and y.shape == x.shape
    assert rel_err(y, ref) <= tol, rel_err(y, ref)
    for n, a, c in zip(["dx", "dbias"], grads, grads_ref):
        assert a.dtype == dtype
        assert rel_err(a, c) <= tol, (n, rel_err(a, c))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("act", ops.ACTIVATIONS)
@pytest.mark.parametrize("shape", [(1, 768), (77, 100), (2, 25, 3072)])
def test_fp32_matches_fp64_reference(device, act, shape):
    _check(shape, act, torch.float32, device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("act", ops.ACTIVATIONS)
def test_low_precision(device, dtype, act):
    _check((50, 100), act, dtype, device)


@pytest.mark.parametrize("device", DEVICES)
def test_no_bias_non_contiguous_and_deterministic(device):
    _check((7, 100), "gelu", torch.float32, device, bias=False)
    g = torch.Generator().manual_seed(1)
    x = randn(96, 30, gen=g, device=device, grad=False).t().requires_grad_()  # (30, 96) strided
    b = randn(96, gen=g, device=device)
    y = ops.bias_act(x, b, act="quick_gelu", backend="triton")
    assert rel_err(y, ops.bias_act_ref(*f64(x, b))) <= 1e-5
    gy = torch.randn(y.shape, generator=g).to(device)
    g1 = torch.autograd.grad(y, (x, b), gy, retain_graph=True)
    g2 = torch.autograd.grad(y, (x, b), gy)
    assert all(torch.equal(a, c) for a, c in zip(g1, g2))


def _ffn_inputs(device, dtype, D=64, N=96, shape=(2, 5), seed=0):
    g = torch.Generator().manual_seed(seed)
    x = randn(*shape, D, gen=g, device=device, dtype=dtype)
    w1 = randn(N, D, gen=g, device=device, dtype=dtype, scale=D ** -0.5)
    b1 = randn(N, gen=g, device=device, dtype=dtype)
    w2 = randn(D, N, gen=g, device=device, dtype=dtype, scale=N ** -0.5)
    b2 = randn(D, gen=g, device=device, dtype=dtype)
    return g, (x, w1, b1, w2, b2)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("act", ops.ACTIVATIONS)
def test_ffn_matches_reference(device, act):
    g, ins = _ffn_inputs(device, torch.float32)
    y = ops.ffn(*ins, act=act, backend="triton")
    gy = torch.randn(y.shape, generator=g).to(device)
    grads = torch.autograd.grad(y, ins, gy)
    ref_ins = f64(*ins)
    ref = ops.ffn_ref(*ref_ins, act=act)
    grads_ref = torch.autograd.grad(ref, ref_ins, gy.double().cpu())
    assert rel_err(y, ref) <= TOL_MATMUL[torch.float32]
    for n, a, c in zip(["dx", "dw1", "db1", "dw2", "db2"], grads, grads_ref):
        assert rel_err(a, c) <= TOL_MATMUL[torch.float32], (n, rel_err(a, c))


@pytest.mark.parametrize("device", DEVICES)
def test_ffn_stores_the_hidden_activation_once(device):
    """Count hidden-width (N = 96 columns) tensors saved for backward: the Triton FFN keeps
    only the pre-activation; eager Linear → act → Linear keeps at least two."""
    _, ins = _ffn_inputs(device, torch.float32)
    N = ins[1].shape[0]

    def hidden_saved(backend):
        saved = []

        def pack(t):
            if t.dim() >= 2 and t.shape[-1] == N and t.shape[0] != ins[3].shape[0]:
                saved.append(t.data_ptr())
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            ops.ffn(*ins, act="quick_gelu", backend=backend)
        return len(set(saved))

    assert hidden_saved("triton") == 1
    assert hidden_saved("reference") >= 2


def test_auto_picks_reference_on_cpu():
    x = torch.randn(3, 8)
    assert ops.bias_act.op.select("auto", x, None).name == "reference"
    assert ops.ffn.op.select("auto", x, torch.randn(4, 8), None, torch.randn(8, 4), None).name == "reference"
    with pytest.raises(ValueError, match="act must be one of"):
        ops.ffn(x, torch.randn(4, 8), None, torch.randn(8, 4), None, act="relu", backend="reference")
