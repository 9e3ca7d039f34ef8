"""Atomic checkpoint protocol: a crash mid-write never moves ``latest``."""
import json

import pytest
import torch

import msclip_fast as mf
from msclip_fast.training.checkpoint import load_checkpoint, resolve_checkpoint, save_checkpoint
from msclip_fast.training.config import TrainConfig
from msclip_fast.training.engine import TorchEngine
from msclip_fast.training.optim import create_optimizer
from msclip_fast.training.schedule import create_scheduler


def _engine():
    cfg = TrainConfig(lr=1e-3, wd=0.1, lr_share=1e-3, wd_share=0.1)
    model = mf.create_model("clip-tiny")
    opt = create_optimizer(model, cfg)
    return TorchEngine(model, opt, create_scheduler(opt, 1, 10), cfg, torch.device("cpu"))


def test_crash_mid_write_keeps_latest(tmp_path, monkeypatch):
    eng = _engine()
    cfg = eng.model.config.to_dict()
    first = save_checkpoint(tmp_path, 1, eng, cfg, {"epoch": 0, "batch": 1})
    assert resolve_checkpoint(tmp_path) == first

    def crash(ckpt_dir):
        (ckpt_dir / "trainer_state.pt").write_bytes(b"partial")
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(eng, "save_state", crash)
    with pytest.raises(OSError, match="simulated"):
        save_checkpoint(tmp_path, 2, eng, cfg, {"epoch": 0, "batch": 2})
    assert (tmp_path / "checkpoints" / "latest").read_text().strip() == "step_00000001"
    assert not (tmp_path / "checkpoints" / "step_00000002").exists()
    assert resolve_checkpoint(tmp_path) == first
    monkeypatch.undo()

    # the next save cleans the leftover temp dir and completes
    with torch.no_grad():
        eng.model.logit_scale.add_(1.0)
    second = save_checkpoint(tmp_path, 2, eng, cfg, {"epoch": 0, "batch": 2})
    assert resolve_checkpoint(tmp_path) == second
    assert not any(p.name.startswith(".tmp") for p in (tmp_path / "checkpoints").iterdir())
    assert json.loads((second / "meta.json").read_text())["step"] == 2
    assert {p.name for p in second.iterdir()} >= {"model.pt", "config.json", "meta.json", "trainer_state.pt",
                                                  "rng_rank0.pt"}

    # load restores the weights of the checkpoint
    eng2 = _engine()
    meta = load_checkpoint(tmp_path / "checkpoints" / "step_00000001", eng2)
    assert meta["step"] == 1
    torch.testing.assert_close(eng2.model.logit_scale, eng.model.logit_scale - 1.0)
    loaded = mf.load_model(second)
    torch.testing.assert_close(loaded.logit_scale, eng.model.logit_scale)


def test_resolve_checkpoint_errors(tmp_path):
    with pytest.raises(ValueError, match="neither"):
        resolve_checkpoint(tmp_path)
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "latest").write_text("step_00000009\n")
    with pytest.raises(ValueError, match="not a complete checkpoint"):
        resolve_checkpoint(tmp_path)
