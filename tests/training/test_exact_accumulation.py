"""Exact accumulation (GradCache feature caching, msclip_fast.training.step) in one process,
float64: K micro-batches give the loss and every gradient of one contrastive batch of all
K x B pairs; BatchNorm statistics move once per micro-batch; both passes see the same features;
a loss without a feature-gradient path and a non-finite loss are refused before any backward."""
import logging
import math

import pytest
import torch

import msclip_fast as mf
from msclip_fast.losses import ClipLoss, SigLipLoss
from msclip_fast.modules import text_lengths
from msclip_fast.training import NonFiniteLossError, TrainConfig, exact_step, independent_step, train_step
from msclip_fast.training.engine import TorchEngine
from msclip_fast.training.optim import create_optimizer
from msclip_fast.training.schedule import create_scheduler

SOT, EOT, CTX = 49406, 49407, 77
PX = 32  # 16 patches of 8 px: float64 convolutions (MS-CLIP-S stem) are slow on the CPU


def _batch(n: int, g: torch.Generator, size: int = PX) -> dict:
    tokens = torch.zeros(n, CTX, dtype=torch.int64)
    for i in range(n):
        words = int(torch.randint(1, 30, (1,), generator=g))
        tokens[i, 0] = SOT
        tokens[i, 1:1 + words] = torch.randint(1, 49000, (words,), generator=g)
        tokens[i, 1 + words] = EOT
    return {"image": torch.randn(n, 3, size, size, generator=g, dtype=torch.float64), "text": tokens,
            "text_lengths": text_lengths(tokens)}


def _cat(batches: list[dict]) -> dict:
    return {k: torch.cat([b[k] for b in batches]) for k in batches[0]}


def _split(batch: dict, k: int) -> list[dict]:
    n = batch["text"].shape[0] // k
    return [{key: v[i * n:(i + 1) * n] for key, v in batch.items()} for i in range(k)]


class _Grads:
    """Replaces ``engine.step``: records the accumulated gradients (and zeroes them) instead of
    updating, so two ways of computing one step can be compared."""

    def __init__(self, engine):
        self.engine, self.grads = engine, None
        engine.step = self

    def __call__(self):
        self.grads = {n: (p.grad.clone() if p.grad is not None else None)
                      for n, p in self.engine.model.named_parameters()}
        self.engine.model.zero_grad(set_to_none=True)
        return 0.0


SIGLIP_INIT = {"logit_scale_init": math.log(10), "logit_bias_init": -10.0}  # train.py --loss siglip's


def _engine(name: str, accum: int, *, seed: int = 0, loss: str = "clip", **kw) -> TorchEngine:
    torch.manual_seed(seed)
    if loss == "siglip":
        kw = {**SIGLIP_INIT, **kw}
    model = mf.create_model(name, vision={"image_size": PX}, **kw).double()
    with torch.no_grad():  # off the init point: zero-initialized parallel modules get gradients too
        g = torch.Generator().manual_seed(seed + 1)
        for p in model.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    cfg = TrainConfig(accum_steps=accum, grad_clip=0.0, loss=loss)
    opt = create_optimizer(model, cfg)
    engine = TorchEngine(model, opt, create_scheduler(opt, 1, 10), cfg, torch.device("cpu"))
    model.train()
    return engine


def _assert_grads_equal(got: dict, want: dict, rtol=1e-9, atol=1e-12):
    assert got.keys() == want.keys()
    assert any(v is not None and v.abs().max() > 0 for v in want.values())
    for n in want:
        if want[n] is None:
            assert got[n] is None or got[n].abs().max() == 0, n
            continue
        torch.testing.assert_close(got[n], want[n], rtol=rtol, atol=atol, msg=n)


@pytest.mark.parametrize("name,checkpointing,loss", [("clip-tiny", False, "clip"), ("msclip-tiny", False, "clip"),
                                                     ("msclip-tiny", True, "clip"), ("msclip-tiny", False, "siglip")])
def test_exact_k4_b8_equals_one_batch_of_32(name, checkpointing, loss):
    """SigLIP too: its loss and the gradients of the scale and the learned logit bias over all
    32 x 32 pairs (the bias's share of the cached-gradient surrogate is split over the K
    backward passes like the scale's)."""
    g = torch.Generator().manual_seed(1)
    full = _batch(32, g)
    big = _engine(name, 1, loss=loss)
    rec_big = _Grads(big)
    ref = independent_step(big, [full], step=1)

    acc = _engine(name, 4, loss=loss)
    acc.model.set_grad_checkpointing(checkpointing)
    rec_acc = _Grads(acc)
    got = exact_step(acc, _split(full, 4), step=1)

    assert got.loss == pytest.approx(ref.loss, rel=1e-12)
    assert got.loss > 1.0  # ln(32) ~ 3.47 (clip), ~10 (siglip) at init: the loss really spans all 32 pairs
    _assert_grads_equal(rec_acc.grads, rec_big.grads)
    assert rec_acc.grads["logit_scale"].abs() > 0
    if loss == "siglip":
        assert isinstance(acc.loss_fn, SigLipLoss)
        assert rec_acc.grads["logit_bias"].abs() > 0 and got.bias == pytest.approx(ref.bias, rel=1e-12)
    else:
        assert "logit_bias" not in rec_acc.grads and got.bias is None


@pytest.mark.parametrize("loss", ["clip", "siglip"])
def test_independent_accumulation_is_the_mean_of_separate_losses(loss):
    g = torch.Generator().manual_seed(2)
    micro = [_batch(4, g) for _ in range(3)]
    eng = _engine("clip-tiny", 3, loss=loss)
    _Grads(eng)
    got = train_step(eng, micro, "independent", step=1)
    loss_fn = SigLipLoss() if loss == "siglip" else ClipLoss()
    with torch.no_grad():
        want = [loss_fn(*eng.model(b["image"], b["text"], text_lengths=b["text_lengths"])).item() for b in micro]
    assert got.loss == pytest.approx(sum(want) / 3, rel=1e-12)
    assert got.loss < train_step(eng, micro, "exact", step=1).loss  # fewer negatives, lower loss


def test_one_micro_batch_runs_once():
    eng = _engine("clip-tiny", 1)
    _Grads(eng)
    calls = []
    real = eng.forward
    eng.forward = lambda b: calls.append(torch.is_grad_enabled()) or real(b)
    train_step(eng, [_batch(4, torch.Generator().manual_seed(3))], "exact", step=1)
    assert calls == [True]  # K = 1: no cached pass, the plain step


def test_batchnorm_semantics_msclip_s():
    """Per-micro-batch batch statistics in both passes, running statistics updated once per
    micro-batch: the gradient of the loss over the concatenated features of separately
    normalized micro-batches, and the running stats of independent accumulation."""
    g = torch.Generator().manual_seed(4)
    micro = [_batch(3, g) for _ in range(3)]
    acc = _engine("msclip-s-tiny", 3)
    bns = [m for m in acc.model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    assert bns, "msclip-s-tiny has BatchNorm in its stem / branch"
    rec = _Grads(acc)
    got = exact_step(acc, micro, step=1)

    ref = _engine("msclip-s-tiny", 3)
    feats = [ref.model(b["image"], b["text"], text_lengths=b["text_lengths"]) for b in micro]
    img = torch.cat([f[0] for f in feats])
    txt = torch.cat([f[1] for f in feats])
    loss = ClipLoss()(img, txt, feats[0][2])
    loss.backward()
    assert got.loss == pytest.approx(loss.item(), rel=1e-12)
    _assert_grads_equal(rec.grads, {n: p.grad for n, p in ref.model.named_parameters()})

    ind = _engine("msclip-s-tiny", 3)
    _Grads(ind)
    independent_step(ind, micro, step=1)
    ref_bns = [m for m in ind.model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    for a, b in zip(bns, ref_bns):
        assert int(a.num_batches_tracked) == int(b.num_batches_tracked) == 3
        torch.testing.assert_close(a.running_mean, b.running_mean, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(a.running_var, b.running_var, rtol=1e-12, atol=1e-14)


def test_both_passes_see_the_same_features_even_with_randomness():
    """No forward draws random numbers today; one that did (dropout) must replay identically
    in the second pass. The first pass's RNG state is restored before each second pass."""
    eng = _engine("msclip-tiny", 3)
    _Grads(eng)
    seen = []
    real = eng.forward

    def noisy(batch):
        img, txt, scale = real(batch)
        img = img + 1e-3 * torch.randn_like(img)  # a stand-in for dropout
        seen.append((torch.is_grad_enabled(), img.detach().clone(), txt.detach().clone()))
        return img, txt, scale

    eng.forward = noisy
    micro = [_batch(5, torch.Generator().manual_seed(s)) for s in (5, 6, 7)]
    exact_step(eng, micro, step=1)
    # micro-batch 0 keeps its graph (one pass); 1 and 2 are cached, then recomputed
    assert [s[0] for s in seen] == [True, False, False, True, True]
    for first, second in ((1, 3), (2, 4)):
        assert torch.equal(seen[first][1], seen[second][1]) and torch.equal(seen[first][2], seen[second][2])


def test_loss_without_feature_gradients_is_refused():
    eng = _engine("clip-tiny", 2)
    _Grads(eng)
    micro = [_batch(4, torch.Generator().manual_seed(s)) for s in (7, 8)]

    eng.loss_fn = lambda img, txt, scale: (img.detach() @ txt.detach().T).mean() * 0 + scale.sum()
    with pytest.raises(ValueError, match="accum-mode exact.*image features, text features"):
        exact_step(eng, micro, step=1)
    eng.loss_fn = lambda img, txt, scale: torch.tensor(1.0, dtype=torch.float64)
    with pytest.raises(ValueError, match="accum-mode exact.*without a graph"):
        exact_step(eng, micro, step=1)
    assert all(p.grad is None for p in eng.model.parameters())


def test_non_finite_accumulated_loss_stops_before_backward():
    eng = _engine("clip-tiny", 2)
    rec = _Grads(eng)
    micro = [_batch(4, torch.Generator().manual_seed(s)) for s in (9, 10)]
    micro[1]["image"][0] = float("nan")
    with pytest.raises(NonFiniteLossError, match="at step 7") as info:
        exact_step(eng, micro, step=7, last_checkpoint="runs/x/checkpoints/step_00000006")
    assert info.value.step == 7 and "step_00000006" in str(info.value)
    assert rec.grads is None and all(p.grad is None for p in eng.model.parameters())


def _shard(path, n: int) -> None:
    """One WebDataset shard of ``n`` small PNG + caption samples."""
    import io
    import tarfile

    from PIL import Image

    path.mkdir(parents=True)
    with tarfile.open(path / "000000.tar", "w") as tar:
        for i in range(n):
            buf = io.BytesIO()
            Image.new("RGB", (16, 16), (i * 10 % 255, 50, 100)).save(buf, format="PNG")
            for ext, payload in (("png", buf.getvalue()), ("txt", f"a picture number {i}".encode())):
                info = tarfile.TarInfo(f"{i:06d}.{ext}")
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))


def test_partial_group_is_dropped_and_logged(tmp_path, caplog):
    """12 micro-batches of 2 per epoch, --accum-steps 5: 2 steps per epoch, and the last 2
    micro-batches of each epoch are dropped (and said to be) rather than stepped on. (No
    manifest: the loader's length is unknown, so only the loop can tell.)"""
    from msclip_fast.training import main

    _shard(tmp_path / "data", 24)
    run = tmp_path / "run"
    with caplog.at_level(logging.INFO, logger="msclip_fast"):
        summary = main(["--model", "clip-tiny", "--train-data", str(tmp_path / "data"), "--batch-size", "2",
                        "--accum-steps", "5", "--epochs", "2", "--max-steps", "100", "--warmup", "1", "--no-progress",
                        "--output", str(run)])
    assert summary["status"] == "finished" and summary["steps"] == 4 and summary["epochs_completed"] == 2
    assert summary["contrastive_batch"] == 10 and summary["accum_mode"] == "exact"
    text = caplog.text
    assert "contrastive batch: 10 pairs per loss (exact accumulation" in text
    assert text.count("dropped a partial group of 2 micro-batch(es)") == 2  # once per epoch
