"""Resize boxes of the eval/train transforms stay inside the image for every size.

The old eval box, ``cw = s / (s / short)``, came out 1e-14 px off for some shorter sides
(PIL: "box offset can't be negative"): 98, 103, 107, 196, 249, ... at 64 px.
"""
import random

import numpy as np
import pytest
import torch
from PIL import Image

import msclip_fast as mf
from msclip_fast.data.loader import LoaderConfig, _SampleDecoder
from msclip_fast.data.transforms import (TransformConfig, center_crop_box, eval_transform,
                                         random_resized_crop_params, train_transform)
from msclip_fast.models import get_model_config

SHORT_SIDES = range(1, 2049)
RATIOS = [(1, 1), (249, 429), (16, 9), (9, 16)]  # (w, h) shape


def _preset_sizes():
    return sorted({get_model_config(n).vision.image_size for n in mf.list_models()})


def _dims(short, ratio):
    a, b = ratio
    if a <= b:
        return short, max(short, round(short * b / a))
    return max(short, round(short * a / b)), short


def _old_box(w, h, s):
    scale = s / min(w, h)
    cw = ch = s / scale
    left, top = (w - cw) / 2, (h - ch) / 2
    return left, top, left + cw, top + ch


def _inside(box, w, h):
    l, t, r, b = box
    return 0 <= l < r <= w and 0 <= t < b <= h


def _old_failures():
    """(s, w, h) for which the old formula's box leaves the image."""
    return [(s, *_dims(m, r)) for s in _preset_sizes() for r in RATIOS for m in SHORT_SIDES
            if not _inside(_old_box(*_dims(m, r), s), *_dims(m, r))]


def test_preset_sizes_known():
    assert 64 in _preset_sizes() and 224 in _preset_sizes()


def test_center_crop_box_inside_and_equal_to_old_formula():
    fails = 0
    for s in _preset_sizes():
        for r in RATIOS:
            for m in SHORT_SIDES:
                w, h = _dims(m, r)
                box = center_crop_box(w, h)
                assert _inside(box, w, h), (s, w, h, box)
                assert box[2] - box[0] == box[3] - box[1] == m
                old = _old_box(w, h, s)
                assert max(abs(a - b) for a, b in zip(box, old)) < 1e-9, (s, w, h, box, old)
                fails += not _inside(old, w, h)
    assert fails > 0  # the old formula did fail: the real-resize test below covers these


def test_center_crop_box_rejects_empty():
    with pytest.raises(ValueError, match="at least 1x1"):
        center_crop_box(0, 5)


def test_real_resize_on_every_size_that_failed():
    fails = _old_failures()
    # failure depends only on (s, shorter side): run each once on the square image, plus every
    # aspect ratio for a few shorter sides and the reported raw 249x429 image
    by_short = {(s, min(w, h)): (s, w, h) for s, w, h in fails}
    cases = {(s, m, m) for s, m in by_short}
    assert (64, 98) in by_short and (64, 249) in by_short
    cases |= {(s, *_dims(m, r)) for s, m in list(by_short)[:: max(1, len(by_short) // 8)] for r in RATIOS}
    cases.add((64, 249, 429))
    for s, w, h in sorted(cases):
        x = eval_transform(Image.new("RGB", (w, h), (200, 100, 50)), TransformConfig(image_size=s))
        assert x.shape == (3, s, s) and x.dtype == torch.float32


@pytest.mark.parametrize("w,h", [(40, 30), (97, 211), (300, 300), (1000, 563)])
def test_results_unchanged_for_sizes_that_worked(w, h):
    im = Image.fromarray(np.random.default_rng(w * h).integers(0, 255, (h, w, 3), dtype=np.uint8))
    cfg = TransformConfig(image_size=64)
    assert _inside(_old_box(w, h, 64), w, h)
    old = im.resize((64, 64), Image.BICUBIC, box=_old_box(w, h, 64))
    new = im.resize((64, 64), Image.BICUBIC, box=center_crop_box(w, h))
    assert np.array_equal(np.asarray(old), np.asarray(new))
    assert eval_transform(im, cfg).shape == (3, 64, 64)


def test_train_crop_params_always_inside():
    """The train box is integral and clamped (checked for every size, fallback included)."""
    rng = random.Random(0)
    for r in RATIOS:
        for m in SHORT_SIDES:
            w, h = _dims(m, r)
            for scale, ratio in (((0.9, 1.0), (3 / 4, 4 / 3)), ((1.0, 1.0), (5.0, 6.0))):
                top, left, ch, cw = random_resized_crop_params(w, h, scale, ratio, rng)
                assert all(isinstance(v, int) for v in (top, left, ch, cw))
                assert 0 <= left and left + cw <= w and 0 <= top and top + ch <= h and cw > 0 and ch > 0
    x = train_transform(Image.new("RGB", (249, 429)), TransformConfig(image_size=64), random.Random(1))
    assert x.shape == (3, 64, 64)


def _png_bytes(im):
    from shard_files import encode_image

    return encode_image(im, "PNG")


def test_sample_decoder_names_sample_and_shard(monkeypatch):
    import msclip_fast.data.loader as loader_mod

    def boom(im, cfg):
        raise ValueError("box offset can't be negative")

    monkeypatch.setattr(loader_mod, "eval_transform", boom)
    dec = _SampleDecoder(LoaderConfig(batch_size=1, train=False, image_size=64))
    sample = {"__key__": "img_0042", "__url__": "/data/val/000003.tar",
              "png": _png_bytes(Image.new("RGB", (249, 429))), "txt": b"a cat"}
    with pytest.raises(RuntimeError) as e:
        dec(sample, 0)
    msg = str(e.value)
    assert "img_0042" in msg and "/data/val/000003.tar" in msg and "249x429" in msg
    assert "box offset can't be negative" in msg
    assert isinstance(e.value.__cause__, ValueError)


def test_sample_decoder_keeps_skip_sample(monkeypatch):
    from msclip_fast.data.images import SkipSample

    dec = _SampleDecoder(LoaderConfig(batch_size=1, train=True, image_size=64))
    with pytest.raises(SkipSample):
        dec({"__key__": "k", "png": b"", "txt": b"x"}, 0)
    x, cap, key, meta = dec({"__key__": "k", "png": _png_bytes(Image.new("RGB", (98, 98))), "txt": b"x"}, 0)
    assert x.shape == (3, 64, 64) and key == "k"
