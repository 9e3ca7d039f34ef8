"""Exact (GradCache) accumulation across 2 data-parallel ranks equals one process on the whole batch.

1. Step-function level, float64, 2 gloo ranks without DeepSpeed: ``exact_step`` with K=2
   micro-batches of 4 per rank, parameter gradients averaged over ranks (what DDP / DeepSpeed
   do), gives the loss and every parameter gradient (``logit_scale`` included) of one process
   on the 16 samples, with and without ``local_loss``, for clip-tiny and msclip-tiny.
   ``independent_step`` on the same data must not (the comparison can tell the two apart).
   ``--loss siglip`` (the engine's SigLipLoss, clip-tiny, exact): loss and every gradient,
   ``logit_bias`` included, of the one-process SigLipLoss on the 16 samples.
2. Through the real ``deepspeed`` launcher, ZeRO-2 fp32, ``--accum-steps 2 --batch-size 4`` on
   2 ranks: loss curve, step-1 pre-clip grad norm and step-1 weights equal the plain engine's
   ``--batch-size 16`` run.
3. ``--accum-mode independent`` on the same setup: its step-1 loss is the mean of the two
   8-pair micro-batch losses (not the 16-pair loss), same number of optimizer steps and the
   same per-step learning rates as the plain run (DeepSpeed's boundary falls after exactly
   ``accum_steps`` backward passes).
4. ZeRO-3 + ``--grad-checkpointing`` + exact K=2 on 2 ranks, with a resume mid-run: the
   stage-3 case of test_zero.py (its loss curve equals the plain run's).

Data alignment (checked by ``first_batch``): the loader deals sample i of the epoch stream to
rank ``i % world_size`` with the same order and augmentation for every batch size and world
size, so rank r's two micro-batches of 4 are samples ``r, r+2, ..., r+14`` of the stream and
together the 16 samples of the single-process ``--batch-size 16`` step; the contrastive loss is
invariant to a joint permutation of its pairs, so the rank-order concatenation gives the same
loss.
"""
import json
import math
import os
import socket
import sys
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:  # _ds_launch, and this module in the spawned ranks
    sys.path.insert(0, str(HERE))

from _ds_launch import launch as _launch, losses as _losses  # noqa: E402

MODELS = ("clip-tiny", "msclip-tiny")
B, K, WORLD = 4, 2, 2  # per-rank micro-batch, micro-batches per step, ranks
N = B * K * WORLD  # 16 samples per optimizer step
SOT, EOT, CTX = 49406, 49407, 77
SEED = 0
STEPS = 3  # launcher runs (test 4: 2)


# ---------------------------------------------------------------- 1. step-function level, fp64


def _problem(dtype=torch.float64):
    """16 samples (the order of one single-process batch): images, tokens with EOT, lengths."""
    from msclip_fast.modules import text_lengths

    g = torch.Generator().manual_seed(1234)
    images = torch.randn(N, 3, 64, 64, generator=g, dtype=dtype)
    tokens = torch.zeros(N, CTX, dtype=torch.int64)
    for i in range(N):
        n = int(torch.randint(1, 20, (1,), generator=g))
        tokens[i, 0] = SOT
        tokens[i, 1:1 + n] = torch.randint(1, 49000, (n,), generator=g)
        tokens[i, 1 + n] = EOT
    return {"image": images, "text": tokens, "text_lengths": text_lengths(tokens)}


def _select(batch, idx):
    return {k: v[idx] for k, v in batch.items()}


def _rank_micro(batch, rank):
    """Rank ``rank``'s K micro-batches as the loader deals them: samples i with i % WORLD == rank."""
    mine = [i for i in range(N) if i % WORLD == rank]
    return [_select(batch, torch.tensor(mine[k * B:(k + 1) * B])) for k in range(K)]


SIGLIP_INIT = {"logit_scale_init": math.log(10), "logit_bias_init": -10.0}  # train.py --loss siglip's


def _model(name, loss="clip"):
    import msclip_fast as mf

    torch.manual_seed(SEED)  # the same init on every rank and in the reference
    model = mf.create_model(name, **(SIGLIP_INIT if loss == "siglip" else {})).double()
    model.train()
    return model


def _engine(model, rank, world_size, local_loss, loss="clip"):
    """A TorchEngine on rank ``rank`` of ``world_size`` whose step() averages .grad over ranks
    (DDP / DeepSpeed) and records it instead of updating."""
    import torch.distributed as dist

    from msclip_fast.losses import ClipLoss
    from msclip_fast.training.config import TrainConfig
    from msclip_fast.training.engine import TorchEngine, make_loss

    class RankEngine(TorchEngine):
        def step(self):
            grads = {}
            for n, p in self.model.named_parameters():
                g = p.grad if p.grad is not None else torch.zeros_like(p)  # same collectives on every rank
                dist.all_reduce(g)
                grads[n] = (g / self.world_size).detach().clone()
            self.recorded.append(grads)
            self.optimizer.zero_grad(set_to_none=True)
            return float(torch.sqrt(sum((g * g).sum() for g in grads.values())))

    cfg = TrainConfig(accum_steps=K, local_loss=local_loss, world_size=world_size, loss=loss)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    eng = RankEngine(model, opt, sched, cfg, torch.device("cpu"))
    eng.rank, eng.world_size = rank, world_size
    eng.loss_fn = make_loss(cfg, rank, world_size)
    assert loss == "siglip" or isinstance(eng.loss_fn, ClipLoss)
    eng.recorded = []
    return eng


def _reference(name, batch, loss_name="clip"):
    """One process, fused world-1 ClipLoss (or SigLipLoss) on all 16 samples: (loss, {param: grad})."""
    from msclip_fast.losses import ClipLoss, SigLipLoss

    model = _model(name, loss_name)
    out = model(batch["image"], batch["text"], text_lengths=batch["text_lengths"])
    loss = (SigLipLoss() if loss_name == "siglip" else ClipLoss())(*out)
    loss.backward()
    grads = {n: (p.grad if p.grad is not None else torch.zeros_like(p)) for n, p in model.named_parameters()}
    return float(loss.detach()), grads


def _grad_mismatch(got, ref):
    """None when every parameter gradient matches in fp64, else the first mismatch's message."""
    try:
        assert set(got) == set(ref)
        for n in ref:
            torch.testing.assert_close(got[n], ref[n], rtol=1e-9, atol=1e-11, msg=lambda m, n=n: f"{n}: {m}")
    except AssertionError as e:
        return str(e)[:2000]
    return None


def _rank_worker(rank, port, out_path):
    import torch.distributed as dist

    from msclip_fast.training.step import exact_step, independent_step

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        batch = _problem()
        micro = _rank_micro(batch, rank)
        report = {}
        for name in MODELS:
            ref = _reference(name, batch) if rank == 0 else None
            for local_loss in (False, True):
                for mode, fn in (("exact", exact_step), ("independent", independent_step)):
                    if mode == "independent" and local_loss:
                        continue
                    eng = _engine(_model(name), rank, WORLD, local_loss)
                    result = fn(eng, micro, step=1)
                    (grads,) = eng.recorded
                    if rank == 0:
                        ref_loss, ref_grads = ref
                        report[(name, local_loss, mode)] = {
                            "loss": result.loss, "ref_loss": ref_loss, "grad_norm": result.grad_norm,
                            "ref_grad_norm": float(torch.sqrt(sum((g * g).sum() for g in ref_grads.values()))),
                            "logit_scale_grad": float(grads["logit_scale"]),
                            "ref_logit_scale_grad": float(ref_grads["logit_scale"]),
                            "grad_mismatch": _grad_mismatch(grads, ref_grads),
                        }
        ref = _reference("clip-tiny", batch, "siglip") if rank == 0 else None
        eng = _engine(_model("clip-tiny", "siglip"), rank, WORLD, False, loss="siglip")
        result = exact_step(eng, micro, step=1)
        (grads,) = eng.recorded
        if rank == 0:
            ref_loss, ref_grads = ref
            report["siglip"] = {"loss": result.loss, "ref_loss": ref_loss,
                                "grad_mismatch": _grad_mismatch(grads, ref_grads),
                                "logit_bias_grad": float(grads["logit_bias"]),
                                "ref_logit_bias_grad": float(ref_grads["logit_bias"])}
            torch.save(report, out_path)
        dist.barrier()  # tear gloo down together
    finally:
        dist.destroy_process_group()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def two_rank_report(tmp_path_factory):
    """Both models x local_loss (x independent) on 2 spawned gloo ranks, one spawn for all."""
    import torch.multiprocessing as mp

    out = tmp_path_factory.mktemp("exact_dist") / "report.pt"
    ctx = mp.get_context("spawn")
    port = _free_port()
    old = os.environ.get("OMP_NUM_THREADS")
    os.environ["OMP_NUM_THREADS"] = "1"  # inherited by the spawned ranks
    try:
        procs = [ctx.Process(target=_rank_worker, args=(r, port, str(out))) for r in range(WORLD)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(timeout=600)
    finally:
        if old is None:
            os.environ.pop("OMP_NUM_THREADS", None)
        else:
            os.environ["OMP_NUM_THREADS"] = old
    for p in procs:
        if p.is_alive():
            p.kill()
        assert p.exitcode == 0, f"rank process exit code {p.exitcode}"
    return torch.load(out, weights_only=False)


@pytest.mark.slow
@pytest.mark.parametrize("local_loss", [False, True], ids=["full_loss", "local_loss"])
@pytest.mark.parametrize("name", MODELS)
def test_two_rank_exact_step_equals_full_batch_fp64(two_rank_report, name, local_loss):
    r = two_rank_report[(name, local_loss, "exact")]
    assert r["loss"] == pytest.approx(r["ref_loss"], rel=1e-12)
    assert r["grad_mismatch"] is None, r["grad_mismatch"]
    assert r["grad_norm"] == pytest.approx(r["ref_grad_norm"], rel=1e-9)
    assert r["logit_scale_grad"] == pytest.approx(r["ref_logit_scale_grad"], rel=1e-9, abs=1e-12)
    assert r["logit_scale_grad"] != 0.0


@pytest.mark.slow
def test_two_rank_exact_siglip_equals_full_batch_fp64(two_rank_report):
    r = two_rank_report["siglip"]
    assert r["loss"] == pytest.approx(r["ref_loss"], rel=1e-12)
    assert r["grad_mismatch"] is None, r["grad_mismatch"]
    assert r["logit_bias_grad"] == pytest.approx(r["ref_logit_bias_grad"], rel=1e-9) and r["logit_bias_grad"] != 0.0


@pytest.mark.slow
@pytest.mark.parametrize("name", MODELS)
def test_two_rank_independent_step_is_not_full_batch(two_rank_report, name):
    """The comparison above has power: 8-pair losses give another loss and other gradients."""
    r = two_rank_report[(name, False, "independent")]
    assert abs(r["loss"] - r["ref_loss"]) > 0.1
    assert r["grad_mismatch"] is not None
    assert abs(r["grad_norm"] - r["ref_grad_norm"]) > 1e-3 * r["ref_grad_norm"]


# ---------------------------------------------------------------- 2-4. the real launcher


@pytest.fixture(scope="module")
def first_batch(digits_shards):
    """The data premise of tests 2-4, checked, and the init model's step-1 losses.

    Returns ``{"exact": loss of the 16 samples, "independent": mean of the losses of samples
    0-7 and 8-15, "init": state_dict}`` of the initial msclip-tiny, built as ``main`` builds it
    (seeded with --seed 0).
    """
    from msclip_fast.data import build_loader
    from msclip_fast.losses import ClipLoss
    from msclip_fast.models import create_model
    from msclip_fast.training.main import seed_everything

    seed_everything(SEED)
    model = create_model("msclip-tiny")
    kw = dict(train=True, image_size=model.image_size, mean=model.image_mean, std=model.image_std, seed=SEED)
    url = str(digits_shards / "train")
    one = next(iter(build_loader(url, N, **kw)))
    per_rank = []
    for r in range(WORLD):
        it = iter(build_loader(url, B, rank=r, world_size=WORLD, **kw))
        per_rank.append([next(it) for _ in range(K)])
    # rank r's micro-batch k holds stream samples WORLD*(B*k + j) + r, j < B
    for r in range(WORLD):
        for k in range(K):
            idx = [WORLD * (B * k + j) + r for j in range(B)]
            assert per_rank[r][k]["key"] == [one["key"][i] for i in idx]
            torch.testing.assert_close(per_rank[r][k]["image"], one["image"][idx], rtol=0, atol=0)
            assert torch.equal(per_rank[r][k]["text"], one["text"][idx])
    loss_fn = ClipLoss()
    with torch.no_grad():
        img, txt, scale = model(one["image"], one["text"], text_lengths=one["text_lengths"])
        exact = float(loss_fn(img, txt, scale))
        half = [float(loss_fn(img[s], txt[s], scale)) for s in (slice(0, N // 2), slice(N // 2, N))]
    init = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return {"exact": exact, "independent": sum(half) / 2, "init": init}


def _metrics(run: Path) -> list[dict]:
    return [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines() if l.strip()]


def _model_pt(run: Path, step: int) -> dict:
    return torch.load(run / "checkpoints" / f"step_{step:08d}" / "model.pt", weights_only=True)


@pytest.fixture(scope="module")
def plain16(digits_shards, tmp_path_factory):
    """Plain engine, one process, --batch-size 16, 3 steps, a checkpoint after each."""
    from msclip_fast.training import main

    run = tmp_path_factory.mktemp("plain16")
    main(["--model", "msclip-tiny", "--train-data", str(digits_shards / "train"), "--batch-size", str(N),
          "--warmup", "3", "--no-progress", "--output", str(run), "--max-steps", str(STEPS), "--save-every", "1"])
    return run


@pytest.fixture(scope="module")
def zero2_exact(digits_shards, tmp_path_factory):
    run = tmp_path_factory.mktemp("zero2_exact") / "run"
    wall = _launch(["--ds_config", "configs/ds/zero2.json", "--model", "msclip-tiny",
                    "--train-data", str(digits_shards / "train"), "--batch-size", str(B), "--accum-steps", str(K),
                    "--warmup", "3", "--no-progress", "--output", str(run), "--max-steps", str(STEPS),
                    "--save-every", "1"])
    print(f"ZeRO-2 exact K={K}: {wall:.1f}s")
    return run


# Weights after step 1. Both runs clip (pre-clip norm ~24 > 1) and then take AdamW's first step,
# which moves each element by lr * g_c / (|g_c| + eps) (g_c: the clipped gradient, eps 1e-6)
# plus the same decoupled weight decay: at most lr in size, whatever the gradient's scale. The
# fp32 gradients of the two runs differ by up to ~1e-6 x the tensor's largest element (other
# summation orders: per-rank micro-batches, the surrogate backward, the all-reduce; measured at
# the step-function level in fp32), i.e. |dg_c| <~ 1e-7 after clipping. The step's sensitivity
# to g_c peaks at |g_c| = eps, at lr / (4 eps), so an element can move by up to ~0.02 lr
# (measured: 0.004 lr). Per element: atol lr / 10 (5x that bound) still flags a missing or
# sign-flipped gradient on any element with |g_c| >~ eps / 5 (a jump of ~lr or 2 lr). Over the
# whole model: the update (step-1 weights minus the initial ones) agrees to 1e-4 in relative
# L2 norm (measured 7e-6), which a wrong gradient on any sizable part of the model breaks. A
# gradient *scale* error, hidden by the sign-like first step, shows in the grad_norm check.
W_ELEMENT_LR_FRACTION, W_UPDATE_RTOL = 0.1, 1e-4


@pytest.mark.slow
def test_zero2_exact_accumulation_equals_plain_batch16(plain16, zero2_exact, first_batch):
    ref, got = _metrics(plain16), _metrics(zero2_exact)
    assert len(got) == len(ref) == STEPS
    torch.testing.assert_close(torch.tensor([m["loss"] for m in got]), torch.tensor([m["loss"] for m in ref]),
                               rtol=1e-5, atol=1e-6)
    assert got[0]["loss"] == pytest.approx(first_batch["exact"], rel=1e-5)  # the 16-pair loss of the init model
    assert ref[0]["grad_norm"] > 1.0  # clipping is active at step 1: the pre-clip norm is what both log
    assert got[0]["grad_norm"] == pytest.approx(ref[0]["grad_norm"], rel=1e-5)
    assert [m["lr"] for m in got] == pytest.approx([m["lr"] for m in ref], rel=1e-12)
    summary = json.loads((zero2_exact / "summary.json").read_text())
    assert (summary["zero_stage"], summary["world_size"], summary["global_batch"],
            summary["contrastive_batch"], summary["accum_mode"], summary["steps"]) == (2, WORLD, N, N, "exact", STEPS)
    w_ref, w_got, w0 = _model_pt(plain16, 1), _model_pt(zero2_exact, 1), first_batch["init"]
    assert set(w_got) == set(w_ref) == set(w0)
    lr1 = ref[0]["lr"]
    for n, v in w_ref.items():
        torch.testing.assert_close(w_got[n], v, rtol=0, atol=W_ELEMENT_LR_FRACTION * lr1,
                                   msg=lambda m, n=n: f"{n}: {m}")
    names = [n for n in w0 if w0[n].is_floating_point()]
    u_ref = torch.cat([(w_ref[n] - w0[n]).flatten() for n in names])
    u_got = torch.cat([(w_got[n] - w0[n]).flatten() for n in names])
    assert u_ref.abs().max() > 0.5 * lr1  # the step moved the weights (by up to ~lr per element)
    assert float((u_got - u_ref).norm() / u_ref.norm()) < W_UPDATE_RTOL


@pytest.mark.slow
def test_zero2_independent_accumulation_steps_and_lr(digits_shards, tmp_path, plain16, zero2_exact, first_batch):
    run = tmp_path / "zero2_independent"
    wall = _launch(["--ds_config", "configs/ds/zero2.json", "--model", "msclip-tiny",
                    "--train-data", str(digits_shards / "train"), "--batch-size", str(B), "--accum-steps", str(K),
                    "--accum-mode", "independent", "--warmup", "3", "--no-progress", "--output", str(run),
                    "--max-steps", str(STEPS)])
    print(f"ZeRO-2 independent K={K}: {wall:.1f}s")
    got, exact, ref = _metrics(run), _metrics(zero2_exact), _metrics(plain16)
    assert all(torch.isfinite(torch.tensor([m["loss"] for m in got + exact])))
    # step 1: the mean of the two 8-pair micro-batch losses, not the 16-pair loss
    assert got[0]["loss"] == pytest.approx(first_batch["independent"], rel=1e-5)
    assert abs(got[0]["loss"] - exact[0]["loss"]) > 1e-3
    assert abs(first_batch["independent"] - first_batch["exact"]) > 1e-3
    # one optimizer (and scheduler) step per K backward passes: the plain run's steps and lrs
    summaries = [json.loads((r / "summary.json").read_text()) for r in (run, zero2_exact, plain16)]
    assert [s["steps"] for s in summaries] == [STEPS] * 3
    assert summaries[0]["contrastive_batch"] == B * WORLD and summaries[0]["global_batch"] == N
    assert [m["step"] for m in got] == [m["step"] for m in ref] == list(range(1, STEPS + 1))
    assert [m["lr"] for m in got] == pytest.approx([m["lr"] for m in ref], rel=1e-12)
    assert [m["lr_share"] for m in got] == pytest.approx([m["lr_share"] for m in ref], rel=1e-12)
    assert len({m["lr"] for m in ref}) == STEPS  # warmup then decay: a shifted schedule would show


# ZeRO-3 with exact accumulation, --grad-checkpointing and a resume mid-run: test_zero.py's stage-3 case.
