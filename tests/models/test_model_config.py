"""ModelConfig: presets, validation (ValueError naming field and value), serialization."""
import json
import math

import pytest

from msclip_fast.models import ModelConfig, get_model_config, list_models

PRESETS = ["clip-b32", "clip-b16", "msclip-b32", "msclip-b32-attn", "msclip-b32-mlp", "msclip-b32-all",
           "msclip-s-b32", "msclip-s-b16", "clip-tiny", "msclip-tiny", "msclip-attn-tiny", "msclip-mlp-tiny",
           "msclip-all-tiny", "msclip-s-tiny", "msclip-b32-pattn", "msclip-pattn-tiny"]


def test_list_models_has_every_preset():
    assert sorted(PRESETS) == list_models()


@pytest.mark.parametrize("name", PRESETS)
def test_preset_round_trips_through_json(name):
    cfg = get_model_config(name)
    assert cfg.name == name
    d = json.loads(json.dumps(cfg.to_dict()))
    assert ModelConfig.from_dict(d) == cfg
    assert cfg.ln_eps == 1e-12 and cfg.act == "quick_gelu"
    assert math.isclose(cfg.logit_scale_init, math.log(1 / 0.07))
    assert cfg.logit_bias_init is None  # CLIP: no logit bias parameter
    if name.endswith("tiny"):
        assert cfg.vision.image_size == 64 and cfg.vision.width <= 128 and cfg.text.width <= 128
        assert cfg.vision.layers == 4 and cfg.text.layers == 4 and cfg.grid_size in (4, 8)


def test_sharing_defaults():
    assert get_model_config("clip-b32").packed is False
    assert get_model_config("msclip-b32").packed is True
    assert get_model_config("msclip-b32-attn").packed is False
    s = get_model_config("msclip-s-b32")
    assert s.share_layers == (1, 12) and s.early_specialization and s.grid_size == 7
    assert get_model_config("msclip-s-b16").grid_size == 14
    assert get_model_config("msclip-b32").replace(packed=False).packed is False


@pytest.mark.parametrize("override, field", [
    ({"embed_dim": 0}, "embed_dim"),
    ({"share": ["attn", "ffn"]}, "share"),
    ({"share": "attn"}, "share"),
    ({"share_layers": [0, 13]}, "share_layers"),
    ({"share_layers": [0]}, "share_layers"),
    ({"early_specialization": True, "share_layers": [0, 12]}, "share_layers"),
    ({"early_specialization": "yes"}, "early_specialization"),
    ({"act": "relu"}, "act"),
    ({"ln_eps": -1.0}, "ln_eps"),
    ({"packed": 1}, "packed"),
    ({"vision": {"width": 770}}, "vision.heads"),
    ({"vision": {"patch_size": 30}}, "vision.patch_size"),
    ({"vision": {"image_std": [1, 2]}}, "vision.image_std"),
    ({"vision": {"parallel_branch": True, "adapter_kernels": [16, 8, 4, 2]}}, "vision.adapter_kernels"),
    ({"vision": {"parallel_branch": True, "adapter_kernels": [8, 8, 4, 2, 1]}}, "vision.adapter_kernels"),
    ({"vision": {"parallel_branch": True, "adapter_layers": [2, 4, 6, 8, 12]}}, "vision.adapter_layers"),
    ({"text": {"width": 512, "heads": 8}}, "text.width"),
    ({"text": {"context_length": -5}}, "text.context_length"),
    ({"logit_bias_init": float("nan")}, "logit_bias_init"),
    ({"logit_bias_init": "-10"}, "logit_bias_init"),
])
def test_bad_field_raises_naming_it(override, field):
    with pytest.raises(ValueError) as e:
        get_model_config("msclip-b32").replace(**override)
    assert field in str(e.value)
    top, _, sub = field.partition(".")
    value = override[top][sub] if sub and sub in override.get(top, {}) else override.get(top)
    if value is not None and not isinstance(value, dict):
        as_tuple = str(tuple(value)) if isinstance(value, list) else None
        assert repr(value) in str(e.value) or (as_tuple and as_tuple in str(e.value)), str(e.value)


def test_packed_needs_attn_and_mlp_shared():
    with pytest.raises(ValueError, match="packed=True"):
        get_model_config("msclip-b32-attn").replace(packed=True)


def test_unknown_keys_rejected():
    d = get_model_config("msclip-tiny").to_dict()
    with pytest.raises(ValueError, match="shre"):
        ModelConfig.from_dict({**d, "shre": ["attn"]})
    d["vision"]["patchsize"] = 8
    with pytest.raises(ValueError, match="vision.patchsize"):
        ModelConfig.from_dict(d)


def test_unknown_preset():
    with pytest.raises(ValueError, match="nope"):
        get_model_config("nope")
