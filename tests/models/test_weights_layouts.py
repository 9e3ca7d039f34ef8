"""Weights in and out: OpenAI / open_clip and official MS-CLIP layouts (DESIGN §5).

CI time matters: one open_clip ViT-B-32 and one clip-b32 are built once for the module; the
ViT-B-16 key map is checked on meta-device models (no init, no forward).
"""
import logging
import warnings

import pytest
import torch
from torch import nn

import msclip_fast as mf
from msclip_fast.models import create_model, export_state_dict, load_model, load_pretrained
from msclip_fast.models.official import detect_layout
from msclip_fast.models.openai import from_open_clip_state_dict

open_clip = pytest.importorskip("open_clip")


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def _perturb_small(model, seed=0):
    """Give biases, LayerNorms and 0-d tensors random values (open_clip initializes them to
    constants), so that a mapping that confused them would show."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() <= 1:
                p.add_(0.1 * torch.randn(p.shape, generator=g))


@pytest.fixture(scope="module")
def reference_backends():
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MSCLIP_FAST_BACKEND", "reference")
        yield


@pytest.fixture(scope="module")
def b32(reference_backends):
    """(open_clip ViT-B-32 with random weights, our clip-b32 loaded from its state dict)."""
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = open_clip.create_model("ViT-B-32").eval()  # exact GELU; no pretrained download
    _perturb_small(ref)
    ours = create_model("clip-b32", pretrained=ref.state_dict(), act="gelu").eval()
    return ref, ours


def _tiny_open_clip(quick_gelu=True):
    torch.manual_seed(1)
    ref = open_clip.model.CLIP(
        embed_dim=64,
        vision_cfg=open_clip.model.CLIPVisionCfg(layers=4, width=128, head_width=32, patch_size=8, image_size=64),
        text_cfg=open_clip.model.CLIPTextCfg(context_length=77, vocab_size=49408, width=64, heads=4, layers=4),
        quick_gelu=quick_gelu,
    ).eval()
    _perturb_small(ref, seed=1)
    return ref


def _tokens():
    return mf.get_tokenizer()(["a photo of a cat", "a diagram of a transformer block with two towers", ""])


def test_open_clip_b32_same_features(b32):
    ref, ours = b32
    assert ours.config.act == "gelu" and ours.config.ln_eps == 1e-5
    g = torch.Generator().manual_seed(0)
    images = torch.randn(2, 3, 224, 224, generator=g)
    tok = _tokens()
    with torch.no_grad():
        for a, b in ((ours.encode_image(images, normalize=False), ref.encode_image(images)),
                     (ours.encode_text(tok, normalize=False), ref.encode_text(tok))):
            # measured ~6e-7 (different summation orders, not bit-exact); DESIGN §7 fp32 bound 1e-5
            assert a.shape == b.shape and _rel(a, b) <= 5e-6, _rel(a, b)
    assert torch.equal(ours.logit_scale, ref.logit_scale)


def test_open_clip_b32_round_trip_bit_identical(b32):
    ref, ours = b32
    want = ref.state_dict()
    exported = export_state_dict(ours, layout="open_clip")
    assert set(exported) == set(want)  # open_clip's exact key set (its attn_mask is not persistent)
    for k, v in want.items():
        assert exported[k].shape == v.shape and torch.equal(exported[k], v), k
    back = from_open_clip_state_dict(exported, ours)
    sd = ours.state_dict()
    assert set(back) == set(sd) and all(torch.equal(back[k].reshape(sd[k].shape), sd[k]) for k in sd)
    assert set(export_state_dict(ours, layout="openai")) == set(want)
    assert detect_layout(exported) == "open_clip" and detect_layout(sd) == "ours"


def test_open_clip_b16_key_map():
    """ViT-B-16 names and shapes without building either model: meta-device modules and
    distinct constant tensors (a swapped pair of same-shaped tensors would show)."""
    with torch.device("meta"):
        ref = open_clip.model.CLIP(**open_clip.get_model_config("ViT-B-16"))
        ours = create_model("clip-b16")
    src = {k: torch.tensor(float(i + 1), dtype=torch.float16).expand(v.shape)
           for i, (k, v) in enumerate(ref.state_dict().items())}
    sd = from_open_clip_state_dict({**src, "visual.transformer.resblocks.0.attn_mask": torch.zeros(1)}, ours)
    ours.load_state_dict(sd, strict=True, assign=True)
    exported = export_state_dict(ours, layout="open_clip")
    assert set(exported) == set(src)
    for k, v in src.items():
        assert exported[k].shape == v.shape and torch.equal(exported[k], v), k


def test_tiny_quickgelu_eps_logging_and_overrides(caplog, reference_backends):
    ref = _tiny_open_clip(quick_gelu=True)
    with caplog.at_level(logging.INFO, logger="msclip_fast.models.factory"):
        ours = create_model("clip-tiny", pretrained=ref.state_dict()).eval()
    assert ours.config.act == "quick_gelu" and ours.config.ln_eps == 1e-5
    assert any("act='quick_gelu'" in r.getMessage() for r in caplog.records), caplog.text
    g = torch.Generator().manual_seed(2)
    images, tok = torch.randn(2, 3, 64, 64, generator=g), _tokens()
    with torch.no_grad():
        assert _rel(ours.encode_image(images, normalize=False), ref.encode_image(images)) <= 5e-6
        assert _rel(ours.encode_text(tok, normalize=False), ref.encode_text(tok)) <= 5e-6
    # an explicit ln_eps is kept; the activation is the caller's choice, and it matters
    other = create_model("clip-tiny", pretrained=ref.state_dict(), ln_eps=1e-6, act="gelu").eval()
    assert other.config.ln_eps == 1e-6 and other.config.act == "gelu"
    with torch.no_grad():
        assert _rel(other.encode_image(images, normalize=False), ref.encode_image(images)) > 1e-4


def test_wrapped_prefixed_file_and_torchscript(tmp_path, reference_backends):
    ref = _tiny_open_clip()
    want = ref.state_dict()
    path = tmp_path / "open_clip_epoch_1.pt"
    torch.save({"epoch": 1, "state_dict": {"module." + k: v for k, v in want.items()}}, path)
    for model in (load_model(path, config="clip-tiny"), create_model("clip-tiny", pretrained=str(path))):
        got = export_state_dict(model, layout="open_clip")
        assert all(torch.equal(got[k], want[k]) for k in want)

    # an OpenAI-style TorchScript archive: the same names plus input_resolution & co
    root = nn.Module()
    extras = {"input_resolution": torch.tensor(64), "context_length": torch.tensor(77),
              "vocab_size": torch.tensor(49408)}
    for key, t in {**want, **extras}.items():
        *parents, leaf = key.split(".")
        m = root
        for p in parents:
            if not hasattr(m, p):
                m.add_module(p, nn.Module())
            m = getattr(m, p)
        m.register_buffer(leaf, t.clone().half() if t.is_floating_point() else t)  # OpenAI ships fp16
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        torch.jit.script(root).save(str(tmp_path / "ViT-tiny.pt"))
    model = load_model(tmp_path / "ViT-tiny.pt", config="clip-tiny")
    assert not model.training
    assert model.config.ln_eps == 1e-5 and model.visual.proj.dtype == torch.float32
    got = export_state_dict(model, layout="open_clip")
    assert all(torch.equal(got[k], want[k].half().float()) for k in want)

    extras["input_resolution"] = torch.tensor(224)
    with pytest.raises(ValueError, match="input_resolution=224 but the model's vision.image_size=64"):
        create_model("clip-tiny", pretrained={**want, **extras})


def test_missing_unexpected_and_shape_errors():
    sd = dict(_tiny_open_clip().state_dict())
    del sd["visual.ln_post.bias"]
    sd["visual.extra.weight"] = torch.zeros(3)
    sd["text_projection"] = torch.zeros(64, 32)
    with pytest.raises(ValueError) as e:
        create_model("clip-tiny", pretrained=sd)
    msg = str(e.value)
    assert "missing keys ['visual.ln_post.bias']" in msg and "unexpected keys ['visual.extra.weight']" in msg
    assert "text_projection: checkpoint (64, 32) vs model (64, 64)" in msg
    # our own layout is strict too
    ours = dict(create_model("clip-tiny").state_dict())
    ours["bogus"] = ours.pop("visual.proj")
    with pytest.raises(ValueError, match=r"missing keys \['visual.proj'\]; unexpected keys \['bogus'\]"):
        create_model("clip-tiny", pretrained=ours)


@pytest.mark.parametrize("name", ["msclip-s-tiny", "msclip-all-tiny"])
def test_official_round_trip_bit_identical(name):
    torch.manual_seed(0)
    model = create_model(name)
    _perturb_small(model)
    official = export_state_dict(model, layout="official")
    assert detect_layout(official) == "official"
    fresh = load_pretrained(create_model(name), {"module." + k: v for k, v in official.items()})
    sd, back = model.state_dict(), fresh.state_dict()
    assert set(back) == set(sd) and all(torch.equal(back[k], sd[k]) for k in sd)
    assert export_state_dict(fresh, layout="official").keys() == official.keys()
    ours = export_state_dict(model, layout="ours")
    assert all(torch.equal(ours[k], sd[k]) for k in sd)
    with pytest.raises(ValueError, match="no OpenAI / open_clip layout: share="):
        export_state_dict(model, layout="open_clip")
    with pytest.raises(ValueError, match="layout='nope'"):
        export_state_dict(model, layout="nope")


def test_official_alias_mismatch():
    model = create_model("msclip-s-tiny")
    official = export_state_dict(model, layout="official")
    v, t = "visual.transformer.resblocks.2.mlp.c_fc.weight", "transformer.resblocks.2.mlp.c_fc.weight"
    official[t] = official[t] + 0.25
    with pytest.raises(ValueError, match=rf"'{v}' vs '{t}': max abs difference 0.25"):
        load_pretrained(model, official, layout="official")
    del official[t]
    with pytest.raises(ValueError, match="missing keys"):
        load_pretrained(model, official, layout="official")
