"""Without --precision, a GPU trains in bf16 (fp32 master weights) and the CPU in fp32, unless
the DeepSpeed config enables a precision itself."""
import argparse
import json

import pytest

from msclip_fast.training.engine import resolve_ds_config


def _args(**kw):
    base = dict(batch_size=4, accum_steps=1, grad_clip=None, precision=None)
    base.update(kw)
    return argparse.Namespace(**base)


@pytest.mark.parametrize("device_type,want", [("cuda", "bf16"), ("cpu", "fp32")])
def test_default_precision_follows_the_device(tmp_path, device_type, want):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"zero_optimization": {"stage": 2}, "gradient_clipping": 1.0}))
    args = _args()
    cfg = resolve_ds_config(str(path), args, 1, device_type)
    assert args.precision == want
    assert cfg["bf16"]["enabled"] is (want == "bf16")


def test_config_and_flag_win_over_the_device_default(tmp_path):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"fp16": {"enabled": True}, "gradient_clipping": 1.0}))
    args = _args()
    resolve_ds_config(str(path), args, 1, "cuda")
    assert args.precision == "fp16"
    args = _args(precision="fp32")
    cfg = resolve_ds_config(str(path), args, 1, "cuda")
    assert args.precision == "fp32" and not cfg["bf16"]["enabled"] and not cfg["fp16"]["enabled"]
