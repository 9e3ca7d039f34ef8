"""Varlen attention with a caller-given ``max_seqlen`` reads nothing back from the device
(issue 7): a real host-read detector, not a stubbed op.

CPU (Triton interpreter): a ``TorchFunctionMode`` sees every ``Tensor.item`` / ``tolist`` /
``__int__`` / ``__float__`` / ``__bool__`` / ``__index__`` / ``numpy`` / ``nonzero`` call made
while the op runs, forward and backward, with the Python stack that made it. On CUDA these are
exactly the calls that synchronize the host with the device. The only reads allowed are the
op's own value checks of CPU inputs (``check_cu_seqlens_host``, ``check_ids_host``: part of the
``validate`` step, skipped for CUDA tensors); the launcher path (AttentionFn forward and
backward, the kernels' launchers) must make none. Positive controls show the detector catches
the launcher's read when ``max_seqlen`` is not given.

CUDA (``-m gpu``): the same calls under ``torch.cuda.set_sync_debug_mode("error")``.
"""
import importlib.util
import os
import sys

import pytest
import torch
from torch.overrides import TorchFunctionMode

from msclip_fast import ops
from msclip_fast.modules import PackedBatch, TransformerBlock

_attention_mod = sys.modules["msclip_fast.ops.attention"]
_layer_norm_mod = sys.modules["msclip_fast.ops.layer_norm"]

HAS_TRITON = importlib.util.find_spec("triton") is not None
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
needs_interpreter = pytest.mark.skipif(
    not (HAS_TRITON and INTERPRET and importlib.util.find_spec("numpy") is not None),
    reason="needs triton + numpy with TRITON_INTERPRET=1",
)
needs_cuda = pytest.mark.skipif(not (HAS_TRITON and torch.cuda.is_available()), reason="needs triton and CUDA")

HOST_READS = frozenset({"item", "tolist", "__int__", "__float__", "__bool__", "__index__", "numpy", "nonzero"})
# the op's validation of CPU inputs: reads values on purpose, never runs for CUDA tensors
ALLOWED = frozenset({_attention_mod.check_cu_seqlens_host.__code__, _layer_norm_mod.check_ids_host.__code__})


class HostReadDetector(TorchFunctionMode):
    """Records tensor-to-host reads; ``calls`` holds (name, origin, allowed)."""

    def __init__(self):
        super().__init__()
        self.calls = []
        self.n_torch_calls = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.n_torch_calls += 1
        name = getattr(func, "__name__", "")
        if name in HOST_READS:
            frame, origin, allowed = sys._getframe(1), None, False
            while frame is not None:
                code = frame.f_code
                allowed = allowed or code in ALLOWED
                if origin is None and ("msclip_fast" in code.co_filename or "kernels" in code.co_filename):
                    origin = f"{os.path.basename(code.co_filename)}:{frame.f_lineno} {code.co_name}"
                frame = frame.f_back
            self.calls.append((name, origin, allowed))
        return func(*args, **(kwargs or {}))

    def forbidden(self):
        return [c for c in self.calls if not c[2]]


def test_detector_sees_every_kind_of_host_read():
    t = torch.tensor(3)
    with HostReadDetector() as det:
        int(t), float(t), bool(t), t.item(), t.tolist(), [0, 1, 2, 3][t], torch.tensor([0, 1]).nonzero()
    assert [c[0] for c in det.calls] == ["__int__", "__float__", "__bool__", "item", "tolist", "__index__",
                                         "nonzero"]


def _varlen_inputs(device, dtype=torch.float32, seed=0):
    # two images (bidirectional), three ragged texts (causal): lengths 5, 5, 9, 3, 7
    g = torch.Generator().manual_seed(seed)
    cu = torch.tensor([0, 5, 10, 19, 22, 29], dtype=torch.int32, device=device)
    flags = torch.tensor([False, False, True, True, True], device=device)
    q, k, v = (torch.randn(29, 2, 16, generator=g).to(device=device, dtype=dtype).requires_grad_() for _ in range(3))
    go = torch.randn(29, 2, 16, generator=g).to(device=device, dtype=dtype)
    return q, k, v, cu, flags, go


@needs_interpreter
@pytest.mark.parametrize("causal", ["flags", True])
def test_triton_varlen_with_max_seqlen_reads_nothing_back(causal):
    q, k, v, cu, flags, go = _varlen_inputs("cpu")
    c = flags if causal == "flags" else True
    with HostReadDetector() as det:
        o = ops.attention(q, k, v, cu_seqlens=cu, causal=c, max_seqlen=9, backend="triton")
    n_fwd = det.n_torch_calls
    with det:
        dq, dk, dv = torch.autograd.grad(o, (q, k, v), go)
    assert det.n_torch_calls > n_fwd  # the backward launchers ran under the detector too
    assert det.forbidden() == [], det.forbidden()
    assert any(c[2] for c in det.calls)  # the op's CPU validation did read cu_seqlens (allowed)
    # and the result is right
    ref_in = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ref = ops.attention_ref(*ref_in, cu_seqlens=cu, causal=c)
    ref_g = torch.autograd.grad(ref, ref_in, go.double())
    for a, b in zip((o, dq, dk, dv), (ref, *ref_g)):
        assert ((a.double() - b).norm() / b.norm()).item() <= 1e-4


@needs_interpreter
def test_detector_catches_the_launcher_read_without_max_seqlen():
    q, k, v, cu, flags, go = _varlen_inputs("cpu")
    with HostReadDetector() as det:
        o = ops.attention(q, k, v, cu_seqlens=cu, causal=flags, backend="triton")
        torch.autograd.grad(o, (q, k, v), go)
    bad = det.forbidden()
    assert len(bad) == 1 and bad[0][0] == "__int__" and "attention_triton.py" in bad[0][1], det.calls


@needs_interpreter
def test_packed_block_on_triton_reads_nothing_back(monkeypatch):
    """A real shared block's packed forward+backward with every op on its Triton backend: the
    block passes ``PackedBatch.max_seqlen`` (a host int) down to the varlen attention."""
    monkeypatch.setenv("MSCLIP_FAST_BACKEND", "triton")
    torch.manual_seed(0)
    blk = TransformerBlock(32, 2, (0, 1), share=("attn", "mlp"))
    pack = PackedBatch.build(2, 5, 3, 7)
    assert pack.max_seqlen == 7 and isinstance(pack.max_seqlen, int)
    x = torch.randn(pack.total_rows, 32, requires_grad=True)
    with HostReadDetector() as det:
        xo, y = blk.forward_packed(x, pack)
        (xo + y).square().sum().backward()
    assert det.forbidden() == [], det.forbidden()
    # the same block on the reference backends
    monkeypatch.setenv("MSCLIP_FAST_BACKEND", "reference")
    x2 = x.detach().clone().requires_grad_()
    xo2, y2 = blk.forward_packed(x2, pack)
    (xo2 + y2).square().sum().backward()
    torch.testing.assert_close(xo + y, xo2 + y2, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(x.grad, x2.grad, rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------------------------ CUDA


class _SyncErrors:
    """``torch.cuda.set_sync_debug_mode("error")`` inside the block, restored after it."""

    def __enter__(self):
        torch.cuda.synchronize()
        self.saved = torch.cuda.get_sync_debug_mode()
        torch.cuda.set_sync_debug_mode("error")
        return self

    def __exit__(self, *exc):
        torch.cuda.set_sync_debug_mode(self.saved)
        torch.cuda.synchronize()
        return False


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_cuda_varlen_with_max_seqlen_never_syncs(dtype):
    q, k, v, cu, flags, go = _varlen_inputs("cuda", dtype)
    for _ in range(2):  # the first call compiles (and may autotune, which synchronizes)
        o = ops.attention(q, k, v, cu_seqlens=cu, causal=flags, max_seqlen=9, backend="triton")
        torch.autograd.grad(o, (q, k, v), go)
    with _SyncErrors():
        o = ops.attention(q, k, v, cu_seqlens=cu, causal=flags, max_seqlen=9, backend="auto")
        torch.autograd.grad(o, (q, k, v), go)
    # positive control: without max_seqlen the launcher reads it back, which the mode refuses
    with pytest.raises(RuntimeError, match="synchroniz"):
        with _SyncErrors():
            ops.attention(q, k, v, cu_seqlens=cu, causal=flags, backend="triton")


@pytest.mark.gpu
@needs_cuda
def test_cuda_packed_block_never_syncs():
    torch.manual_seed(0)
    blk = TransformerBlock(64, 2, (0, 1), share=("attn", "mlp")).cuda()
    pack = PackedBatch.build(2, 50, 3, 77, device="cuda")
    x = torch.randn(pack.total_rows, 64, device="cuda", requires_grad=True)

    def step(autocast: bool):
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
            xo, y = blk.forward_packed(x, pack)
        (xo + y).float().square().sum().backward()

    for autocast in (False, True, False, True):  # compile (and autotune) every kernel first
        step(autocast)
    for autocast in (False, True):
        with _SyncErrors():
            step(autocast)
