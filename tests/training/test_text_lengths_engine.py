"""The engines hand the loader's CPU ``text_lengths`` to the model's forward, never moved."""
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import msclip_fast as mf
from msclip_fast.data import build_loader
from msclip_fast.modules import text_lengths
from msclip_fast.training.config import TrainConfig
from msclip_fast.training.engine import TorchEngine
from msclip_fast.training.optim import create_optimizer
from msclip_fast.training.schedule import create_scheduler

REPO = Path(__file__).resolve().parents[2]
MODEL = "msclip-s-tiny"  # BatchNorm stem + shared blocks: the preset with the most moving parts


def _record_forward(monkeypatch, model_cls):
    """Patch ``model_cls.forward`` to record what each call got; returns the record list."""
    calls = []
    real = model_cls.forward

    def forward(self, images, tokens, *args, **kwargs):
        calls.append({"tokens": tokens, "args": args, "kwargs": dict(kwargs)})
        return real(self, images, tokens, *args, **kwargs)

    monkeypatch.setattr(model_cls, "forward", forward)
    return calls


def _engine(model, **kw):
    cfg = TrainConfig(**{"lr": 1e-3, "wd": 0.1, "lr_share": 1e-3, "wd_share": 0.1, **kw})
    opt = create_optimizer(model, cfg)
    return TorchEngine(model, opt, create_scheduler(opt, 1, 10), cfg, torch.device("cpu"))


def _batch(digits_shards, model):
    # a real loader batch; eval order skips the train shuffle buffer's fill (seconds)
    return next(iter(build_loader(str(digits_shards / "train"), 4, train=False, image_size=model.image_size,
                                  mean=model.image_mean, std=model.image_std)))


def test_torch_engine_step_passes_cpu_lengths(digits_shards, monkeypatch):
    model = mf.create_model(MODEL)
    calls = _record_forward(monkeypatch, type(model))
    eng = _engine(model)
    batch = _batch(digits_shards, model)
    lengths = batch["text_lengths"]
    loss, _ = eng.forward_loss(batch)
    eng.backward(loss)
    assert eng.step() is not None  # a full optimizer step ran
    (call,) = calls
    got = call["kwargs"]["text_lengths"]
    assert got is lengths  # the loader's tensor itself: not copied, not moved to the device
    assert got.device.type == "cpu" and got.dtype == torch.int64
    assert torch.equal(got, text_lengths(batch["text"]))

    # batches from elsewhere (no "text_lengths"): None, and the model computes them itself
    del batch["text_lengths"]
    loss, _ = eng.forward_loss(batch)
    assert torch.isfinite(loss)
    assert calls[1]["kwargs"] == {"text_lengths": None}


# One real process with DeepSpeed (ZeRO-3: the stage whose hooks wrap the module's forward),
# recording in the child and reporting as JSON: DeepSpeed's dist init must not leak into this
# pytest process.
_DS_CHILD = textwrap.dedent("""
    import json, sys
    import torch
    import msclip_fast as mf
    from msclip_fast.modules import text_lengths
    from msclip_fast.training import main

    cls = type(mf.create_model(sys.argv[1]))
    real, seen = cls.forward, []

    def forward(self, images, tokens, *args, **kwargs):
        n = kwargs.get("text_lengths")
        seen.append(None if n is None else {
            "device": n.device.type, "dtype": str(n.dtype), "lengths": n.tolist(),
            "expected": text_lengths(tokens).tolist()})
        return real(self, images, tokens, *args, **kwargs)

    cls.forward = forward
    summary = main(sys.argv[3:])
    with open(sys.argv[2], "w") as f:
        json.dump({"status": summary["status"], "seen": seen}, f)
""")


@pytest.mark.slow  # a DeepSpeed run in a child process (~10 s)
def test_deepspeed_engine_passes_cpu_lengths(digits_shards, tmp_path, train_args):
    pytest.importorskip("deepspeed")
    report = tmp_path / "seen.json"
    flags = train_args(digits_shards, tmp_path / "run", "--max-steps", "1", "--ds_config",
                       str(REPO / "configs" / "ds" / "zero3.json"), "--precision", "fp32", model=MODEL, batch=4)
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    out = subprocess.run([sys.executable, "-c", _DS_CHILD, MODEL, str(report), *flags], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, (out.stdout + out.stderr)[-6000:]
    got = json.loads(report.read_text())
    assert got["status"] == "finished"
    assert got["seen"], "the model's forward never ran"
    for s in got["seen"]:
        assert s is not None, "DeepSpeedEngine called the model without text_lengths"
        assert s["device"] == "cpu" and s["dtype"] == "torch.int64"
        assert s["lengths"] == s["expected"] and len(s["lengths"]) == 4
