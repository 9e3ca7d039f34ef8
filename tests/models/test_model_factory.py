"""create_model overrides, load_model (checkpoint layout of CONTRACTS), official layout."""
import json

import pytest
import torch

from msclip_fast.models import MSCLIP, create_model, load_model
from msclip_fast.models.official import from_official_state_dict, is_official_state_dict, to_official_state_dict


def _inputs():
    g = torch.Generator().manual_seed(0)
    tok = torch.randint(1, 49000, (2, 77), generator=g)
    tok[:, 9] = 49407
    return torch.randn(2, 3, 64, 64, generator=g), tok


def _save(model, ckpt_dir, state_dict=None):
    ckpt_dir.mkdir(parents=True)
    torch.save(model.state_dict() if state_dict is None else state_dict, ckpt_dir / "model.pt")
    (ckpt_dir / "config.json").write_text(json.dumps(model.config.to_dict()))


def test_create_model_overrides():
    m = create_model("msclip-tiny", packed=False, vision={"image_size": 32})
    assert m.config.packed is False and m.image_size == 32 and m.config.vision.width == 128
    with pytest.raises(ValueError, match="nope"):
        create_model("nope")
    with pytest.raises(ValueError, match="share"):
        create_model("msclip-tiny", share=["x"])


@pytest.mark.parametrize("name,overrides", [("msclip-s-tiny", {}), ("clip-tiny", {}),
                                            ("clip-tiny", {"logit_bias_init": -10.0})],
                         ids=["msclip-s", "clip", "bias"])
def test_load_model_round_trip(tmp_path, name, overrides):
    torch.manual_seed(0)
    model = create_model(name, **overrides)
    if model.logit_bias is not None:
        with torch.no_grad():
            model.logit_bias.fill_(-7.25)  # trained away from the init that config.json rebuilds
    model.train()
    images, tok = _inputs()
    model(images, tok)  # update BN running stats so the buffers matter
    model.eval()
    want = model(images, tok)
    run = tmp_path / "run"
    _save(model, run / "checkpoints" / "step_00000002")
    (run / "checkpoints" / "latest").write_text("step_00000002\n")
    for path in (run, run / "checkpoints" / "step_00000002", run / "checkpoints" / "step_00000002" / "model.pt"):
        loaded = load_model(path)
        assert isinstance(loaded, MSCLIP) and not loaded.training
        assert loaded.config == model.config
        got = loaded(images, tok)
        assert len(got) == len(want) == (4 if overrides else 3)
        for a, b in zip(got, want):
            assert torch.equal(a, b)


def test_load_model_errors(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        load_model(tmp_path / "missing")
    with pytest.raises(ValueError, match="model.pt"):
        load_model(tmp_path)
    model = create_model("msclip-tiny")
    _save(model, tmp_path / "ck", {"logit_scale": model.logit_scale.detach()})
    with pytest.raises(ValueError, match="missing"):
        load_model(tmp_path / "ck")


@pytest.mark.parametrize("name", ["msclip-s-tiny", "msclip-attn-tiny", "msclip-all-tiny", "clip-tiny"])
def test_official_layout_round_trip(tmp_path, name):
    torch.manual_seed(0)
    model = create_model(name).eval()
    official = to_official_state_dict(model)
    assert is_official_state_dict(official)
    if model.config.share:
        i = model.config.share_layers[0]
        # a shared tensor is stored under both tower keys; LayerNorms per tower as (D,)
        v, t = f"visual.transformer.resblocks.{i}.", f"transformer.resblocks.{i}."
        assert torch.equal(official[v + "attn.in_proj_weight"], official[t + "attn.in_proj_weight"])
        assert official[v + "ln_1.weight"].shape == (128,)
    back = from_official_state_dict(official, model)
    sd = model.state_dict()
    assert set(back) == set(sd) and all(torch.equal(back[k], sd[k]) for k in sd)
    # load_model accepts the official layout (wrapped, with a DDP prefix)
    _save(model, tmp_path / "ck", {"state_dict": {"module." + k: v for k, v in official.items()}})
    images, tok = _inputs()
    for a, b in zip(load_model(tmp_path / "ck")(images, tok), model(images, tok)):
        assert torch.equal(a, b)


def test_official_layout_logit_bias():
    """The official code has no logit bias: it is exported under its own name, and an official
    checkpoint without it leaves the model's value (a model without a bias ignores one)."""
    model = create_model("clip-tiny", logit_bias_init=-10.0)
    with torch.no_grad():
        model.logit_bias.fill_(-4.0)
    official = to_official_state_dict(model)
    assert official["logit_bias"].item() == -4.0
    assert from_official_state_dict(official, model)["logit_bias"].item() == -4.0
    del official["logit_bias"]
    fresh = create_model("clip-tiny", logit_bias_init=-10.0)
    assert from_official_state_dict(official, fresh)["logit_bias"].item() == -10.0
    assert "logit_bias" not in from_official_state_dict(to_official_state_dict(model), create_model("clip-tiny"))


def test_official_names_of_msclip_s():
    keys = set(to_official_state_dict(create_model("msclip-s-tiny")))
    for k in ["visual.transformer.resblocks.0.conv1.weight",
              "visual.transformer.resblocks.0.resnet_stage.conv_3.downsample.1.weight",
              "visual.transformer.resblocks.0.last_conv.weight",
              "visual.transformer.parallel_branch_v.0.conv.weight",
              "visual.transformer.parallel_branch_v.1.resnet_stage.conv_0.residual_bn.running_var",
              "visual.transformer.parallel_lateral_adapter.2.top2bottom_pw_conv.conv.weight",
              "visual.transformer.parallel_lateral_adapter.0.ln_adapt.weight",
              "transformer.resblocks.0.mlp.c_fc.weight", "visual.transformer.resblocks.1.mlp.c_fc.weight",
              "token_embedding.weight", "text_projection", "visual.proj", "ln_final.weight", "logit_scale"]:
        assert k in keys, k
    assert "visual.transformer.resblocks.0.attn.in_proj_weight" not in keys


def test_clip_tiny_equals_open_clip():
    """Our CLIP equals open_clip's on the same weights (open_clip's layout is the official one
    without the MS-CLIP extras; LayerNorm eps set to open_clip's 1e-5)."""
    open_clip = pytest.importorskip("open_clip")
    torch.manual_seed(0)
    ours = create_model("clip-tiny", ln_eps=1e-5).eval()
    ref = open_clip.model.CLIP(
        embed_dim=64,
        vision_cfg=open_clip.model.CLIPVisionCfg(layers=4, width=128, head_width=32, patch_size=8, image_size=64),
        text_cfg=open_clip.model.CLIPTextCfg(context_length=77, vocab_size=49408, width=64, heads=4, layers=4),
        quick_gelu=True,
    ).eval()
    missing, unexpected = ref.load_state_dict(to_official_state_dict(ours), strict=False)
    assert not unexpected and all("attn_mask" in k for k in missing), (missing, unexpected)
    images, tok = _inputs()
    with torch.no_grad():
        a_img, a_txt, a_s = ours(images, tok)
        b_img, b_txt, b_s = ref(images, tok)
    assert torch.allclose(a_img, b_img, atol=1e-5) and torch.allclose(a_txt, b_txt, atol=1e-5)
    assert torch.allclose(a_s, b_s)
