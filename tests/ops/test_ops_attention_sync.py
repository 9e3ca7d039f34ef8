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

CUDA (``-m gpu``): the same calls under ``torch.cuda.set_sync_debug_mode("error")``, at CLIP
sequence lengths (in bench/gpu_check.sh's dry run these "cuda" cases run on CPU tensors under
the detector, with the same shapes).
"""
import contextlib
import importlib.util
import os
import sys

import pytest
import torch
from torch.overrides import TorchFunctionMode

from _triton_optest import DEVICES
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


@contextlib.contextmanager
def no_host_sync(device):
    """CUDA: any synchronizing call in the block raises. CPU: the block's host reads are
    recorded and must all be the op's CPU-input validation."""
    if torch.device(device).type == "cuda":
        with _SyncErrors():
            yield
        return
    with HostReadDetector() as det:
        yield
    assert det.forbidden() == [], det.forbidden()


@contextlib.contextmanager
def expect_host_sync(device):
    """Positive control: the block must read the device back (CUDA: the sync mode raises)."""
    if torch.device(device).type == "cuda":
        with pytest.raises(RuntimeError, match="synchroniz"):
            with _SyncErrors():
                yield
        return
    with HostReadDetector() as det:
        yield
    assert det.forbidden(), "the detector saw no host read"


def _varlen_inputs(device, dtype, lens, flags, seed=0):
    g = torch.Generator().manual_seed(seed)
    bounds = [0]
    for n in lens:
        bounds.append(bounds[-1] + n)
    cu = torch.tensor(bounds, dtype=torch.int32, device=device)
    flags = torch.tensor(flags, device=device)
    T = bounds[-1]
    q, k, v = (torch.randn(T, 2, 32, generator=g).to(device=device, dtype=dtype).requires_grad_() for _ in range(3))
    go = torch.randn(T, 2, 32, generator=g).to(device=device, dtype=dtype)
    return q, k, v, cu, flags, go


# (device, sequence lengths): small on the interpreter; CLIP lengths on the GPU (two 50-token
# images, three 77-token texts, and ragged text lengths)
CPU, GPU = DEVICES
LENGTHS = [
    pytest.param(CPU.values[0], (5, 5, 9, 3, 7), marks=CPU.marks, id="cpu"),
    pytest.param(GPU.values[0], (50, 50, 77, 77, 12), marks=GPU.marks, id="cuda"),
]


@pytest.mark.parametrize("device,lens", LENGTHS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("causal", ["flags", True])
def test_triton_varlen_with_max_seqlen_reads_nothing_back(device, lens, dtype, causal):
    flags = [False, False, True, True, True]
    q, k, v, cu, flag_t, go = _varlen_inputs(device, dtype, lens, flags)
    c = flag_t if causal == "flags" else True
    max_len = max(lens)

    def run(max_seqlen):
        o = ops.attention(q, k, v, cu_seqlens=cu, causal=c, max_seqlen=max_seqlen, backend="triton")
        return o, torch.autograd.grad(o, (q, k, v), go)

    if torch.device(device).type == "cuda":
        run(max_len)  # compiles (and may autotune, which synchronizes) before the check
    with no_host_sync(device):
        o, (dq, dk, dv) = run(max_len)
    # positive control: without max_seqlen the launcher reads it back (one read per call)
    with expect_host_sync(device):
        run(None)
    # and the result is right (DESIGN §7, matmul-based)
    ref_in = [t.detach().double().cpu().requires_grad_() for t in (q, k, v)]
    ref = ops.attention_ref(*ref_in, cu_seqlens=cu.cpu(), causal=c.cpu() if causal == "flags" else c)
    ref_g = torch.autograd.grad(ref, ref_in, go.double().cpu())
    tol = {torch.float32: 1e-4, torch.bfloat16: 1.6e-2}[dtype]
    for name, a, b in zip(("o", "dq", "dk", "dv"), (o, dq, dk, dv), (ref, *ref_g)):
        err = ((a.detach().double().cpu() - b).norm() / b.norm()).item()
        assert err <= tol, (name, err)


@needs_interpreter
def test_detector_catches_the_launcher_read_without_max_seqlen():
    q, k, v, cu, flags, go = _varlen_inputs("cpu", torch.float32, (5, 5, 9, 3, 7), [False, False, True, True, True])
    with HostReadDetector() as det:
        o = ops.attention(q, k, v, cu_seqlens=cu, causal=flags, backend="triton")
        torch.autograd.grad(o, (q, k, v), go)
    bad = det.forbidden()
    assert len(bad) == 1 and bad[0][0] == "__int__" and "attention_triton.py" in bad[0][1], det.calls


# (device, width, image_len, text_len)
BLOCKS = [
    pytest.param(CPU.values[0], 32, 5, 7, marks=CPU.marks, id="cpu"),
    pytest.param(GPU.values[0], 64, 50, 77, marks=GPU.marks, id="cuda"),
]


@pytest.mark.parametrize("device,width,image_len,text_len", BLOCKS)
@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16_autocast"])
def test_packed_block_on_triton_reads_nothing_back(device, width, image_len, text_len, autocast, monkeypatch):
    """A real shared block's packed forward+backward with every op on its Triton backend (under
    bf16 autocast too: fp32 residual stream, bf16 updates): the block passes
    ``PackedBatch.max_seqlen`` (a host int) down to the varlen attention, so nothing is read back."""
    monkeypatch.setenv("MSCLIP_FAST_BACKEND", "triton")
    dev = torch.device(device)
    torch.manual_seed(0)
    blk = TransformerBlock(width, 2, (0, 1), share=("attn", "mlp")).to(dev)
    pack = PackedBatch.build(2, image_len, 3, text_len, device=dev)
    assert pack.max_seqlen == max(image_len, text_len) and type(pack.max_seqlen) is int
    x = torch.randn(pack.total_rows, width, generator=torch.Generator().manual_seed(1)).to(dev).requires_grad_()

    def step():
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=autocast):
            xo, y = blk.forward_packed(x, pack)
        out = xo + y
        out.float().square().sum().backward()
        return out.detach()

    if dev.type == "cuda":
        step()  # compiles (and may autotune) every kernel before the check
    x.grad = None
    with no_host_sync(device):
        out = step()
    grad = x.grad.clone()
    # the same block on the reference backends
    monkeypatch.setenv("MSCLIP_FAST_BACKEND", "reference")
    x.grad = None
    out_ref = step()
    tol = 1.6e-2 if autocast else 1e-4
    for a, b in ((out, out_ref), (grad, x.grad)):
        assert ((a.double() - b.double()).norm() / b.double().norm()).item() <= tol
