"""The references on a packed batch with ragged text (DESIGN §3, §7).

- Varlen attention: runs of one causal flag are one batched call each; ragged runs are
  gathered, padded, into ``(n, H, Lmax, K)`` buckets (``_ragged_run``, ``_length_buckets``).
  Compared with an independent per-sequence float64 loop, forward and q/k/v gradients, at the
  DESIGN §7 shapes, with empty sequences, one sequence, all-causal / all-non-causal / mixed
  flags, non-contiguous inputs, and bf16/fp16 within tolerance; and the number of ``_dense``
  calls does not grow with the number of sequences.
- Modality LayerNorm: CPU ids in contiguous runs apply each modality's ``(D,)`` gain/bias by
  broadcasting (no ``weight[ids]`` gather); compared with the gather formula, forward (bit for
  bit) and the gradients of x, weight, bias and residual.
"""
import importlib
import math

import pytest
import torch
import torch.nn.functional as F

from msclip_fast import ops
from msclip_fast.ops.attention import _length_buckets, varlen_runs

att = importlib.import_module("msclip_fast.ops.attention")  # ops.attention is the function
lnm = importlib.import_module("msclip_fast.ops.layer_norm")


def rel(a, ref):
    a, ref = a.detach().double(), ref.detach().double()
    return ((a - ref).norm() / ref.norm()).item() if ref.norm() > 0 else (a - ref).norm().item()


# ----------------------------------------------------------------------------- attention


def cu_of(lens):
    return torch.tensor([0] + torch.tensor(lens, dtype=torch.long).cumsum(0).tolist(), dtype=torch.int32)


def per_sequence(q, k, v, lens, flags, scale=None):
    """Independent oracle: a float64 softmax attention per sequence in a Python loop."""
    scale = 1 / math.sqrt(q.shape[-1]) if scale is None else scale
    outs, a = [], 0
    for L, c in zip(lens, flags):
        qi, ki, vi = (t[a:a + L].transpose(0, 1).double() for t in (q, k, v))
        s = qi @ ki.transpose(-1, -2) * scale
        if c:
            s = s.masked_fill(torch.ones(L, L, dtype=torch.bool).triu(1), -math.inf)
        outs.append((s.softmax(-1) @ vi).transpose(0, 1))
        a += L
    return torch.cat(outs)


def inputs(lens, H, K, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    T = sum(lens)
    q, k, v = (torch.randn(T, H, K, generator=g, dtype=torch.float64).to(dtype).requires_grad_() for _ in range(3))
    go = torch.randn(T, H, K, generator=g, dtype=torch.float64).to(dtype)
    return q, k, v, go


MIXED = [1, 7, 50, 77, 197, 257, 7, 1, 50]
CASES = {
    # a packed batch: images (fixed length, non-causal) then ragged causal texts
    "packed": ([50] * 3 + [5, 17, 40, 1, 77, 12], [False] * 3 + [True] * 6),
    "mixed_flags": (MIXED, [False, True, True, False, False, True, True, False, True]),
    "all_causal": (MIXED, [True] * len(MIXED)),
    "all_noncausal": (MIXED, [False] * len(MIXED)),
    "empty_sequences": ([0, 7, 0, 0, 50, 1, 0, 77, 0], [True, True, False, True, True, False, False, False, True]),
    "single": ([77], [True]),
    "single_row": ([1], [False]),
    "one_long_many_short": ([257] + [1] * 20 + [2, 3], [False] * 23),
    "alternating": ([7, 50, 1, 77, 13, 40], [False, True, False, True, False, True]),
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("K", [32, 64, 128])
def test_ragged_reference_equals_per_sequence_fp64(case, K):
    lens, flags = CASES[case]
    q, k, v, go = inputs(lens, 2, K, seed=K + len(case))
    out = ops.attention(q, k, v, cu_seqlens=cu_of(lens), causal=torch.tensor(flags), backend="reference")
    ref = per_sequence(q, k, v, lens, flags)
    assert out.dtype == torch.float64 and out.shape == q.shape
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-12)
    got = torch.autograd.grad(out, (q, k, v), go)
    want = torch.autograd.grad(ref, (q, k, v), go)
    for name, a, b in zip("qkv", got, want):
        assert torch.isfinite(a).all(), name  # padded rows must not leak NaN/inf into a gradient
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12, msg=f"d{name}")


def test_scale_and_bool_causal_and_noncontiguous():
    """A custom scale, one bool flag for all sequences, and q/k/v that are strided views of
    one packed qkv tensor (as the attention module makes them)."""
    lens = [5, 17, 40, 1, 33]
    T, H, K = sum(lens), 3, 32
    qkv = torch.randn(T, 3, H, K, dtype=torch.float64, requires_grad=True)
    q, k, v = qkv.unbind(1)
    assert not q.is_contiguous()
    for causal in (True, False):
        out = ops.attention(q, k, v, cu_seqlens=cu_of(lens), causal=causal, scale=0.3, backend="reference")
        ref = per_sequence(q, k, v, lens, [causal] * len(lens), scale=0.3)
        torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-12)
        go = torch.randn_like(out)
        torch.testing.assert_close(torch.autograd.grad(out, qkv, go)[0], torch.autograd.grad(ref, qkv, go)[0],
                                   rtol=1e-10, atol=1e-12)


def test_zero_dim_flag_tensor_for_one_sequence():
    q = torch.randn(9, 2, 8, dtype=torch.float64)
    out = ops.attention(q, q, q, cu_seqlens=cu_of([9]), causal=torch.tensor(True), backend="reference")
    torch.testing.assert_close(out, per_sequence(q, q, q, [9], [True]), rtol=1e-10, atol=1e-12)


def test_all_sequences_empty():
    q = torch.randn(0, 2, 8, requires_grad=True)
    out = ops.attention(q, q, q, cu_seqlens=torch.zeros(3, dtype=torch.int32), causal=True, backend="reference")
    assert out.shape == (0, 2, 8)
    (dq,) = torch.autograd.grad(out, q, torch.randn(0, 2, 8))
    assert dq.shape == (0, 2, 8)


# DESIGN §7: bf16 <= 1.6e-2, fp16 <= 2e-3, and at most 2x the error plain PyTorch makes in
# the same dtype (here torch SDPA per sequence); a small floor for the ratio where both are tiny
LOW = [(torch.bfloat16, 1.6e-2), (torch.float16, 2e-3), (torch.float32, 1e-4)]


@pytest.mark.parametrize("dtype,tol", LOW, ids=["bf16", "fp16", "fp32"])
@pytest.mark.parametrize("case", ["packed", "mixed_flags", "all_noncausal"])
def test_ragged_reference_low_precision(dtype, tol, case):
    lens, flags = CASES[case]
    q, k, v, go = inputs(lens, 2, 64, dtype=dtype, seed=3)
    out = ops.attention(q, k, v, cu_seqlens=cu_of(lens), causal=torch.tensor(flags), backend="reference")
    assert out.dtype == dtype
    got = torch.autograd.grad(out, (q, k, v), go)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref = per_sequence(q64, k64, v64, lens, flags)
    want = torch.autograd.grad(ref, (q64, k64, v64), go.double())
    # plain PyTorch in the same dtype: SDPA one sequence at a time
    qp, kp, vp = (t.detach().clone().requires_grad_() for t in (q, k, v))
    peer, a = [], 0
    for L, c in zip(lens, flags):
        qi, ki, vi = (t[a:a + L].transpose(0, 1)[None] for t in (qp, kp, vp))
        peer.append(F.scaled_dot_product_attention(qi, ki, vi, is_causal=c)[0].transpose(0, 1))
        a += L
    peer = torch.cat(peer)
    peer_g = torch.autograd.grad(peer, (qp, kp, vp), go)
    for name, a, b, p in zip(("o", "dq", "dk", "dv"), (out, *got), (ref, *want), (peer, *peer_g)):
        err = rel(a, b)
        assert err <= tol, (name, err)
        assert err <= max(2 * rel(p, b), tol / 4), (name, err, rel(p, b))


def _count_dense(monkeypatch):
    calls = []
    real = att._dense

    def spy(q, k, v, causal, scale, key_padding=None):
        calls.append((tuple(q.shape), causal))
        return real(q, k, v, causal, scale, key_padding)

    monkeypatch.setattr(att, "_dense", spy)
    return calls


def _packed(n_img, l_img, text_lens, H=4, K=32):
    lens = [l_img] * n_img + text_lens
    q = torch.randn(sum(lens), H, K)
    return q, cu_of(lens), torch.tensor([False] * n_img + [True] * len(text_lens))


def test_no_per_sequence_loop_one_call_per_run(monkeypatch):
    """64 ragged causal texts (lengths within 2x of each other) + 8 images: two calls, one per
    run; the text run is padded to its longest text."""
    calls = _count_dense(monkeypatch)
    text = torch.randint(21, 41, (64,), generator=torch.Generator().manual_seed(0)).tolist()
    q, cu, flags = _packed(8, 50, text)
    ops.attention(q, q, q, cu_seqlens=cu, causal=flags, backend="reference")
    assert calls == [((8, 4, 50, 32), False), ((64, 4, max(text), 32), True)]


@pytest.mark.parametrize("n_text", [64, 640])
def test_calls_do_not_grow_with_the_number_of_sequences(monkeypatch, n_text):
    """Captions of 5..40 tokens: the text run is split into a few length buckets (at most
    log2(40/5) + 1 = 4), however many texts there are."""
    calls = _count_dense(monkeypatch)
    text = torch.randint(5, 41, (n_text,), generator=torch.Generator().manual_seed(n_text)).tolist()
    q, cu, flags = _packed(8, 50, text)
    ops.attention(q, q, q, cu_seqlens=cu, causal=flags, backend="reference")
    assert calls[0] == ((8, 4, 50, 32), False)
    assert 2 <= len(calls) <= 1 + 4 and all(c[1] for c in calls[1:])
    assert sum(c[0][0] for c in calls[1:]) == n_text  # every text in exactly one bucket


def test_varlen_runs_drop_empty_sequences_and_split_on_flags():
    assert varlen_runs([0, 3, 6, 6, 10, 12], [False, False, True, True, False]) == [
        (0, [3, 3], False), (6, [4], True), (10, [2], False)]
    # an empty sequence between two of one flag does not split their run, whatever its flag
    assert varlen_runs([0, 2, 2, 5], [True, False, True]) == [(0, [2, 3], True)]
    assert varlen_runs([0, 0, 0], [True, False]) == []


def test_length_buckets_cover_every_sequence_once():
    g = torch.Generator().manual_seed(0)
    for lens in ([1] * 5 + [257], [5, 40, 17, 20, 21, 10, 11], torch.randint(1, 300, (200,), generator=g).tolist()):
        for width in (1, 128, 768, 1 << 20):
            buckets = _length_buckets(lens, width)
            assert sorted(i for b in buckets for i in b) == list(range(len(lens)))
            assert all(b == sorted(b) for b in buckets)
            assert len(buckets) <= math.floor(math.log2(max(lens) / min(lens))) + 1
    # lengths within 2x share one bucket; a cheap short bucket merges into the long one
    assert _length_buckets([21, 40, 30], 768) == [[0, 1, 2]]
    assert _length_buckets([257] * 64 + [1] * 64, 768) == [list(range(64)), list(range(64, 128))]
    assert _length_buckets([40] * 64 + [15], 128) == [list(range(65))]
    assert _length_buckets([40] * 64 + [15], 768) == [list(range(64)), [64]]


# ----------------------------------------------------------------------------- layer norm


def gather_ln(x, weight, bias, ids, eps=1e-12, residual=None):
    """The former reference: ``weight[ids]`` / ``bias[ids]`` gathers."""
    if residual is not None:
        x = x + residual
    acc = torch.promote_types(x.dtype, torch.float32)
    xf = x.to(acc)
    mean = xf.mean(-1, keepdim=True)
    var = (xf - mean).pow(2).mean(-1, keepdim=True)
    y = (xf - mean) * torch.rsqrt(var + eps)
    i = ids.long() if isinstance(ids, torch.Tensor) else ids
    out = (y * weight[i].to(acc) + bias[i].to(acc)).to(x.dtype)
    return (out, x) if residual is not None else out


def _segments(counts, M=2):
    return torch.cat([torch.full((n,), m % M, dtype=torch.int8) for m, n in enumerate(counts)])


def _has_index_backward(t):
    seen, todo = set(), [t.grad_fn]
    while todo:
        fn = todo.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        if "Index" in type(fn).__name__:
            return True
        todo.extend(f for f, _ in fn.next_functions)
    return False


LN_CASES = {
    "packed_768": ((32 * 50, 32 * 17), 768),
    "packed_odd": ((50, 77), 37),
    "one_row_each": ((1, 1), 8),
    "single_run": ((257,), 100),
    "single_row": ((1,), 768),
    "three_runs": ((7, 50, 197), 37),
    "empty_run": ((0, 13), 64),  # all text
}


@pytest.mark.parametrize("case", list(LN_CASES))
@pytest.mark.parametrize("residual", [False, True])
def test_segmented_layer_norm_equals_gather_fp64(case, residual):
    counts, D = LN_CASES[case]
    T = sum(counts)
    g = torch.Generator().manual_seed(T + D)
    mk = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64, requires_grad=True)  # noqa: E731
    x, w, b = mk(T, D), mk(3, D), mk(3, D)
    r = mk(T, D) if residual else None
    ids = _segments(counts, M=3)
    out = ops.modality_layer_norm(x, w, b, ids, residual=r, backend="reference")
    ref = gather_ln(x, w, b, ids, residual=r)
    o, s = (out, None) if not residual else out
    ro, rs = (ref, None) if not residual else ref
    assert torch.equal(o, ro)  # one formula per element: bit for bit
    assert not _has_index_backward(o)  # no weight[ids] gather in the graph
    go = torch.randn(o.shape, generator=g, dtype=torch.float64)
    leaves = (x, w, b) + ((r,) if residual else ())
    loss = (o * go).sum() + (s.sum() if residual else 0)
    loss_ref = (ro * go).sum() + (rs.sum() if residual else 0)
    for name, a, c in zip(("x", "weight", "bias", "residual"), torch.autograd.grad(loss, leaves),
                          torch.autograd.grad(loss_ref, leaves)):
        torch.testing.assert_close(a, c, rtol=1e-10, atol=1e-12, msg=f"d{name}")


def test_segment_detection_and_fallbacks():
    assert lnm._id_runs(_segments([3, 5]), 2, 768) == [(0, 0, 3), (1, 3, 5)]
    assert lnm._id_runs(torch.ones(2, 4, dtype=torch.int32), 2, 768) == [(1, 0, 8)]  # leading dims flattened
    alternating = torch.arange(1000) % 2
    assert lnm._id_runs(alternating, 2, 768) is None  # many runs: the gather is cheaper
    assert len(lnm._id_runs(torch.arange(1000) // 20 % 2, 2, 768)) == 50  # some: still broadcast
    # device ids are never read back (a host sync): the gather path, decided without values
    assert lnm._id_runs(torch.zeros(5, dtype=torch.int8, device="meta"), 2, 768) is None
    assert lnm._id_runs(torch.zeros(0, dtype=torch.int8), 2, 768) is None


@pytest.mark.parametrize("ids_kind", ["batched", "alternating", "int"])
def test_layer_norm_other_id_layouts_unchanged(ids_kind):
    """(B, L, D) inputs with (B, L) ids, many runs (gather fallback) and an int modality give
    the former reference's values."""
    g = torch.Generator().manual_seed(7)
    x = torch.randn(4, 9, 48, generator=g, dtype=torch.float64, requires_grad=True)
    w, b = (torch.randn(2, 48, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(2))
    ids = {"batched": torch.tensor([0, 0, 1, 1]).repeat_interleave(9).view(4, 9),
           "alternating": torch.arange(36).view(4, 9) % 2, "int": 1}[ids_kind]
    out = ops.modality_layer_norm(x, w, b, ids, backend="reference")
    ref = gather_ln(x, w, b, ids)
    assert torch.equal(out, ref)
    go = torch.randn(out.shape, generator=g, dtype=torch.float64)
    for a, c in zip(torch.autograd.grad(out, (x, w, b), go), torch.autograd.grad(ref, (x, w, b), go)):
        torch.testing.assert_close(a, c, rtol=1e-10, atol=1e-12)


TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


@pytest.mark.parametrize("x_dtype,r_dtype", [(torch.bfloat16, None), (torch.float16, None), (torch.float32, None),
                                             (torch.bfloat16, torch.float32), (torch.float16, torch.float32)],
                         ids=["bf16", "fp16", "fp32", "bf16+fp32res", "fp16+fp32res"])
def test_segmented_layer_norm_low_precision(x_dtype, r_dtype):
    """Statistics in fp32, outputs in x's (or the promoted) dtype, within DESIGN §7 of the float64
    reference; forward equal to the former gather formula in the same dtypes."""
    g = torch.Generator().manual_seed(11)
    T, D = 50 * 4 + 77 * 4, 768
    x64, w64, b64 = torch.randn(T, D, generator=g, dtype=torch.float64), *torch.randn(2, 2, D, generator=g,
                                                                                       dtype=torch.float64)
    r64 = torch.randn(T, D, generator=g, dtype=torch.float64) if r_dtype else None
    ids = _segments([200, 308])
    x = x64.to(x_dtype).requires_grad_()
    r = r64.to(r_dtype).requires_grad_() if r_dtype else None
    w, b = w64.to(torch.float32).requires_grad_(), b64.to(torch.float32).requires_grad_()  # fp32 params (autocast)
    out = ops.modality_layer_norm(x, w, b, ids, residual=r, backend="reference")
    ref_low = gather_ln(x, w, b, ids, residual=r)
    o, ro = (out[0], ref_low[0]) if r_dtype else (out, ref_low)
    assert o.dtype == torch.promote_types(x_dtype, r_dtype or x_dtype)
    assert torch.equal(o, ro)
    leaves = [t.detach().double().requires_grad_() for t in (x, w, b) + ((r,) if r_dtype else ())]
    ref = gather_ln(leaves[0], leaves[1], leaves[2], ids, residual=leaves[3] if r_dtype else None)
    ref_o = ref[0] if r_dtype else ref
    assert rel(o, ref_o) <= TOL[o.dtype]
    go = torch.randn(T, D, generator=g, dtype=torch.float64)
    got = torch.autograd.grad(o, (x, w, b) + ((r,) if r_dtype else ()), go.to(o.dtype))
    want = torch.autograd.grad(ref_o, leaves, go)
    low = x_dtype  # every gradient goes through x's precision (fp32 params, a 16-bit x)
    for name, a, c, leaf in zip(("x", "weight", "bias", "residual"), got, want, (x, w, b, r)):
        assert a.dtype == leaf.dtype, name
        assert rel(a, c) <= TOL[low], (name, rel(a, c))
