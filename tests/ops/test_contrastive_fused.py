"""The fused CPU contrastive loss (msclip_fast._C) against the float64 reference (DESIGN §7)."""
import os
import subprocess
import sys
import time

import pytest
import torch
import torch.nn.functional as F

from _contrastive_data import features

from msclip_fast import ops
from msclip_fast.ops import contrastive_fused

ext, reason = contrastive_fused.load_extension()
pytestmark = pytest.mark.skipif(ext is None, reason=f"extension not built: {reason}")

TOL = {torch.float32: 1e-4, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def rel(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def loss_and_grads(fn, img, txt, scale, dtype=None):
    img = img.detach().clone().requires_grad_()
    txt = txt.detach().clone().requires_grad_()
    scale = scale.detach().clone().requires_grad_()
    loss = fn(img, txt, scale)
    grads = torch.autograd.grad(loss, (img, txt, scale))
    return (loss, *grads)


def torch_native(img, txt, scale):
    """Plain PyTorch in the inputs' own dtype (the 'PyTorch error' baseline of DESIGN §7)."""
    logits = scale.to(img.dtype) * img @ txt.t()
    labels = torch.arange(img.shape[0])
    return ((F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels)) / 2).float()


# (N, D, dtype, scale, duplicated pairs, tile): every N and D of issue 4, each dtype, scales 1..100,
# tiles smaller than N so tile borders cut through the diagonal.
CASES = [
    (1, 7, torch.float32, 1.0, False, 0),
    (2, 1, torch.float32, 100.0, False, 0),
    (3, 512, torch.float16, 14.3, False, 2),
    (7, 768, torch.bfloat16, 100.0, False, 3),
    (7, 1, torch.float16, 100.0, True, 0),
    (64, 7, torch.float32, 50.0, True, 16),
    (64, 768, torch.bfloat16, 1.0, False, 0),
    (1000, 512, torch.float32, 100.0, False, 384),
    (1000, 768, torch.float16, 100.0, True, 0),
    (1000, 7, torch.bfloat16, 30.0, False, 256),
    (4099, 1, torch.float32, 100.0, False, 0),
    # bf16 at D = 96, not 512: the 2x-PyTorch bound runs torch's own bf16 matmul, which has no
    # fast CPU kernel here (51 s at D = 512; bf16 at D = 768 is covered at N = 7 and 64)
    (4099, 96, torch.bfloat16, 100.0, False, 0),
]


@pytest.mark.parametrize("n,d,dtype,s,dup,tile", CASES, ids=lambda v: str(v).replace("torch.", ""))
def test_matches_float64_reference(n, d, dtype, s, dup, tile):
    img, txt = features(n, d, dtype, seed=n * 1000 + d, dup=dup)
    scale = torch.tensor(s)
    fused = loss_and_grads(lambda a, b, c: contrastive_fused.contrastive_loss_fused(a, b, c, tile),
                           img, txt, scale)
    # the oracle sees the same (already rounded) inputs in float64
    ref = loss_and_grads(ops.contrastive_loss_ref, img.double(), txt.double(), scale.double())
    assert fused[0].dtype == torch.float32 and fused[0].dim() == 0
    assert fused[1].dtype == dtype and fused[2].dtype == dtype and fused[3].dtype == scale.dtype
    tol = TOL[dtype]
    for name, a, b in zip(("loss", "d_img", "d_txt", "d_scale"), fused, ref):
        assert torch.isfinite(a).all(), name
        if n == 1 and name != "loss":  # a single pair has zero gradient
            assert a.abs().max() < 1e-6, name
            continue
        err = rel(a, b)
        assert err <= tol, f"{name}: rel err {err:.3g} > {tol}"
        if dtype != torch.float32 and name in ("loss", "d_scale"):
            native = loss_and_grads(torch_native, img, txt, scale)
            i = ("loss", "d_img", "d_txt", "d_scale").index(name)
            assert err <= 2 * rel(native[i], b) + 1e-6, f"{name}: worse than 2x plain PyTorch"


def test_upstream_gradient_and_scale_dtype():
    img, txt = features(50, 16, torch.float32, seed=3)
    for scale in (torch.tensor(20.0, dtype=torch.float64), torch.tensor([20.0])):
        a = loss_and_grads(lambda x, y, z: 3.0 * ops.contrastive_loss(x, y, z, backend="cpu"), img, txt, scale)
        b = loss_and_grads(lambda x, y, z: 3.0 * ops.contrastive_loss_ref(x, y, z), img.double(), txt.double(), scale.double())
        assert a[3].shape == scale.shape and a[3].dtype == scale.dtype
        for x, y in zip(a, b):
            assert rel(x, y) < 1e-4


def test_non_contiguous_inputs_handled_by_op_rejected_by_extension():
    img, txt = features(33, 24, torch.float32, seed=5)
    wide = torch.cat([img, torch.zeros_like(img)], 1)[:, :24]  # row stride 48
    txt_t = txt.t().contiguous().t()  # column-major
    assert not wide.is_contiguous() and not txt_t.is_contiguous()
    a = loss_and_grads(lambda x, y, z: ops.contrastive_loss(x, y, z, backend="cpu"), wide, txt_t, torch.tensor(10.0))
    b = loss_and_grads(ops.contrastive_loss_ref, img.double(), txt.double(), torch.tensor(10.0, dtype=torch.float64))
    for x, y in zip(a, b):
        assert rel(x, y) < 1e-5
    with pytest.raises(RuntimeError, match="img must be contiguous"):
        ext.contrastive_forward(wide, txt, torch.tensor(1.0), 0)
    with pytest.raises(RuntimeError, match="txt must be contiguous"):
        ext.contrastive_forward(img, txt_t, torch.tensor(1.0), 0)


def test_extension_input_checks_name_the_argument():
    x = torch.randn(4, 8)
    s = torch.tensor(1.0)
    cases = [
        ((x[0], x, s), "img must be 2-D"),
        ((x, x[:3], s), "same N"),
        ((x, torch.randn(4, 9), s), "share D"),
        ((x.double(), x.double(), s), "img dtype must be float32"),
        ((x, x.half(), s), "txt dtype"),
        ((x, x, torch.ones(2)), "scale must be a 1-element"),
        ((x[:0], x[:0], s), "N >= 1"),
    ]
    for args, msg in cases:
        with pytest.raises(RuntimeError, match=msg):
            ext.contrastive_forward(*args, 0)
    loss, lr, lc = ext.contrastive_forward(x, x, s, 0)
    with pytest.raises(RuntimeError, match="lse_row must have shape"):
        ext.contrastive_backward(x, x, s, lr[:3], lc, torch.tensor(1.0), 0)
    with pytest.raises(RuntimeError, match="lse_col must be float32"):
        ext.contrastive_backward(x, x, s, lr, lc.double(), torch.tensor(1.0), 0)


def test_auto_dispatch():
    x = torch.randn(5, 8)
    assert ops.contrastive_loss.op.select("auto", x, x, torch.tensor(1.0)).name == "cpu"
    assert ops.contrastive_loss.op.select("auto", x.double(), x.double(), torch.tensor(1.0)).name == "reference"
    with pytest.raises(ValueError, match="'cuda' cannot run"):
        ops.contrastive_loss(x, x, torch.tensor(1.0), backend="cuda")


def test_extreme_scale_no_overflow():
    # un-normalized features: logits up to ~1e4, far past fp32 exp's range without max-shifting
    img, txt = features(100, 7, torch.float32, seed=9)
    img, txt = img * 10, txt * 10
    a = loss_and_grads(lambda x, y, z: ops.contrastive_loss(x, y, z, backend="cpu"), img, txt, torch.tensor(100.0))
    b = loss_and_grads(ops.contrastive_loss_ref, img.double(), txt.double(), torch.tensor(100.0, dtype=torch.float64))
    # the saved fp32 LSE of a ~1e4 logit row is rounded to ulp(1e4)/2 ~ 5e-4, which scales every
    # exp(x - lse) of that row: ~1e-4 gradient error is the format's limit here (plain PyTorch
    # keeps exp(x - max) / sum and does better); normalized CLIP features (|logit| <= 100) sit
    # at ulp(100) ~ 8e-6 and within DESIGN §7's 1e-4 (test_matches_float64_reference)
    for name, x, y in zip(("loss", "d_img", "d_txt", "d_scale"), a, b):
        assert torch.isfinite(x).all() and rel(x, y) < 5e-4, name


_MEM_SCRIPT = r"""
import sys, torch
from msclip_fast import _C
n, d = int(sys.argv[1]), int(sys.argv[2])
def rss(key):
    for line in open('/proc/self/status'):
        if line.startswith(key):
            return int(line.split()[1]) * 1024
img = torch.nn.functional.normalize(torch.randn(n, d), dim=-1)
txt = torch.nn.functional.normalize(torch.randn(n, d), dim=-1)
s, g = torch.tensor(100.0), torch.tensor(1.0)
w = torch.randn(300, d)  # warm-up: BLAS buffers, OpenMP threads
_C.contrastive_backward(w, w, s, *_C.contrastive_forward(w, w, s, 0)[1:], g, 0)
base = rss('VmRSS:')
open('/proc/self/clear_refs', 'w').write('5')  # reset the peak (VmHWM) to the current RSS
loss, lr, lc = _C.contrastive_forward(img, txt, s, 0)
di, dt, ds = _C.contrastive_backward(img, txt, s, lr, lc, g, 0)
grads = di.nbytes + dt.nbytes
print((rss('VmHWM:') - base - grads) / 2**20, grads / 2**20, float(loss))
"""


def _extra_peak_mib(n, d):
    env = dict(os.environ, OMP_WAIT_POLICY="passive")
    out = subprocess.run([sys.executable, "-c", _MEM_SCRIPT, str(n), str(d)], capture_output=True,
                         text=True, timeout=600, env=env)
    assert out.returncode == 0, out.stderr
    extra, grads, loss = map(float, out.stdout.split())
    return extra


def test_memory_is_subquadratic_fast():
    # N = 16384: the logits alone would be 1 GiB; the fused op stays within 64 MiB of inputs+grads
    assert _extra_peak_mib(16384, 8) < 64


@pytest.mark.slow
def test_memory_n32768():
    # issue 4: fwd+bwd at N=32,768 fp32 within 64 MiB of the inputs and gradients (naive logits
    # + their gradient: 2 x 4 GiB). D = 128 keeps CI short (the extra memory is the tile buffer
    # and 4N LSE floats: it does not grow with D for fp32 inputs); bench_loss measures D = 512.
    assert _extra_peak_mib(32768, 128) < 64


@pytest.mark.slow
def test_speed_not_materially_slower_than_reference_n8192():
    # The fused op recomputes the logits in backward (4 matmul-equivalents against the
    # reference's 3), so where the reference's BLAS is not memory-bound the two tie: CI saw
    # 6.43 s vs 6.42 s. A strict <= turns that tie into noise; 15 % catches a real regression
    # (a lost OpenMP loop is 2x). The measured ratio lives in bench/RESULTS.md (bench_loss).
    img, txt = features(8192, 512, torch.float32, seed=1)
    scale = torch.tensor(100.0)

    def timed(fn):
        t = time.perf_counter()
        loss_and_grads(fn, img, txt, scale)
        return time.perf_counter() - t

    fused = lambda a, b, c: ops.contrastive_loss(a, b, c, backend="cpu")  # noqa: E731
    ref = ops.contrastive_loss_ref
    tf, tr = [], []
    for _ in range(2):  # interleaved, best of two: robust to a shared machine's noise
        tf.append(timed(fused))
        tr.append(timed(ref))
    assert min(tf) <= 1.15 * min(tr), f"fused {min(tf):.2f}s vs reference {min(tr):.2f}s"
