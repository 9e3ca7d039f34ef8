"""The varlen reference computes each run of consecutive sequences with one causal flag as one
batched call (so a packed image+text batch costs two calls, not B_img + B_txt): a run of equal
lengths as a zero-copy reshape, a ragged one padded (tests/ops/test_reference_ragged.py).
``varlen_groups`` (runs of equal length and flag) stays for callers that batch that way."""
import importlib
import math

import pytest
import torch

from msclip_fast import ops
from msclip_fast.ops.attention import varlen_groups

# the module (msclip_fast.ops.attention is also the name of the function exported by ops)
attention_mod = importlib.import_module("msclip_fast.ops.attention")


def _per_sequence(q, k, v, cu, flags):
    """Independent oracle: one float64 softmax attention per sequence."""
    outs = []
    for i, (a, b) in enumerate(zip(cu[:-1], cu[1:])):
        qi, ki, vi = (t[a:b].transpose(0, 1).double() for t in (q, k, v))
        s = qi @ ki.transpose(-1, -2) / math.sqrt(q.shape[-1])
        if flags[i]:
            L = b - a
            s = s.masked_fill(torch.ones(L, L, dtype=torch.bool).triu(1), -math.inf)
        outs.append((s.softmax(-1) @ vi).transpose(0, 1))
    return torch.cat(outs)


def test_varlen_groups_runs():
    assert varlen_groups([0, 3, 6, 9, 13, 17], [False] * 3 + [True] * 2) == [(0, 3, 3, False), (9, 2, 4, True)]
    # equal length but a different flag, or equal flag but a different length, starts a new run
    assert varlen_groups([0, 2, 4, 6, 9], [False, True, True, True]) == [
        (0, 1, 2, False), (2, 2, 2, True), (6, 1, 3, True)]
    assert varlen_groups([0, 5], [True]) == [(0, 1, 5, True)]


@pytest.mark.parametrize("lens,flags", [
    ([65] * 3 + [77] * 5, [False] * 3 + [True] * 5),          # a packed image+text batch
    ([7, 7, 7, 3, 3, 7, 1, 1], [False, False, True, True, True, True, False, False]),
    ([50], [False]),
])
def test_grouped_reference_equals_per_sequence_fwd_bwd(lens, flags):
    g = torch.Generator().manual_seed(len(lens))
    cu = [0] + torch.tensor(lens).cumsum(0).tolist()
    T, H, K = cu[-1], 2, 16
    q, k, v = (torch.randn(T, H, K, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(3))
    out = ops.attention(q, k, v, cu_seqlens=torch.tensor(cu, dtype=torch.int32), causal=torch.tensor(flags),
                        backend="reference")
    ref = _per_sequence(q, k, v, cu, flags)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-12)
    go = torch.randn(out.shape, generator=g, dtype=torch.float64)
    for a, b in zip(torch.autograd.grad(out, (q, k, v), go), torch.autograd.grad(ref, (q, k, v), go)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_packed_batch_is_two_dense_calls(monkeypatch):
    calls = []
    real = attention_mod._dense

    def spy(q, k, v, causal, scale, key_padding=None):
        calls.append((tuple(q.shape), causal, key_padding is not None))
        return real(q, k, v, causal, scale, key_padding)

    monkeypatch.setattr(attention_mod, "_dense", spy)
    cu = torch.tensor([0, 65, 130, 195, 272, 349], dtype=torch.int32)
    q = torch.randn(349, 4, 32)
    ops.attention(q, q, q, cu_seqlens=cu, causal=torch.tensor([False] * 3 + [True] * 2), backend="reference")
    # equal lengths in each run: zero-copy views, no padding mask
    assert calls == [((3, 4, 65, 32), False, False), ((2, 4, 77, 32), True, False)]
    calls.clear()
    # a bool flag for all: one ragged run, padded to 77 (causal: the mask hides the padding)
    ops.attention(q, q, q, cu_seqlens=cu, causal=True, backend="reference")
    assert calls == [((5, 4, 77, 32), True, False)]
    calls.clear()
    ops.attention(q, q, q, cu_seqlens=cu, causal=False, backend="reference")  # non-causal: a key mask
    assert calls == [((5, 4, 77, 32), False, True)]
