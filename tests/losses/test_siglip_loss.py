"""SigLipLoss (one process): value and gradients equal open_clip's SigLipLoss; arguments,
output_dict, cache_labels and errors."""
import importlib.util
import math
import os
from functools import lru_cache

import pytest
import torch
import torch.nn.functional as F

import msclip_fast as mf
from msclip_fast import ops
from msclip_fast.losses import SigLipLoss


@lru_cache(maxsize=None)
def open_clip_loss_module():
    """open_clip's loss.py, loaded on its own: importing the open_clip package pulls in timm and
    the model zoo (~10 s here), and the loss module needs only torch."""
    spec = importlib.util.find_spec("open_clip")
    if spec is None:
        pytest.skip("open_clip is not installed")
    path = os.path.join(list(spec.submodule_search_locations)[0], "loss.py")
    try:
        loss_spec = importlib.util.spec_from_file_location("_open_clip_loss_standalone", path)
        module = importlib.util.module_from_spec(loss_spec)
        loss_spec.loader.exec_module(module)
    except Exception:  # a future loss.py with package-relative imports: take the slow way
        import open_clip.loss as module
    return module


def _feats(n, d, seed, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    img = F.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=-1)
    txt = F.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=-1)
    return img.to(dtype), txt.to(dtype)


def _loss_and_grads(loss_fn, img, txt, scale, bias):
    leaves = [t.detach().clone().requires_grad_() for t in (img, txt, scale, bias)]
    loss = loss_fn(*leaves)
    return (loss, *torch.autograd.grad(loss, leaves))


def _rel(a, b, floor=1e-300):
    """‖a−b‖/‖b‖; ``floor`` bounds the denominator below (a float32 loss of a saturated pair,
    ~1e-48, underflows to 0)."""
    a, b = a.detach().double(), b.detach().double()
    return ((a - b).norm() / b.norm().clamp_min(floor)).item()


SHAPES = [(1, 1), (1, 512), (2, 13), (7, 1), (7, 512), (37, 13), (130, 512), (300, 13)]
SCALE_BIAS = [(1.0, -10.0), (10.0, 0.0), (100.0, 10.0)]


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-4)], ids=str)
@pytest.mark.parametrize("scale_v,bias_v", SCALE_BIAS)
@pytest.mark.parametrize("n,d", SHAPES)
def test_matches_open_clip(n, d, scale_v, bias_v, dtype, tol):
    oc = open_clip_loss_module().SigLipLoss()
    img, txt = _feats(n, d, seed=n * 1000 + d, dtype=dtype)
    scale = torch.tensor(scale_v, dtype=dtype)
    bias = torch.tensor(bias_v, dtype=dtype)
    got = _loss_and_grads(SigLipLoss(), img, txt, scale, bias)
    # the oracle in float64 on the same (rounded) inputs
    ref = _loss_and_grads(oc, img.double(), txt.double(), scale.double(), bias.double())
    floor = 1e-300 if dtype == torch.float64 else 1e-30
    for name, a, b in zip(("loss", "d_image", "d_text", "d_logit_scale", "d_logit_bias"), got, ref):
        assert a.shape == b.shape, name
        assert _rel(a, b, floor) <= tol, f"{name}: {_rel(a, b, floor):.3g} > {tol}"
    assert got[0].dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    for a, like in zip(got[1:], (img, txt, scale, bias)):
        assert a.dtype == like.dtype


def test_argument_forms_match_open_clip():
    oc = open_clip_loss_module().SigLipLoss()
    img, txt = _feats(9, 16, seed=3)
    scale, bias = torch.tensor(7.5, dtype=torch.float64), torch.tensor(-4.0, dtype=torch.float64)
    want = oc(img, txt, scale, bias)
    ours = SigLipLoss()
    torch.testing.assert_close(ours(img, txt, scale, bias), want, rtol=1e-13, atol=0)
    out = ours(img, txt, scale, bias, output_dict=True)
    assert set(out) == {"contrastive_loss"}
    torch.testing.assert_close(out["contrastive_loss"], want, rtol=1e-13, atol=0)
    # DeepSpeed hands 0-d parameters over as (1,); numbers are accepted too
    torch.testing.assert_close(ours(img, txt, scale.reshape(1), bias.reshape(1)), want, rtol=1e-13, atol=0)
    torch.testing.assert_close(ours(img, txt, 7.5, -4.0), want, rtol=1e-13, atol=0)
    # None: no bias, as in open_clip
    torch.testing.assert_close(ours(img, txt, scale, None), oc(img, txt, scale, None), rtol=1e-13, atol=0)
    # non-contiguous features
    img_t, txt_t = img.t().contiguous().t(), txt[:, :].t().contiguous().t()
    assert not img_t.is_contiguous()
    torch.testing.assert_close(ours(img_t, txt_t, scale, bias), want, rtol=1e-13, atol=0)


def test_bf16_inputs_give_float32_loss():
    img, txt = _feats(11, 24, seed=4, dtype=torch.bfloat16)
    loss = SigLipLoss()(img, txt, torch.tensor(10.0), torch.tensor(-10.0))
    ref = open_clip_loss_module().SigLipLoss()(img.double(), txt.double(), torch.tensor(10.0).double(),
                                               torch.tensor(-10.0).double())
    assert loss.dtype == torch.float32
    assert _rel(loss, ref) <= 1.6e-2


def test_ground_truth_logits_and_cache_labels():
    oc = open_clip_loss_module().SigLipLoss()
    img, txt = _feats(6, 5, seed=5)
    scale, bias = torch.tensor(3.0, dtype=torch.float64), torch.tensor(-1.0, dtype=torch.float64)
    for cache in (False, True):
        ours = SigLipLoss(cache_labels=cache)
        for neg in (False, True):
            gt = ours.get_ground_truth(img.device, img.dtype, 6, negative_only=neg)
            torch.testing.assert_close(gt, oc.get_ground_truth(img.device, img.dtype, 6, negative_only=neg))
            again = ours.get_ground_truth(img.device, img.dtype, 6, negative_only=neg)
            assert (again is gt) == cache
        torch.testing.assert_close(ours.get_logits(img, txt, scale, bias), oc.get_logits(img, txt, scale, bias))
        torch.testing.assert_close(ours.get_logits(img, txt, scale), oc.get_logits(img, txt, scale))
        torch.testing.assert_close(ours(img, txt, scale, bias), oc(img, txt, scale, bias), rtol=1e-13, atol=0)


def test_dist_impl_names_and_export():
    assert mf.SigLipLoss is SigLipLoss
    assert SigLipLoss().dist_impl == "bidir"  # open_clip's default
    for impl in ("bidir", "shift", "gather", "reduce"):
        assert SigLipLoss(dist_impl=impl).dist_impl == impl
    # world_size 1: every dist_impl is the plain loss
    img, txt = _feats(5, 8, seed=6)
    s, b = torch.tensor(2.0, dtype=torch.float64), torch.tensor(0.5, dtype=torch.float64)
    want = SigLipLoss()(img, txt, s, b)
    for impl in ("shift", "gather", "reduce"):
        torch.testing.assert_close(SigLipLoss(dist_impl=impl)(img, txt, s, b), want, rtol=0, atol=0)


def test_every_term_goes_through_the_op(monkeypatch):
    calls = []
    real = ops.sigmoid_loss

    def spy(*args, **kwargs):
        calls.append(kwargs.get("negative_only", False))
        return real(*args, **kwargs)

    monkeypatch.setattr(ops, "sigmoid_loss", spy)
    img, txt = _feats(4, 8, seed=7)
    SigLipLoss()(img, txt, torch.tensor(1.0), torch.tensor(0.0))
    assert calls == [False]


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="world_size"):
        SigLipLoss(world_size=0)
    with pytest.raises(ValueError, match="rank"):
        SigLipLoss(rank=1, world_size=1)
    with pytest.raises(ValueError, match="rank"):
        SigLipLoss(rank=-1, world_size=2)
    with pytest.raises(ValueError, match="dist_impl"):
        SigLipLoss(dist_impl="ring")
    img, txt = _feats(4, 8, seed=8)
    s, b = torch.tensor(1.0), torch.tensor(0.0)
    loss = SigLipLoss()
    with pytest.raises(ValueError, match="text_features"):
        loss(img, txt[:3], s, b)
    with pytest.raises(ValueError, match="text_features"):
        loss(img, txt[:, :7], s, b)
    with pytest.raises(ValueError, match="image_features"):
        loss(img[0], txt, s, b)
    with pytest.raises(ValueError, match="logit_bias"):
        loss(img, txt, s)
    with pytest.raises(ValueError, match="logit_scale"):
        loss(img, txt, "10", b)
    with pytest.raises(ValueError, match="logit_scale"):
        loss(img, txt, torch.ones(2), b)
    with pytest.raises(ValueError, match="process group"):
        SigLipLoss(rank=0, world_size=2)(img, txt, s, b)


def test_matches_closed_form():
    """Independent of open_clip: the definition written out for one pair and one negative."""
    img = torch.tensor([[1.0], [-1.0]], dtype=torch.float64)
    txt = torch.tensor([[1.0], [1.0]], dtype=torch.float64)
    s, b = 2.0, -0.5
    # logits: [[1.5, 1.5], [-2.5, -2.5]]; positives on the diagonal
    want = -(math.log(1 / (1 + math.exp(-1.5))) + math.log(1 / (1 + math.exp(1.5)))
             + math.log(1 / (1 + math.exp(-2.5))) + math.log(1 / (1 + math.exp(2.5)))) / 2
    got = SigLipLoss()(img, txt, torch.tensor(s, dtype=torch.float64), torch.tensor(b, dtype=torch.float64))
    assert abs(got.item() - want) < 1e-14
