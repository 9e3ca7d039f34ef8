"""Triton fused sigmoid (SigLIP) loss (kernels/sigmoid_loss.py, backend "triton") against the
float64 reference (DESIGN §7): loss, d_image, d_text, d_scale, d_bias, on CPU tensors through
the Triton interpreter and on CUDA tensors with ``-m gpu``.

The cases are few and chosen to cover, between them, N in {1, 2, 7, 37, 130, 300}, D in
{1, 13, 512}, scales 1..100, biases -10..10, every dtype, negative_only with N_I != N_T both
ways, non-contiguous inputs and logits near ±1e3 (the interpreter costs seconds per case)."""
import pytest
import torch
import torch.nn.functional as F

from msclip_fast import ops
from msclip_fast.ops import sigmoid_triton
from _triton_optest import DEVICES, HAS_NUMPY, HAS_TRITON, INTERPRET, REQUIRE_GPU, TOL_MATMUL, rel_err

NAMES = ("loss", "d_image", "d_text", "d_scale", "d_bias")
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
interpreter = pytest.mark.skipif(not (HAS_TRITON and HAS_NUMPY and INTERPRET),
                                 reason="needs triton + numpy with TRITON_INTERPRET=1")


def registered() -> bool:
    return "triton" in ops.sigmoid_loss.op.backends


def triton_loss(image, text, scale, bias, negative_only=False):
    """Through the op (validation, selection) once the backend is registered there."""
    if registered():
        return ops.sigmoid_loss(image, text, scale, bias, negative_only, backend="triton")
    return sigmoid_triton.sigmoid_loss_triton(image, text, scale, bias, negative_only)


def features(n_img, n_txt, d, dtype, seed, device="cpu", norm=1.0):
    """L2-normalized rows times ``norm`` (drawn in float64, then cast); text row i is
    correlated with image row i, as trained pairs are."""
    g = torch.Generator().manual_seed(seed)
    img = F.normalize(torch.randn(n_img, d, generator=g, dtype=torch.float64), dim=-1)
    txt = torch.randn(n_txt, d, generator=g, dtype=torch.float64)
    k = min(n_img, n_txt)
    txt[:k] += 1.5 * img[:k] * d ** 0.5
    txt = F.normalize(txt, dim=-1)
    return (img * norm).to(device=device, dtype=dtype), (txt * norm).to(device=device, dtype=dtype)


def loss_and_grads(fn, img, txt, scale, bias, negative_only=False, upstream=1.0):
    leaves = [t.detach().clone().requires_grad_() for t in (img, txt, scale)]
    b = None if bias is None else bias.detach().clone().requires_grad_()
    loss = fn(*leaves, b, negative_only)
    grads = torch.autograd.grad(loss * upstream, leaves + ([b] if b is not None else []))
    return (loss, *grads)


def reference(img, txt, scale, bias, negative_only=False, upstream=1.0):
    """The oracle on the same (already rounded) inputs, in float64 on the CPU."""
    c = lambda t: None if t is None else t.detach().double().cpu()  # noqa: E731
    return loss_and_grads(ops.sigmoid_loss_ref, c(img), c(txt), c(scale), c(bias), negative_only, upstream)


def torch_native(img, txt, scale, bias, negative_only=False):
    """Plain PyTorch in the inputs' own dtype (the 'PyTorch error' baseline of DESIGN §7)."""
    logits = scale.to(img.dtype) * img @ txt.t() + bias.to(img.dtype)
    z = -torch.ones_like(logits)
    if not negative_only:
        z.diagonal().fill_(1)
    return (-F.logsigmoid(z * logits).sum() / img.shape[0]).float()


def check(out, ref, dtype, native=None, label=""):
    tol = TOL_MATMUL[dtype]
    assert out[0].dtype == torch.float32 and out[0].dim() == 0
    for i, (name, a, b) in enumerate(zip(NAMES, out, ref)):
        assert torch.isfinite(a).all(), f"{label} {name}"
        err = rel_err(a, b)
        assert err <= tol, f"{label} {name}: rel err {err:.3g} > {tol}"
        if native is not None:
            ne = rel_err(native[i], b)
            assert err <= 2 * ne + 1e-6, f"{label} {name}: {err:.3g} worse than 2x plain PyTorch ({ne:.3g})"


# (N_I, N_T, D, dtype, scale, bias, negative_only)
CASES = [
    (1, 1, 13, torch.float32, 10.0, -10.0, False),
    (2, 2, 1, torch.float32, 1.0, 0.0, False),
    (7, 7, 13, torch.float16, 100.0, 10.0, False),
    (7, 7, 512, torch.bfloat16, 10.0, -10.0, False),
    (37, 37, 1, torch.bfloat16, 100.0, 10.0, False),
    (37, 37, 512, torch.float32, 100.0, -10.0, False),
    (130, 130, 13, torch.bfloat16, 1.0, 5.0, False),
    (37, 37, 512, torch.float16, 30.0, -10.0, False),
    (300, 300, 13, torch.float32, 10.0, -3.0, False),
    (37, 130, 13, torch.float32, 10.0, -10.0, True),  # N_T > N_I: the loss pass swaps A and B
    (300, 2, 13, torch.float16, 100.0, 0.0, True),
    (1, 37, 512, torch.bfloat16, 1.0, -10.0, True),
]
# on the GPU every new (dtype, D, positives) is three compiles: these share theirs with the
# realistic-batch test (bf16/fp16 at D = 512 with positives) or add one fp32 negative_only set
GPU_CASES = [CASES[7], CASES[9], (130, 130, 512, torch.bfloat16, 10.0, -10.0, False)]


def _id(v):
    return str(v).replace("torch.", "")


@interpreter
@pytest.mark.parametrize("ni,nt,d,dtype,s,b,neg", CASES, ids=_id)
def test_matches_float64_reference(ni, nt, d, dtype, s, b, neg):
    img, txt = features(ni, nt, d, dtype, seed=ni * 1000 + nt + d)
    scale, bias = torch.tensor(s), torch.tensor(b)
    out = loss_and_grads(triton_loss, img, txt, scale, bias, neg)
    assert out[1].dtype == dtype and out[2].dtype == dtype and out[1].shape == img.shape
    assert out[2].shape == txt.shape and out[3].shape == () and out[4].shape == ()
    native = loss_and_grads(torch_native, img, txt, scale, bias, neg) if dtype != torch.float32 else None
    check(out, reference(img, txt, scale, bias, neg), dtype, native, f"N_I={ni} N_T={nt} D={d}")


@pytest.mark.gpu
@pytest.mark.parametrize("ni,nt,d,dtype,s,b,neg", GPU_CASES, ids=_id)
@pytest.mark.parametrize("device", DEVICES[1:])
def test_matches_float64_reference_gpu(device, ni, nt, d, dtype, s, b, neg):
    img, txt = features(ni, nt, d, dtype, seed=ni + nt + d, device=device)
    scale, bias = torch.tensor(s, device=device), torch.tensor(b, device=device)
    out = loss_and_grads(triton_loss, img, txt, scale, bias, neg)
    native = loss_and_grads(torch_native, img, txt, scale, bias, neg) if dtype != torch.float32 else None
    check(out, reference(img, txt, scale, bias, neg), dtype, native, f"N_I={ni} N_T={nt} D={d}")


@interpreter
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_large_logits_and_tiny_terms_stay_finite_and_exact(dtype):
    """|s·x + b| up to ~1e3 (features of norm sqrt(10), scale 100, bias ±10): every exponent
    is -|q| <= 0, so nothing overflows; and terms of e^-60 (bias -60, negatives only) keep their
    relative precision, where log(1 + e) in fp32 would round each to 0."""
    img, txt = features(37, 37, 13, dtype, seed=4, norm=10 ** 0.5)
    img[5] = txt[5]  # a positive at s·10 + b (q ~ -1e3)
    txt[9] = -img[9]  # and one at -s·10 + b (q ~ +1e3)
    scale = torch.tensor(100.0)
    for b in (10.0, -10.0):
        out = loss_and_grads(triton_loss, img, txt, scale, torch.tensor(b))
        check(out, reference(img, txt, scale, torch.tensor(b)), dtype, label=f"bias {b}")
    img, txt = features(7, 37, 13, dtype, seed=5)
    tiny = (img, txt, torch.tensor(1.0), torch.tensor(-60.0), True)
    out, ref = loss_and_grads(triton_loss, *tiny), reference(*tiny)
    assert 0 < ref[0].item() < 1e-20
    check(out, ref, dtype, label="e^-60 terms")


@interpreter
def test_no_bias_upstream_gradient_param_dtypes_and_determinism():
    img, txt = features(70, 70, 24, torch.float32, seed=3)
    for scale, bias in ((torch.tensor(20.0, dtype=torch.float64), torch.tensor([-4.0])),
                        (torch.tensor([20.0]), None)):
        a = loss_and_grads(triton_loss, img, txt, scale, bias, upstream=3.0)
        assert a[3].shape == scale.shape and a[3].dtype == scale.dtype
        if bias is not None:
            assert a[4].shape == bias.shape and a[4].dtype == bias.dtype
        else:
            assert len(a) == 4
        for name, x, y in zip(NAMES, a, reference(img, txt, scale, bias, upstream=3.0)):
            assert rel_err(x, y) < 1e-5, name
    again = loss_and_grads(triton_loss, img, txt, scale, bias, upstream=3.0)
    for x, y in zip(a, again):  # no atomics: bitwise reproducible
        assert torch.equal(x, y)


@pytest.mark.parametrize("device", DEVICES)
def test_non_contiguous_inputs(device):
    img, txt = features(33, 50, 24, torch.float32, seed=5, device=device)
    wide = torch.cat([img, torch.zeros_like(img)], 1)[:, :24]  # row stride 48
    txt_t = txt.t().contiguous().t()  # column-major
    assert not wide.is_contiguous() and not txt_t.is_contiguous()
    scale, bias = torch.tensor(10.0, device=device), torch.tensor(-5.0, device=device)
    a = loss_and_grads(triton_loss, wide, txt_t, scale, bias, True)
    b = reference(img, txt, scale, bias, True)
    for name, x, y in zip(NAMES, a, b):
        assert rel_err(x, y) < 1e-5, name


@pytest.mark.skipif(not HAS_TRITON, reason="needs triton")
def test_numerics_settings_do_not_depend_on_the_device():
    from msclip_fast.ops._triton import kernels

    k = kernels("sigmoid_loss")
    for dtype in DTYPES:
        for bwd in (False, True):
            for d in (1, 13, 512):
                for n in (1, 4096):
                    c, g = (k._config(d, dtype, torch.device(dev), bwd, n=n) for dev in ("cpu", "cuda"))
                    assert c.prec == g.prec == k.numerics(dtype)
                    assert c.g_scale == g.g_scale == k.g_scale(dtype)
                    assert c.emulate and not g.emulate
    # N_I·G in [-1, 1] times the fp16 power of two stays below fp16's max
    assert k.g_scale(torch.float16) <= torch.finfo(torch.float16).max


@interpreter
def test_backend_registration():
    if not registered():
        pytest.skip("the triton backend is not registered in ops.sigmoid_loss yet")
    img, txt = features(4, 4, 8, torch.float32, seed=1)
    s, b = torch.tensor(1.0), torch.tensor(0.0)
    op = ops.sigmoid_loss.op
    assert list(op.backends).index("triton") == list(op.backends).index("cuda") + 1
    assert op.select("triton", img, txt, s, b, False).name == "triton"  # runs by name
    assert op.select("auto", img, txt, s, b, False).name != "triton"  # never for CPU tensors
    with pytest.raises(ValueError, match="triton"):
        ops.sigmoid_loss(img.double(), txt.double(), s, b, backend="triton")


@pytest.mark.gpu
@pytest.mark.slow
@pytest.mark.skipif(not (HAS_TRITON and torch.cuda.is_available()) and not REQUIRE_GPU,
                    reason="CUDA only (N = 4096 is minutes in the interpreter)")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_realistic_batch(dtype):
    """N = 4096, D = 512, SigLIP's initial scale 10 and bias -10 (its GPU compiles are shared
    with test_matches_float64_reference_gpu). Simulated in float64 with these roundings, d_image
    errors are 2.3e-4 (fp16) and 1.7e-3 (bf16), about the rounding of the output itself;
    plain PyTorch makes 4.6e-3 and 2.4e-3."""
    img, txt = features(4096, 4096, 512, dtype, seed=11, device="cuda")
    scale, bias = torch.tensor(10.0, device="cuda"), torch.tensor(-10.0, device="cuda")
    out = loss_and_grads(triton_loss, img, txt, scale, bias)
    c = lambda t: t.detach().double()  # noqa: E731  (the float64 oracle on the GPU: 128 MiB of logits)
    ref = loss_and_grads(ops.sigmoid_loss_ref, c(img), c(txt), c(scale), c(bias))
    native = loss_and_grads(torch_native, img, txt, scale, bias)
    check(out, ref, dtype, native, "N=4096")
    errs = {name: rel_err(a, b) for name, a, b in zip(NAMES, out, ref)}
    bound = 4e-4 if dtype == torch.float16 else 3e-3
    assert errs["loss"] < 1e-5 and errs["d_scale"] < 1e-4 and errs["d_bias"] < 1e-4, errs
    assert errs["d_image"] < bound and errs["d_text"] < bound, errs
