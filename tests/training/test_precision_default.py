"""Without --precision, a GPU trains in bf16 (fp32 master weights) and the CPU in fp32, unless
the DeepSpeed config enables a precision itself; the flags are resolved once, into a frozen
TrainConfig, and the parsed flags are left as they were."""
import dataclasses
import json

import pytest

from msclip_fast.training.config import TrainConfig
from msclip_fast.training.ds_config import resolve_ds_config
from msclip_fast.training.params import parse_args


def _resolve(path, precision=None, device_type="cuda", grad_clip=None):
    return resolve_ds_config(str(path), batch_size=4, accum_steps=1, world_size=1, grad_clip=grad_clip,
                             precision=precision, device_type=device_type)


@pytest.mark.parametrize("device_type,want", [("cuda", "bf16"), ("cpu", "fp32")])
def test_default_precision_follows_the_device(tmp_path, device_type, want):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"zero_optimization": {"stage": 2}, "gradient_clipping": 1.0}))
    cfg, precision, clip = _resolve(path, device_type=device_type)
    assert precision == want and clip == 1.0
    assert cfg["bf16"]["enabled"] is (want == "bf16")


def test_config_and_flag_win_over_the_device_default(tmp_path):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"fp16": {"enabled": True}, "gradient_clipping": 1.0}))
    assert _resolve(path)[1] == "fp16"
    cfg, precision, _ = _resolve(path, precision="fp32")
    assert precision == "fp32" and not cfg["bf16"]["enabled"] and not cfg["fp16"]["enabled"]


def test_fp16_on_the_cpu_is_refused_by_both_engines(tmp_path):
    path = tmp_path / "ds.json"
    path.write_text("{}")
    with pytest.raises(ValueError, match="fp16 needs a CUDA device"):
        _resolve(path, precision="fp16", device_type="cpu")
    args = parse_args(["--train-data", "x", "--precision", "fp16"])
    with pytest.raises(ValueError, match="fp16 needs a CUDA device"):
        TrainConfig.from_args(args, device_type="cpu")


def test_train_config_is_frozen_and_leaves_the_flags_alone(tmp_path):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"gradient_clipping": 0.5}))
    args = parse_args(["--train-data", "x", "--ds_config", str(path), "--accum-steps", "3", "--batch-size", "2"])
    before = dict(vars(args))
    cfg = TrainConfig.from_args(args, world_size=2, device_type="cpu", distributed=True)
    assert vars(args) == before  # nothing written back into the Namespace
    assert (cfg.precision, cfg.grad_clip, cfg.global_batch, cfg.contrastive_batch) == ("fp32", 0.5, 12, 12)
    assert cfg.ds_config["train_batch_size"] == 12 and cfg.ds_config["gradient_accumulation_steps"] == 3
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.precision = "bf16"
    with pytest.raises(TypeError):
        cfg.ds_config["train_batch_size"] = 1
    plain = TrainConfig.from_args(parse_args(["--train-data", "x", "--accum-mode", "independent",
                                              "--accum-steps", "4"]), device_type="cuda")
    assert (plain.precision, plain.grad_clip, plain.ds_config, plain.contrastive_batch) == ("bf16", 1.0, None, 32)
    json.dumps(cfg.to_json())  # args.json of the run dir
