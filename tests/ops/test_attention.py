import math

import pytest
import torch

from msclip_fast import ops


def naive(q, k, v, causal):
    """Loop-free float64 oracle written independently of attention_ref."""
    q, k, v = (t.double() for t in (q, k, v))
    s = torch.einsum("bhik,bhjk->bhij", q, k) / math.sqrt(q.shape[-1])
    if causal:
        L = q.shape[-2]
        i = torch.arange(L)
        s = torch.where(i[None, :] > i[:, None], torch.tensor(-math.inf, dtype=s.dtype), s)
    return torch.einsum("bhij,bhjk->bhik", s.softmax(-1), v)


@pytest.mark.parametrize("L", [1, 7, 50, 77, 197])
@pytest.mark.parametrize("K", [32, 64, 128])
@pytest.mark.parametrize("causal", [False, True])
def test_batched_matches_naive_fp64(L, K, causal):
    g = torch.Generator().manual_seed(L * 1000 + K + causal)
    q, k, v = (torch.randn(2, 3, L, K, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(3))
    out = ops.attention(q, k, v, causal=causal, backend="reference")
    ref = naive(q, k, v, causal)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-12)
    go = torch.randn_like(out)
    g1 = torch.autograd.grad(out, (q, k, v), go)
    g2 = torch.autograd.grad(ref, (q, k, v), go)
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("causal", [False, True])
def test_sdpa_peer_agrees(causal):
    q, k, v = (torch.randn(2, 4, 77, 64, dtype=torch.float64) for _ in range(3))
    a = ops.attention(q, k, v, causal=causal, backend="reference")
    b = ops.attention(q, k, v, causal=causal, backend="sdpa")
    torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_varlen_mixed_causal_equals_per_sequence():
    lens, flags = [50, 77, 1, 7, 77], [False, True, False, True, True]
    H, K = 2, 32
    cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32)
    T = int(cu[-1])
    q, k, v = (torch.randn(T, H, K, dtype=torch.float64, requires_grad=True) for _ in range(3))
    out = ops.attention(q, k, v, cu_seqlens=cu, causal=torch.tensor(flags))
    for i, (a, b) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist())):
        qi, ki, vi = (t[a:b].transpose(0, 1)[None] for t in (q, k, v))
        ref = naive(qi, ki, vi, flags[i])[0].transpose(0, 1)
        torch.testing.assert_close(out[a:b], ref, rtol=1e-10, atol=1e-12)


def test_noncontiguous_and_low_precision():
    base = torch.randn(2, 50, 4, 64)
    q = base.transpose(1, 2)  # (B, H, L, K) view, not contiguous
    assert not q.is_contiguous()
    ref = naive(q, q, q, False)
    for dtype, tol in ((torch.float32, 1e-4), (torch.bfloat16, 1.6e-2), (torch.float16, 2e-3)):
        out = ops.attention(q.to(dtype), q.to(dtype), q.to(dtype))
        assert out.dtype == dtype
        err = (out.double() - ref).norm() / ref.norm()
        assert err <= tol, (dtype, err)


def test_bad_shapes_raise():
    q = torch.randn(2, 3, 5, 8)
    with pytest.raises(ValueError, match="one shape"):
        ops.attention(q, q[:, :, :4], q)
    with pytest.raises(ValueError, match="cu_seqlens"):
        ops.attention(q, q, q, causal=torch.tensor([True]))
    qv = torch.randn(10, 2, 8)
    with pytest.raises(ValueError, match="one flag per sequence"):
        ops.attention(qv, qv, qv, cu_seqlens=torch.tensor([0, 4, 10], dtype=torch.int32), causal=torch.tensor([True]))


@pytest.mark.parametrize("bounds", [[0, 3, 6], [1, 3, 8], [0, 3, 10], [0, 5, 3, 8]])
def test_bad_cu_seqlens_rejected(bounds):
    q = torch.randn(8, 2, 16)
    with pytest.raises(ValueError, match="cu_seqlens must rise from 0 to T=8"):
        ops.attention(q, q, q, cu_seqlens=torch.tensor(bounds, dtype=torch.int32))


def test_mixed_or_integer_dtypes_rejected():
    q = torch.randn(1, 2, 5, 8)
    with pytest.raises(ValueError, match="one floating dtype"):
        ops.attention(q, q.double(), q)
    qi = torch.ones(1, 2, 5, 8, dtype=torch.int32)
    with pytest.raises(ValueError, match="one floating dtype"):
        ops.attention(qi, qi, qi)
