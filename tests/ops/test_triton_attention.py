"""Triton flash attention vs the float64 reference (DESIGN §7): forward and dq/dk/dv,
causal and non-causal separately, batched and varlen with mixed causal flags, head dims
32/64/128 (80/96 padded), fp32/fp16/bf16 (low precision: within the §7 bound and at most 2x
plain PyTorch's own error), non-contiguous inputs, deterministic backward. CPU tensors run
through the Triton interpreter at small batch/head counts; ``-m gpu`` runs them on CUDA."""
import pytest
import torch

from msclip_fast import ops
from _triton_optest import DEVICES, TOL_MATMUL, f64, randn, rel_err

ATT = ops.attention


def _run(q, k, v, cu=None, causal=False, backend="triton"):
    o = ATT(q, k, v, cu_seqlens=cu, causal=causal, backend=backend)
    return o


def _check(shape, device, causal=False, cu=None, dtype=torch.float32, seed=0, layout=None):
    g = torch.Generator().manual_seed(seed + sum(shape))
    if layout == "bl":  # (B, L, H, K) storage viewed as (B, H, L, K): non-contiguous
        B, H, L, K = shape
        q, k, v = (randn(B, L, H, K, dtype=dtype, device=device, gen=g, grad=False).transpose(1, 2).requires_grad_()
                   for _ in range(3))
    elif layout == "qkv":  # varlen q/k/v as strided slices of one (T, 3, H, K) tensor
        T, H, K = shape
        qkv = randn(T, 3, H, K, dtype=dtype, device=device, gen=g)
        q, k, v = qkv.unbind(1)
    else:
        q, k, v = (randn(*shape, dtype=dtype, device=device, gen=g) for _ in range(3))
    cu_d = cu.to(device) if cu is not None else None
    causal_d = causal.to(device) if isinstance(causal, torch.Tensor) else causal
    o = _run(q, k, v, cu_d, causal_d)
    go = randn(*o.shape, dtype=dtype, device=device, gen=g, grad=False)
    leaves = (qkv,) if layout == "qkv" else (q, k, v)
    grads = torch.autograd.grad(o, leaves, go)
    if layout == "qkv":
        grads = grads[0].unbind(1)

    ref_in = f64(q, k, v) if layout != "qkv" else [t.detach().double().cpu().requires_grad_() for t in (q, k, v)]
    ref_in = [t.cpu().detach().requires_grad_() for t in ref_in]
    ref = ops.attention_ref(*ref_in, cu_seqlens=cu, causal=causal)
    grads_ref = torch.autograd.grad(ref, ref_in, go.double().cpu())

    errs = {"o": rel_err(o, ref), **{n: rel_err(a, c) for n, a, c in zip(("dq", "dk", "dv"), grads, grads_ref)}}
    assert o.dtype == dtype and o.shape == q.shape
    tol = TOL_MATMUL[dtype]
    if dtype != torch.float32:
        # plain PyTorch in the same dtype (the reference computed in dtype, on the CPU)
        low_in = [t.detach().to(dtype).requires_grad_() for t in ref_in]
        lo = ops.attention_ref(*low_in, cu_seqlens=cu, causal=causal)
        lg = torch.autograd.grad(lo, low_in, go.cpu())
        torch_errs = {"o": rel_err(lo, ref), **{n: rel_err(a, c) for n, a, c in zip(("dq", "dk", "dv"), lg, grads_ref)}}
        for n, e in errs.items():
            assert e <= tol, (n, e, errs)
            assert e <= 2 * torch_errs[n] + 1e-6, (n, e, torch_errs[n])
    else:
        for n, e in errs.items():
            assert e <= tol, (n, e, errs)
    return o, grads


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "B,H,L,K",
    [(1, 1, 1, 32), (2, 2, 7, 64), (1, 1, 50, 128), (1, 1, 77, 32), (1, 1, 197, 64), (1, 1, 257, 32)],
)
def test_batched_non_causal(device, B, H, L, K):
    _check((B, H, L, K), device, causal=False)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("B,H,L,K", [(1, 1, 1, 32), (2, 2, 7, 64), (1, 1, 77, 128), (1, 1, 257, 64)])
def test_batched_causal(device, B, H, L, K):
    _check((B, H, L, K), device, causal=True)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("K", [80, 96])
def test_head_dims_padded(device, K):
    _check((1, 2, 50, K), device, causal=K == 96)


@pytest.mark.parametrize("device", DEVICES)
def test_varlen_mixed_causal(device):
    # two 50-token images (bidirectional), two 77-token texts (causal), and odd lengths
    cu = torch.tensor([0, 50, 100, 177, 254, 255, 262], dtype=torch.int32)
    flags = torch.tensor([False, False, True, True, True, False])
    _check((262, 2, 64), device, causal=flags, cu=cu)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("causal", [False, True])
def test_varlen_bool_causal_non_contiguous(device, causal):
    cu = torch.tensor([0, 7, 57, 134], dtype=torch.int32)
    _check((134, 2, 32), device, causal=causal, cu=cu, layout="qkv")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("causal", [False, True])
def test_batched_non_contiguous(device, causal):
    _check((2, 2, 50, 64), device, causal=causal, layout="bl")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_batched(device, dtype):
    _check((1, 2, 77, 64), device, causal=True, dtype=dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_varlen(device, dtype):
    cu = torch.tensor([0, 50, 127], dtype=torch.int32)
    _check((127, 2, 32), device, causal=torch.tensor([False, True]), cu=cu, dtype=dtype)


@pytest.mark.parametrize("device", DEVICES)
def test_deterministic_backward(device):
    g = torch.Generator().manual_seed(0)
    cu = torch.tensor([0, 50, 127], dtype=torch.int32, device=device)
    flags = torch.tensor([False, True], device=device)
    q, k, v = (randn(127, 2, 64, gen=g, device=device) for _ in range(3))
    o = ATT(q, k, v, cu_seqlens=cu, causal=flags, backend="triton")
    go = torch.randn(o.shape, generator=g).to(device)
    g1 = torch.autograd.grad(o, (q, k, v), go, retain_graph=True)
    g2 = torch.autograd.grad(o, (q, k, v), go)
    assert all(torch.equal(a, c) for a, c in zip(g1, g2))


def test_backend_selection_and_reasons():
    q = torch.randn(1, 2, 5, 16)
    assert ATT.op.select("auto", q, q, q).name == "reference"
    assert list(ATT.op.backends)[0] == "triton"
    big = torch.randn(1, 1, 4, 256)
    with pytest.raises(ValueError, match="head dim 256"):
        ATT(big, big, big, backend="triton")
    with pytest.raises(ValueError, match="xformers"):
        ATT(q, q, q, backend="xformers")
    with pytest.raises(ValueError, match="float64"):
        ATT(q.double(), q.double(), q.double(), backend="triton")
