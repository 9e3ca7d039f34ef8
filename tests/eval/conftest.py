"""Fixtures of the eval tests: a randomly initialized tiny model in the checkpoint layout."""
import json

import pytest
import torch

import msclip_fast as mf


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """RUN/checkpoints/step_00000000/{model.pt, config.json} and RUN/checkpoints/latest."""
    run = tmp_path_factory.mktemp("run")
    ckpt = run / "checkpoints" / "step_00000000"
    ckpt.mkdir(parents=True)
    torch.manual_seed(0)
    model = mf.create_model("msclip-tiny")
    torch.save(model.state_dict(), ckpt / "model.pt")
    (ckpt / "config.json").write_text(json.dumps(model.config.to_dict()))
    (run / "checkpoints" / "latest").write_text("step_00000000\n")
    return run
