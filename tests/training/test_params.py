import os
import subprocess
import sys
from pathlib import Path

import pytest

from msclip_fast.training.params import parse_args

REPO = Path(__file__).resolve().parents[2]


def test_defaults_and_aliases(tmp_path):
    a = parse_args(["--train-data", "x", "--deepspeed_config", "c.json", "--local_rank=1", "--lr", "1e-3"])
    assert a.ds_config == "c.json" and a.local_rank == 1
    assert a.lr_share == 1e-3 and a.wd_share == a.wd
    assert a.packed is None
    assert parse_args(["--train-data", "x", "--no-packed"]).packed is False
    assert parse_args(["--train-data", "x", "--resume", "auto", "--output", "r"]).resume == "r"
    assert (a.loss, a.logit_scale_init, a.logit_bias_init) == ("clip", None, None)  # the preset's init


def test_siglip_init_defaults_and_overrides():
    import math

    a = parse_args(["--train-data", "x", "--loss", "siglip"])
    assert a.logit_scale_init == pytest.approx(math.log(10)) and a.logit_bias_init == -10.0
    a = parse_args(["--train-data", "x", "--loss", "siglip", "--logit-scale-init", "1.5", "--logit-bias-init", "none"])
    assert (a.logit_scale_init, a.logit_bias_init) == (1.5, "none")
    assert parse_args(["--train-data", "x", "--logit-bias-init", "-3"]).logit_bias_init == -3.0


@pytest.mark.parametrize("flags, field", [
    (["--batch-size", "0"], "--batch-size"), (["--accum-steps", "0"], "--accum-steps"),
    (["--max-steps", "0"], "--max-steps"), (["--grad-clip", "-1"], "--grad-clip"),
    (["--warmup", "-1"], "--warmup"), (["--lock-image", "--lock-text"], "--lock-image"),
    (["--loss", "siglip", "--local-loss"], "--local-loss"), (["--logit-bias-init", "inf"], "--logit-bias-init"),
])
def test_bad_values_name_the_flag(flags, field):
    with pytest.raises(ValueError, match=field):
        parse_args(["--train-data", "x", *flags])


def test_train_data_required():
    with pytest.raises(ValueError, match="--train-data"):
        parse_args([])


def test_train_py_help():
    out = subprocess.run([sys.executable, "train.py", "--help"], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    for flag in ("--ds_config", "--max-steps", "--lr-share", "--lock-image", "--precision", "--resume", "--loss"):
        assert flag in out.stdout


@pytest.mark.slow
def test_deepspeed_launcher_help():
    exe = os.path.join(os.path.dirname(sys.executable), "deepspeed")
    if not os.path.exists(exe):
        pytest.skip("deepspeed launcher not installed")
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    out = subprocess.run([exe, "train.py", "--help"], cwd=REPO, capture_output=True, text=True, timeout=120, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "--ds_config" in out.stdout
