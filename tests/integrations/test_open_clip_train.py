"""End-to-end test of ``python -m msclip_fast.integrations.open_clip_train`` (open_clip's own
trainer with msclip_fast modules and loss), on the CPU, in-process (one import of torch and
open_clip for the whole file, which keeps it within the CI time budget).

The run: a tiny open_clip config (``oc-tiny-test.json`` beside this file: 32 px ViT, 2+2
layers, width 64), two webdataset shards of 16 PNG/caption samples each, batch 8, one epoch
(4 steps). Checked: open_clip returns success, the patched model and msclip_fast's loss are the
ones ``train_one_epoch`` receives, every loss value is finite, the runner's log lines are in
open_clip's ``out.log``, the checkpoint loads strictly into an unpatched open_clip model, and
``open_clip_train.main``'s module globals are restored afterwards.
"""
from __future__ import annotations

import io
import logging
import math
import tarfile
from pathlib import Path

import pytest

pytest.importorskip("webdataset")
pytest.importorskip("open_clip_train")
open_clip = pytest.importorskip("open_clip")
torch = pytest.importorskip("torch")
from PIL import Image  # noqa: E402

from msclip_fast.integrations import open_clip_train as runner  # noqa: E402

CONFIG = Path(__file__).with_name("oc-tiny-test.json")
MODEL = CONFIG.stem


def _write_shards(root: Path, n_shards: int = 2, per_shard: int = 16) -> str:
    """``n_shards`` tar shards of ``per_shard`` samples (``KEY.png`` 32x32 + ``KEY.txt``); returns
    the brace pattern open_clip's ``--train-data`` takes."""
    colours = ["red", "green", "blue", "yellow"]
    rgb = {"red": (220, 20, 20), "green": (20, 200, 20), "blue": (20, 20, 220), "yellow": (230, 220, 30)}
    for s in range(n_shards):
        with tarfile.open(root / f"{s:06d}.tar", "w") as tar:
            for i in range(per_shard):
                key = f"{s:03d}{i:05d}"
                colour = colours[(s * per_shard + i) % len(colours)]
                buf = io.BytesIO()
                Image.new("RGB", (32, 32), rgb[colour]).save(buf, format="PNG")
                for name, data in ((f"{key}.png", buf.getvalue()), (f"{key}.txt", f"a {colour} square".encode())):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    return str(root / ("{000000..%06d}.tar" % (n_shards - 1)))


@pytest.fixture
def isolate_process_state(monkeypatch):
    """Undo what an in-process open_clip run changes globally: ``setup_logging`` adds root
    handlers and sets every logger's level, ``random_seed`` seeds torch/numpy/random, and the
    runner registers a model config."""
    import random

    import numpy as np
    import open_clip.factory as ocf

    monkeypatch.setattr(ocf, "_MODEL_CONFIG_PATHS", list(ocf._MODEL_CONFIG_PATHS))
    monkeypatch.setattr(ocf, "_MODEL_CONFIGS", dict(ocf._MODEL_CONFIGS))
    rng = (torch.get_rng_state(), np.random.get_state(), random.getstate())
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    levels = {n: lg.level for n, lg in logging.root.manager.loggerDict.items() if isinstance(lg, logging.Logger)}
    yield
    for h in list(root.handlers):
        if h not in handlers:
            root.removeHandler(h)
            h.close()
    root.setLevel(level)
    for n, lg in logging.root.manager.loggerDict.items():
        if isinstance(lg, logging.Logger):
            lg.setLevel(levels.get(n, logging.NOTSET))
    torch.set_rng_state(rng[0])
    np.random.set_state(rng[1])
    random.setstate(rng[2])


def test_parse_runner_args_splits_msclip_flags():
    opts, rest = runner.parse_runner_args(
        ["--model", "ViT-B-32", "--msclip-no-mlp", "--msclip-backend", "reference", "--batch-size", "8",
         "--msclip-model-config", "a.json", "--msclip-no-loss"])
    assert rest == ["--model", "ViT-B-32", "--batch-size", "8"]
    assert (opts.attention, opts.layer_norm, opts.mlp, opts.loss) == (True, True, False, False)
    assert opts.backend == "reference" and opts.model_configs == ["a.json"]
    with pytest.raises(SystemExit):
        runner.parse_runner_args(["--msclip-bogus"])


def test_swap_loss_maps_open_clip_losses():
    import open_clip.loss as ocl

    import msclip_fast as mf

    clip = runner.swap_loss(ocl.ClipLoss(local_loss=True, gather_with_grad=True, cache_labels=True))
    assert type(clip) is mf.ClipLoss and clip.local_loss and clip.gather_with_grad and clip.cache_labels
    sig = runner.swap_loss(ocl.SigLipLoss(dist_impl="gather"))
    assert type(sig) is mf.SigLipLoss and sig.dist_impl == "gather"
    coca = ocl.CoCaLoss(caption_loss_weight=1.0, clip_loss_weight=1.0)
    assert runner.swap_loss(coca) is coca
    distill = ocl.DistillClipLoss()
    assert runner.swap_loss(distill) is distill


def test_open_clip_trainer_end_to_end(tmp_path, monkeypatch, isolate_process_state):
    import msclip_fast as mf

    data = tmp_path / "data"
    data.mkdir()
    pattern = _write_shards(data)
    ocmain = runner._import_open_clip_train_main()
    orig_create_model, orig_create_loss = ocmain.create_model_and_transforms, ocmain.create_loss

    seen = {}
    orig_train = ocmain.train_one_epoch

    def spy_train_one_epoch(model, data_, loss, *args, **kwargs):
        seen["model"], seen["loss"] = model, loss
        seen["values"] = values = []
        hook = loss.register_forward_hook(
            lambda m, i, out: values.append(float(out["contrastive_loss"].detach())))
        try:
            return orig_train(model, data_, loss, *args, **kwargs)
        finally:
            hook.remove()

    monkeypatch.setattr(ocmain, "train_one_epoch", spy_train_one_epoch)
    state = {}
    logs = tmp_path / "logs"
    status = runner.run([
        "--msclip-model-config", str(CONFIG), "--msclip-backend", "auto",
        "--model", MODEL, "--train-data", pattern, "--dataset-type", "webdataset",
        "--train-num-samples", "32", "--batch-size", "8", "--epochs", "1", "--workers", "0",
        "--device", "cpu", "--precision", "fp32", "--lr", "1e-3", "--warmup", "1", "--seed", "0",
        "--logs", str(logs), "--name", "x", "--save-frequency", "1", "--report-to", "",
        "--log-every-n-steps", "1", "--zeroshot-frequency", "0",
    ], state=state)
    assert status == 0

    # the runner's wrappers were used, and restored
    assert ocmain.create_model_and_transforms is orig_create_model and ocmain.create_loss is orig_create_loss
    assert state["model_calls"] == 1
    model = seen["model"]
    assert model is state["patched_model"]
    ours = {type(m).__name__ for m in model.modules() if type(m).__module__.startswith("msclip_fast.")}
    assert {"DropInMultiheadAttention", "DropInLayerNorm", "DropInMLP"} <= ours, ours
    assert type(seen["loss"]) is mf.ClipLoss and seen["loss"] is state["loss"]
    assert len(seen["values"]) == 4 and all(math.isfinite(v) for v in seen["values"])

    log = (logs / "x" / "out.log").read_text()
    assert "msclip_fast: patched the open_clip model" in log
    assert "msclip_fast.ClipLoss" in log
    assert "msclip_fast: registered open_clip model config(s)" in log
    assert "Train Epoch: 0" in log

    # the checkpoint is an open_clip checkpoint: strict load into an unpatched model
    ckpt = torch.load(logs / "x" / "checkpoints" / "epoch_1.pt", map_location="cpu", weights_only=True)
    assert ckpt["epoch"] == 1
    plain = open_clip.create_model(MODEL)
    plain.load_state_dict(ckpt["state_dict"], strict=True)
    trained = {k: v for k, v in model.state_dict().items()}
    assert set(trained) == set(ckpt["state_dict"])
