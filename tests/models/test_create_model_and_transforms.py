"""create_model_and_transforms / get_preprocess / Preprocess: inference preprocessing equals
the eval loader's, transparency goes on white, and override-name errors say where a field lives."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

import msclip_fast as mf
from msclip_fast.data import Preprocess, build_loader
from shard_files import encode_image, write_tar as _write_tar


def _png(im):
    return encode_image(im, "PNG")


def _rgba_half_transparent(w=50, h=37):
    """Left half opaque red, right half fully transparent (black underneath)."""
    a = np.zeros((h, w, 4), dtype=np.uint8)
    a[:, : w // 2] = (255, 0, 0, 255)
    return Image.fromarray(a, "RGBA")


@pytest.fixture(scope="module")
def shard(tmp_path_factory):
    d = tmp_path_factory.mktemp("pre")
    rng = np.random.default_rng(0)
    images = {
        "rgb": Image.fromarray(rng.integers(0, 255, (429, 249, 3), dtype=np.uint8)),
        "rgba": _rgba_half_transparent(),
        "gray": Image.fromarray(rng.integers(0, 255, (70, 98), dtype=np.uint8), "L"),
    }
    files = {}
    for k, im in images.items():
        files[k] = d / f"{k}.png"
        im.save(files[k])
    _write_tar(d / "000000.tar", [{"__key__": k, "png": files[k].read_bytes(), "txt": f"caption {k}"}
                                   for k in images])
    return d, files


def test_preprocess_equals_eval_loader(shard):
    d, files = shard
    model = mf.create_model("msclip-s-tiny")
    pre = mf.get_preprocess(model)
    loader = build_loader(str(d / "000000.tar"), 1, train=False, image_size=model.image_size,
                          mean=model.image_mean, std=model.image_std)
    seen = 0
    for b in loader:
        k = b["key"][0]
        want = b["image"][0]
        for src in (files[k], str(files[k]), files[k].read_bytes(), Image.open(files[k])):
            x = pre(src)
            assert x.dtype == torch.float32 and x.shape == (3, model.image_size, model.image_size)
            assert torch.equal(x, want), k
        seen += 1
    assert seen == 3


def test_rgba_composited_on_white(shard):
    _, files = shard
    pre = Preprocess(16, mean=(0, 0, 0), std=(1, 1, 1))
    x = pre(files["rgba"])
    assert torch.allclose(x[:, 8, 1], torch.tensor([1.0, 0.0, 0.0]), atol=0.02)
    assert torch.allclose(x[:, 8, 14], torch.ones(3), atol=0.02)  # white, not convert("RGB")'s black


def test_preprocess_errors(tmp_path):
    pre = Preprocess(16)
    with pytest.raises(ValueError, match="does not exist"):
        pre(tmp_path / "missing.png")
    (tmp_path / "bad.png").write_bytes(b"not an image")
    with pytest.raises(ValueError, match="bad.png.*decode_error"):
        pre(tmp_path / "bad.png")
    with pytest.raises(ValueError, match="path, bytes or a PIL image"):
        pre(123)


def test_create_model_and_transforms_tiny():
    model, pre_train, pre_val = mf.create_model_and_transforms("msclip-s-tiny", packed=False)
    assert isinstance(model, mf.models.MSCLIP) and model.training and model.config.packed is False
    assert pre_train.train and not pre_val.train
    im = Image.fromarray(np.random.default_rng(1).integers(0, 255, (80, 120, 3), dtype=np.uint8))
    x = torch.stack([pre_val(im), pre_train(im)])
    assert x.shape == (2, 3, model.image_size, model.image_size)
    with torch.no_grad():
        f = model.eval().encode_image(x)
    assert f.shape == (2, model.embed_dim) and torch.isfinite(f).all()
    # seeded train preprocess is reproducible
    assert torch.equal(mf.get_preprocess(model, train=True, seed=3)(im), mf.get_preprocess(model, train=True, seed=3)(im))


def test_load_model_get_preprocess_keeps_state_dict(tmp_path):
    model = mf.create_model("msclip-s-tiny")
    torch.save(model.state_dict(), tmp_path / "model.pt")
    (tmp_path / "config.json").write_text(json.dumps(model.config.to_dict()))
    loaded = mf.load_model(tmp_path)
    keys = set(loaded.state_dict())
    pre = mf.get_preprocess(loaded)
    assert pre.image_size == loaded.image_size and pre.cfg.mean == loaded.image_mean
    assert set(loaded.state_dict()) == keys
    wrapped = torch.nn.Module()
    wrapped.module = loaded
    assert mf.get_preprocess(wrapped).image_size == loaded.image_size
    with pytest.raises(ValueError, match="image_size"):
        mf.get_preprocess(torch.nn.Linear(2, 2))


def test_override_error_names_nested_config():
    with pytest.raises(ValueError) as e:
        mf.create_model("msclip-s-tiny", width=64)
    msg = str(e.value)
    assert "width is a field of vision (and text): pass vision={'width': ...}" in msg
    assert "embed_dim" in msg and "share" in msg  # the valid top-level fields are listed
    with pytest.raises(ValueError, match=r"context_length is a field of text: pass text=\{'context_length'"):
        mf.create_model("msclip-s-tiny", context_length=32)
    with pytest.raises(ValueError, match="widht is not a config field"):
        mf.create_model("msclip-s-tiny", widht=64)
    m = mf.create_model("clip-tiny", vision={"width": 64, "heads": 2})  # the right way works
    assert m.config.vision.width == 64
