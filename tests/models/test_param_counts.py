"""Parameter counts equal the official code's (DESIGN §2); shared tensors counted once."""
import pytest
import torch

from msclip_fast.models import create_model_from_config, get_model_config


def _count(cfg):
    with torch.device("meta"):  # no memory, no init cost
        model = create_model_from_config(cfg)
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name, expected", [
    ("clip-b32", 151_277_313),
    ("clip-b16", 149_620_737),
    ("msclip-b32", 126_285_313),
    ("msclip-b32-attn", 182_954_497),
    ("msclip-b32-mlp", 154_633_729),
    ("msclip-b32-all", 126_248_449),
    ("msclip-s-b32", 132_408_001),
    ("msclip-s-b16", 132_503_617),
    # msclip-b32 + a parallel attention of width 128 (2 heads) beside each of the 12 shared
    # blocks, per modality: QKV 3·128·768 + 3·128, out 768·128 + 768 = 394,368; x 2 x 12
    ("msclip-b32-pattn", 126_285_313 + 2 * 12 * (3 * 128 * 768 + 3 * 128 + 768 * 128 + 768)),
])
def test_preset_count(name, expected):
    assert _count(get_model_config(name)) == expected


@pytest.mark.parametrize("overrides, expected", [
    ({"vision": {"patch_size": 16}}, 124_628_737),  # MS-CLIP B/16
    ({"early_specialization": True}, 128_436_721),  # + early specialization only
    ({"vision": {"parallel_branch": True}}, 130_256_593),  # + parallel branch only
])
def test_variant_count(overrides, expected):
    assert _count(get_model_config("msclip-b32").replace(**overrides)) == expected
