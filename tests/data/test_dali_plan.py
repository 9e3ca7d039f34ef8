"""The index plan (msclip_fast.data.plan) and the DALI backend against the torch backend.

Both backends read the shards through the same validated index: same keys and captions in
the same order for every rank and epoch, the same skips with the same reasons, eval pixels
within decoder rounding (PSNR >= 40 dB), no Pillow call inside a DALI epoch, and a resume
position reached without reading the batches before it.
"""
import math
import os
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from msclip_fast.data import build_loader
from msclip_fast.data.index import IndexMissingError, build_index
from shard_files import encode_image as _encode
from shard_files import write_tar as _write_tar



def _dali_ok():
    from msclip_fast.data.dali import dali_available

    return dali_available()[0]


needs_dali = pytest.mark.skipif(not _dali_ok(), reason="nvidia-dali not importable")


def _copy_indexed(src_dir, dst):
    """Copy a fixture's shards (never index the shared session fixtures in place)."""
    shutil.copytree(src_dir, dst)
    build_index(str(dst), workers=1, progress=False)
    return str(dst)


def _smooth(i, w, h):
    """A smooth picture (gradients + a disc): natural-image-like spectra for the PSNR test."""
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    r = np.hypot(x - w * (0.3 + 0.05 * (i % 5)), y - h * 0.5)
    a = np.stack([255 * x / max(w - 1, 1), 255 * y / max(h - 1, 1), 128 + 100 * np.cos(r / (4 + i % 3))], -1)
    return Image.fromarray(np.clip(a, 0, 255).astype(np.uint8))


@pytest.fixture(scope="module")
def indexed(tmp_path_factory, numbered_shards, messy_shard_dir):
    root = tmp_path_factory.mktemp("plan")
    numbered = _copy_indexed(os.path.dirname(numbered_shards), root / "numbered")
    messy = _copy_indexed(messy_shard_dir, root / "messy")
    # pictures of assorted sizes and modes for the pixel comparison (PNG: lossless source)
    sizes = [(48, 36), (36, 48), (64, 64), (50, 77), (97, 31), (16, 16), (33, 20)]
    samples = []
    for i, (w, h) in enumerate(sizes * 2):
        im = _smooth(i, w, h)
        data = _encode(im, "PNG" if i % 2 else "JPEG")
        samples.append({"__key__": f"p{i:02d}", ("png" if i % 2 else "jpg"): data, "txt": f"picture {i}"})
    rgba = Image.new("RGBA", (30, 20), (255, 0, 0, 0))
    rgba.paste((0, 0, 255, 255), (0, 0, 15, 20))
    samples.append({"__key__": "rgba", "png": _encode(rgba, "PNG"), "txt": "half transparent"})
    # bad ones the index leaves out, so DALI never sees them: truncated, oversized
    jpg = _encode(_smooth(1, 40, 40), "JPEG")
    samples.insert(3, {"__key__": "truncated", "jpg": jpg[: len(jpg) // 2], "txt": "cut in half"})
    samples.insert(9, {"__key__": "oversized", "jpg": _encode(_smooth(2, 80, 80), "JPEG"), "txt": "6400 pixels"})
    os.makedirs(root / "pics")
    _write_tar(str(root / "pics" / "000000.tar"), samples)
    build_index(str(root / "pics"), workers=1, progress=False, max_pixels=PICS_MAX_PIXELS)
    return {"numbered": os.path.join(numbered, "train"), "messy": messy, "pics": str(root / "pics")}


PICS_MAX_PIXELS = 5000  # the pictures are at most 64 x 64; "oversized" is 80 x 80


def _keys(loader):
    return [k for b in loader for k in b["key"]]


def _pairs(loader):
    out = []
    for b in loader:
        out += list(zip(b["key"], [tuple(t.tolist()) for t in b["text"]]))
    return out


def test_plan_train_equal_counts_and_eval_exactly_once(indexed):
    d = indexed["numbered"]  # 17 samples in 3 shards
    for train in (True, False):
        per_rank = [_keys(build_loader(d, 2, train=train, image_size=16, seed=3, rank=r, world_size=3,
                                       drop_last=False)) for r in range(3)]
        flat = [k for ks in per_rank for k in ks]
        assert len(flat) == len(set(flat))
        if train:
            assert [len(k) for k in per_rank] == [5, 5, 5]  # 17 cut to 15: equal steps on every rank
        else:
            assert sorted(flat) == [f"s{i:03d}" for i in range(17)]
            assert per_rank[0] == ["s000", "s003", "s006", "s009", "s012", "s015"]  # shard order
    kw = dict(train=True, image_size=16, seed=3, drop_last=False)
    a = _keys(build_loader(d, 4, epoch=0, **kw))
    b = _keys(build_loader(d, 4, epoch=1, **kw))
    assert sorted(a) == sorted(b) == [f"s{i:03d}" for i in range(17)] and a != b
    assert a == _keys(build_loader(d, 4, epoch=0, **kw))
    # workers own whole batches: the batch sequence does not depend on num_workers
    assert _keys(build_loader(d, 4, num_workers=2, **kw)) == a
    ld = build_loader(d, 4, train=True, image_size=16, world_size=2, rank=1)
    assert len(ld) == len(list(ld)) == 2  # exact from the index: 8 samples per rank


def test_resume_reads_nothing_before_the_start(indexed, monkeypatch):
    from msclip_fast.data import loader as loader_mod

    d = indexed["numbered"]
    full = [b["key"] for b in build_loader(d, 3, train=True, image_size=16, seed=5, epoch=2)]
    calls = []
    real = loader_mod._SampleDecoder.__call__
    monkeypatch.setattr(loader_mod._SampleDecoder, "__call__", lambda self, s, e: calls.append(s["__key__"]) or real(self, s, e))
    ld = build_loader(d, 3, train=True, image_size=16, seed=5)
    ld.set_epoch(2, start_batch=3)
    tail = [b["key"] for b in ld]
    assert tail == full[3:]
    assert len(calls) == sum(len(k) for k in tail)  # the first 3 batches were never decoded
    assert [b["key"] for b in ld] == full  # the position held for one iter()


def test_skips_come_from_the_index_like_the_stream(indexed, messy_shard_dir):
    stream = build_loader(messy_shard_dir, 4, train=False, image_size=16)
    skeys = _keys(stream)
    planned = build_loader(indexed["messy"], 4, train=False, image_size=16)
    assert planned.indices is not None and stream.indices is None
    assert sorted(_keys(planned)) == sorted(skeys)
    assert planned.skipped == stream.skipped == {"decode_error": 1, "empty_image": 1, "missing_caption": 1,
                                                 "empty_caption": 1}


@needs_dali
def test_dali_requires_an_index(messy_shard_dir):
    with pytest.raises(IndexMissingError, match=r"python -m msclip_fast\.data\.index"):
        build_loader(messy_shard_dir, 4, train=False, image_size=16, backend="dali")


@needs_dali
@pytest.mark.parametrize("train", [True, False])
def test_dali_same_keys_and_captions_as_torch(indexed, train):
    for d in (indexed["numbered"], indexed["messy"]):
        for rank in range(2):
            for epoch in (0, 1):
                kw = dict(train=train, image_size=16, seed=7, epoch=epoch, rank=rank, world_size=2, drop_last=False)
                t = build_loader(d, 3, **kw)
                a = build_loader(d, 3, backend="dali", **kw)
                pt, pa = _pairs(t), _pairs(a)
                assert pa == pt and pa
                assert a.skipped == t.skipped
    # resume position and len() agree too
    kw = dict(train=True, image_size=16, seed=7, world_size=2, rank=1)
    t, a = build_loader(indexed["numbered"], 2, **kw), build_loader(indexed["numbered"], 2, backend="dali", **kw)
    t.set_epoch(1, start_batch=2)
    a.set_epoch(1, start_batch=2)
    assert _keys(a) == _keys(t) and len(a) == len(t)


def _psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    mse = float(((a - b) * 255).double().pow(2).mean())
    return math.inf if mse == 0 else 10 * math.log10(255 ** 2 / mse)


@needs_dali
@pytest.mark.parametrize("train", [False, True])
def test_dali_pixels_match_torch(indexed, train):
    """Eval (central square) and train (random-resized-crop windows drawn from (seed, epoch,
    key)): DALI cuts the torch backend's very windows; only the resampling rounding differs."""
    kw = dict(train=train, image_size=24, mean=(0, 0, 0), std=(1, 1, 1), seed=11, epoch=3, drop_last=False,
              max_pixels=PICS_MAX_PIXELS)
    tl, al = build_loader(indexed["pics"], 4, **kw), build_loader(indexed["pics"], 4, backend="dali", **kw)
    t = {k: x for b in tl for k, x in zip(b["key"], b["image"])}
    a = {k: x for b in al for k, x in zip(b["key"], b["image"])}
    assert t.keys() == a.keys() and len(t) == 15
    assert al.skipped == tl.skipped == {"decode_error": 1, "oversized": 1}
    worst = min((_psnr(a[k], t[k]), k) for k in t)
    assert worst[0] >= 40.0, worst
    if not train:
        # the RGBA sample came through the fallback tar: composited on white, like torch's
        x = a["rgba"]
        assert torch.allclose(x[:, 12, 3], torch.tensor([0.0, 0.0, 1.0]), atol=0.02)
        assert torch.allclose(x[:, 12, 20], torch.ones(3), atol=0.02)


@needs_dali
def test_no_pillow_inside_a_dali_epoch(indexed, monkeypatch):
    import PIL.Image
    import PIL.ImageFile

    ld = build_loader(indexed["messy"], 2, train=True, image_size=16, backend="dali", drop_last=False)
    calls = []
    for mod, name in ((PIL.Image, "open"), (PIL.ImageFile.ImageFile, "load"), (PIL.Image.Image, "resize")):
        real = getattr(mod, name)
        monkeypatch.setattr(mod, name, lambda *a, _r=real, _n=name, **k: calls.append(_n) or _r(*a, **k))
    batches = list(ld)
    assert sum(len(b["key"]) for b in batches) == 10 and calls == []
