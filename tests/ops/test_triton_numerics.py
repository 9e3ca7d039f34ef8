"""The interpreter runs the GPU's numerics (DESIGN §8): every kernel's numerics-affecting settings
depend on the dtype only, every ``tl.dot`` goes through ``kernels/_numerics.dot``, and that
function's emulation (exact fp32 products of 16-bit operands, TF32 by truncation) agrees with
what the tensor cores compute (checked on the GPU by the ``cuda`` variant)."""
import re
from pathlib import Path

import pytest
import torch

from _triton_optest import DEVICES, HAS_TRITON
from msclip_fast.ops._triton import kernels

pytestmark = pytest.mark.skipif(not HAS_TRITON, reason="needs triton")
KERNELS_DIR = Path(__file__).resolve().parents[2] / "kernels"
CPU, CUDA = torch.device("cpu"), torch.device("cuda")
DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def test_every_dot_goes_through_the_shared_numerics():
    """A bare tl.dot in a kernel would run the interpreter's numerics, not the GPU's."""
    offenders = []
    for path in sorted(KERNELS_DIR.glob("*.py")):
        if path.name == "_numerics.py":
            continue
        for i, line in enumerate(path.read_text().splitlines(), 1):
            if re.search(r"\btl\.dot\s*\(", line):
                offenders.append(f"{path.name}:{i}: {line.strip()}")
    assert not offenders, "use _numerics.dot:\n" + "\n".join(offenders)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("bwd", [False, True], ids=["fwd", "bwd"])
def test_numerics_settings_do_not_depend_on_the_device(dtype, bwd):
    att, loss = kernels("attention"), kernels("contrastive")
    for head_dim in (32, 64, 128):
        for length in (None, 1, 50, 77, 197, 257):
            c, g = (att._config(head_dim, dtype, dev, bwd, max_seqlen=length) for dev in (CPU, CUDA))
            assert c.prec == g.prec == att.numerics(dtype)
            assert c.emulate and not g.emulate
    for d in (1, 7, 512):
        for n in (1, 4096):
            c, g = (loss._config(d, dtype, dev, bwd, n=n) for dev in (CPU, CUDA))
            assert c.prec == g.prec == loss.numerics(dtype)
            assert c.emulate and not g.emulate


def test_attention_tiles_fit_clip_sequences():
    """Query tiles for 50/77/197 tokens waste at most 22%/20%/23% of their rows (128-row tiles:
    61%/40%/23%)."""
    att = kernels("attention")
    for length, most in ((50, 0.22), (77, 0.20), (197, 0.231)):
        for bwd in (False, True):
            cfg = att._config(64, torch.bfloat16, CUDA, bwd, max_seqlen=length)
            assert att.padding_waste(length, cfg.block_m) <= most, (length, bwd, cfg)
    assert att.seq_block(77, (32, 64, 128)) == 32
    assert att.seq_block(50, (32, 64, 128)) == 64
    assert att.seq_block(1, (32, 64, 128)) == 32  # a 1-token sequence needs no 128-row tile


if HAS_TRITON:
    import triton
    import triton.language as tl

    dot = kernels("_numerics").dot  # a global of the kernel below, as in kernels/*.py

    @triton.jit
    def _dot_kernel(A, B, C, PREC: tl.constexpr, EMULATE: tl.constexpr, M: tl.constexpr, N: tl.constexpr,
                    K: tl.constexpr):
        rm, rn, rk = tl.arange(0, M), tl.arange(0, N), tl.arange(0, K)
        a = tl.load(A + rm[:, None] * K + rk[None, :])
        b = tl.load(B + rk[:, None] * N + rn[None, :])
        acc = dot(a, b, tl.zeros([M, N], dtype=tl.float32), PREC, EMULATE)
        tl.store(C + rm[:, None] * N + rn[None, :], acc)


def _tf32_trunc(x: torch.Tensor) -> torch.Tensor:
    return (x.float().view(torch.int32) & -8192).view(torch.float32)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype,prec", [(torch.float32, "ieee"), (torch.float32, "tf32"),
                                        (torch.float16, "ieee"), (torch.bfloat16, "ieee")], ids=str)
def test_dot_emulation_matches_the_tensor_cores(device, dtype, prec):
    """Interpreter: the emulation equals its definition exactly (up to fp32 summation order).
    GPU: the real dot agrees with the emulation, which validates the emulation itself (TF32 by
    truncation: a rounding GPU lands within the same bound)."""
    kernel = _dot_kernel
    g = torch.Generator().manual_seed(0)
    M = N = K = 32
    a = (torch.randn(M, K, generator=g, dtype=torch.float64) * 3).to(device=device, dtype=dtype)
    b = torch.randn(K, N, generator=g, dtype=torch.float64).to(device=device, dtype=dtype)
    c = torch.empty(M, N, dtype=torch.float32, device=device)
    emulate = not c.is_cuda
    kernel[(1,)](a, b, c, PREC=prec, EMULATE=emulate, M=M, N=N, K=K)
    if prec == "tf32":
        want = _tf32_trunc(a).double().cpu() @ _tf32_trunc(b).double().cpu()
    else:
        want = a.double().cpu() @ b.double().cpu()  # 16-bit products are exact in fp32
    err = ((c.double().cpu() - want).norm() / want.norm()).item()
    tol = 1e-6 if (emulate or prec == "ieee") else 2e-4  # tf32 truncation vs round-to-nearest
    assert err < tol, err
    if prec == "tf32":  # and TF32 really is less precise than IEEE here (the flag is honoured)
        exact = a.double().cpu() @ b.double().cpu()
        assert ((c.double().cpu() - exact).norm() / exact.norm()).item() > 1e-5


@pytest.mark.skipif(not HAS_TRITON, reason="needs triton")
def test_tf32_would_break_the_fp32_tolerance(monkeypatch):
    """Why fp32 dots stay IEEE (DESIGN §7: fp32 matmul-based ops within 1e-4): with TF32 operands
    (emulated as the GPU reads them) attention at 77 tokens is off by ~1e-3, 10x the bound."""
    import os

    if os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        pytest.skip("emulated TF32 needs the interpreter")
    from msclip_fast import ops

    att = kernels("attention")
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 77, 64, generator=g, dtype=torch.float64) for _ in range(3))
    ref = ops.attention_ref(q, k, v, causal=True)
    errs = {}
    for prec in ("ieee", "tf32"):
        monkeypatch.setattr(att, "numerics", lambda dtype, prec=prec: prec)
        out = ops.attention(q.float(), k.float(), v.float(), causal=True, backend="triton")
        errs[prec] = ((out.double() - ref).norm() / ref.norm()).item()
    assert errs["ieee"] < 1e-5 and errs["tf32"] > 1e-4, errs
