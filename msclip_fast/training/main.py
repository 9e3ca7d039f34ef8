"""The training loop behind ``train.py``: ``main(argv=None)`` (callable from tests).

One optimizer step = ``--accum-steps`` micro-batches of ``--batch-size`` per rank. Every step all
ranks agree (one all-reduce) whether any of them ran out of batches, so uneven shards end the
epoch together instead of deadlocking. The loader is deterministic per (seed, epoch), so a
resumed run skips the consumed batches of its epoch and continues exactly.
"""
from __future__ import annotations

import json
import logging
import math
import os
import random
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from .checkpoint import load_checkpoint, resolve_checkpoint, save_checkpoint
from .engine import (DeepSpeedEngine, TorchEngine, dist_ready, pick_device, promote_scalar_params,
                     resolve_ds_config, use_deepspeed)
from .optim import create_optimizer
from .params import parse_args
from .schedule import create_scheduler

logger = logging.getLogger("msclip_fast.training")


class NonFiniteLossError(FloatingPointError):
    """The loss became NaN/inf; ``step`` is the 1-based optimizer step that produced it."""

    def __init__(self, step: int, value: float, checkpoint: str | None):
        self.step = step
        super().__init__(f"non-finite loss {value} at step {step}; stopped without saving "
                         f"(last good checkpoint: {checkpoint or 'none'})")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _setup_logging(rank: int) -> None:
    level = logging.INFO if rank == 0 else logging.WARNING
    root = logging.getLogger()
    if not root.handlers:
        logging.basicConfig(level=level, format=f"%(asctime)s [rank{rank}] %(levelname)s %(name)s: %(message)s")
    logging.getLogger("msclip_fast").setLevel(level)


def _model_overrides(args) -> dict:
    o = {}
    if args.packed is not None:
        o["packed"] = args.packed
    if args.image_size is not None:
        o["vision"] = {"image_size": args.image_size}
    return o


def _loader_len(loader) -> int | None:
    try:
        return len(loader)
    except TypeError:
        return None


def _gather_skipped(loader, world_size: int) -> dict:
    """Skip counts per reason summed over ranks (collective when distributed)."""
    mine = dict(getattr(loader, "skipped", {}) or {})
    if world_size > 1 and dist_ready():
        parts = [None] * world_size
        dist.all_gather_object(parts, mine)
    else:
        parts = [mine]
    total: dict[str, int] = {}
    for p in parts:
        for k, v in p.items():
            total[k] = total.get(k, 0) + int(v)
    return total


def _next_group(it, n: int) -> list:
    out = []
    for _ in range(n):
        b = next(it, None)
        if b is None:
            break
        out.append(b)
    return out


class _RunFiles:
    """metrics.jsonl / summary.json of the run dir, written by rank 0 only."""

    def __init__(self, run_dir: Path, rank: int, resume_step: int | None):
        self.rank = rank
        self.run_dir = run_dir
        self.metrics = run_dir / "metrics.jsonl"
        if rank != 0:
            return
        run_dir.mkdir(parents=True, exist_ok=True)
        if resume_step is None:
            self.metrics.write_text("")
        elif self.metrics.exists():  # drop rows logged after the checkpoint we resume from
            rows = [l for l in self.metrics.read_text().splitlines() if l.strip()]
            keep = [l for l in rows if json.loads(l).get("step", 0) <= resume_step]
            self.metrics.write_text("".join(l + "\n" for l in keep))

    def log(self, row: dict) -> None:
        if self.rank == 0:
            with open(self.metrics, "a") as f:
                f.write(json.dumps(row) + "\n")

    def summary(self, summary: dict) -> None:
        if self.rank == 0:
            tmp = self.run_dir / ".summary.json.tmp"
            tmp.write_text(json.dumps(summary, indent=2))
            os.replace(tmp, self.run_dir / "summary.json")


def _single_process_env() -> None:
    """``python train.py --ds_config ...`` without a launcher: one rank on a free loopback
    port (DeepSpeed would otherwise look for MPI to discover its rank)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for key, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"),
                       ("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", str(port))):
        os.environ.setdefault(key, value)


def main(argv=None) -> dict:
    """Train; returns the summary dict (also written to ``OUTPUT/summary.json``).

    Raises:
        ValueError: bad flags or inputs. NonFiniteLossError: the loss became NaN/inf.
    """
    args = parse_args(argv)
    # torch's own all_gather on gloo calls its deprecated all_gather_into_tensor once per step
    warnings.filterwarnings("ignore", message=r".*all_gather_into_tensor. is deprecated")
    distributed = use_deepspeed(args)
    if distributed:
        import deepspeed

        if "RANK" not in os.environ:
            _single_process_env()
        deepspeed.init_distributed()
        rank, world_size = dist.get_rank(), dist.get_world_size()
        local_rank = int(os.environ.get("LOCAL_RANK", args.local_rank if args.local_rank >= 0 else 0))
    else:
        rank, world_size, local_rank = 0, 1, 0
    _setup_logging(rank)
    try:
        summary = _train(args, rank, world_size, local_rank, distributed)
        if dist_ready():
            # leave together: a rank that tears gloo down while its peer still finishes the
            # last checkpoint's collectives has aborted at exit ("terminate called ...")
            dist.barrier()
        return summary
    finally:
        if dist_ready():
            dist.destroy_process_group()


def _train(args, rank: int, world_size: int, local_rank: int, distributed: bool) -> dict:
    from ..data import build_loader
    from ..models import create_model

    t_start = time.time()
    device = pick_device(local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)  # collectives (all_gather_object) use the current device
    run_dir = Path(args.output)
    if not args.resume and (run_dir / "checkpoints" / "latest").exists():
        raise ValueError(f"--output {run_dir} already holds a run (checkpoints/latest); pass --resume {run_dir} "
                         "to continue it, or choose a new --output")
    ds_config = resolve_ds_config(args.ds_config, args, world_size, device.type) if distributed else None
    if not distributed:
        args.precision = args.precision or ("bf16" if device.type == "cuda" else "fp32")  # see --precision
        if args.precision == "fp16" and device.type == "cpu":
            raise ValueError("--precision fp16 needs a CUDA device (no fp16 training on the CPU); use bf16")

    seed_everything(args.seed)  # same init on every rank
    model = create_model(args.model, **_model_overrides(args))
    if args.lock_image:
        model.lock_image_tower()
    if args.lock_text:
        model.lock_text_tower()
    model.to(device)
    seed_everything(args.seed + rank)

    loader = build_loader(
        args.train_data, args.batch_size, train=True, image_size=model.image_size, mean=model.image_mean,
        std=model.image_std, rank=rank, world_size=world_size, seed=args.seed, epoch=0,
        backend=args.data_backend, num_workers=args.workers,
    )
    n_batches = _loader_len(loader)
    steps_per_epoch = None if n_batches is None else n_batches // args.accum_steps
    if steps_per_epoch is not None:
        if steps_per_epoch < 1:
            raise ValueError(f"--train-data {args.train_data!r} gives {n_batches} full batches of --batch-size "
                             f"{args.batch_size} per rank, fewer than --accum-steps {args.accum_steps}: "
                             "lower --batch-size or add data")
        total_steps = args.epochs * steps_per_epoch
    elif args.max_steps:
        total_steps = args.max_steps
    else:
        raise ValueError(f"--train-data {args.train_data!r} has no manifest (unknown length): pass --max-steps")
    stop_at = min(total_steps, args.max_steps) if args.max_steps else total_steps

    scalar_names = promote_scalar_params(model) if distributed else []
    optimizer = create_optimizer(model, args)
    scheduler = create_scheduler(optimizer, args.warmup, total_steps)
    if distributed:
        engine = DeepSpeedEngine(model, optimizer, scheduler, args, ds_config, rank, world_size, device,
                                 scalar_names=scalar_names)
    else:
        engine = TorchEngine(model, optimizer, scheduler, args, device)

    step, epoch, skip = 0, 0, 0
    last_ckpt = None
    global_batch = args.batch_size * args.accum_steps * world_size
    if args.resume:
        meta = load_checkpoint(args.resume, engine, expect={
            "model": (args.model, "--model"),
            "global_batch": (global_batch, "--batch-size x --accum-steps x ranks")})
        step, epoch, skip = int(meta["step"]), int(meta["epoch"]), int(meta["batch"])
        last_ckpt = meta["path"]
        if step >= stop_at:
            raise ValueError(f"--resume {args.resume}: its checkpoint is at step {step}, already at or past "
                             f"the end of this run (step {stop_at}); raise --max-steps or --epochs")
    files = _RunFiles(run_dir, rank, step if args.resume else None)
    if rank == 0:
        (run_dir / "args.json").write_text(json.dumps(vars(args), indent=2, default=str))
    engine.barrier()

    logger.info("engine %s (ZeRO %s), %d rank(s), precision %s, %s steps/epoch, schedule %d steps, stop at %d",
                engine.kind, engine.zero_stage, world_size, args.precision, steps_per_epoch, total_steps, stop_at)
    meta_common = {"engine": engine.kind, "zero_stage": engine.zero_stage, "world_size": world_size,
                   "precision": args.precision, "model": args.model, "global_batch": global_batch}

    def checkpoint(batch_in_epoch: int, ep: int) -> str:
        path = save_checkpoint(run_dir, step, engine, model.config.to_dict(),
                               {"epoch": ep, "batch": batch_in_epoch, **meta_common})
        return str(path)

    progress = None
    if rank == 0 and not args.no_progress:
        from tqdm.auto import tqdm

        progress = tqdm(total=stop_at, initial=step, desc="train", unit="step", dynamic_ncols=True, file=sys.stderr)

    first_loss = last_loss = None
    t_log, steps_since_log = time.time(), 0
    t_train, steps_run = time.time(), 0
    saved_at = step if args.resume else None
    skipped_all = None  # summed over ranks at the end; this rank's counts if the run fails
    status = "running"
    batch_idx = skip
    engine.train(True)
    try:
        while epoch < args.epochs and step < stop_at:
            loader.set_epoch(epoch)
            it = iter(loader)
            batch_idx = len(_next_group(it, skip)) if skip else 0
            skip = 0
            while step < stop_at:
                micro = _next_group(it, args.accum_steps)
                if engine.any_rank(len(micro) < args.accum_steps):  # some rank ran out: end epoch together
                    break
                batch_idx += args.accum_steps
                losses, scale = [], None
                for b in micro:
                    loss, scale = engine.forward_loss(b)
                    value = engine.all_mean(loss)  # every rank sees the same value -> same decision
                    if not math.isfinite(value):
                        raise NonFiniteLossError(step + 1, value, last_ckpt)
                    losses.append(value)
                    engine.backward(loss)
                lrs = engine.lrs()  # the rates this step trains with (step() advances the schedule)
                grad_norm = engine.step()
                step += 1
                steps_run += 1
                steps_since_log += 1
                last_loss = sum(losses) / len(losses)
                first_loss = last_loss if first_loss is None else first_loss
                if progress is not None:
                    progress.update(1)
                    progress.set_postfix(loss=f"{last_loss:.4f}", epoch=epoch)
                if step % args.log_every == 0 or step == stop_at:
                    skipped = _gather_skipped(loader, world_size)
                    now = time.time()
                    shared = [v for k, v in lrs.items() if k.startswith("shared")]
                    plain = [v for k, v in lrs.items() if not k.startswith("shared")]
                    lr = plain[0] if plain else shared[0]
                    row = {
                        "step": step, "epoch": epoch, "loss": last_loss, "lr": lr,
                        "lr_share": shared[0] if shared else lr,
                        "logit_scale": math.log(float(scale)), "scale": float(scale),
                        "grad_norm": grad_norm,
                        "samples_per_s": steps_since_log * global_batch / max(now - t_log, 1e-9),
                        "skipped": skipped, "skipped_total": sum(skipped.values()),
                        "time": now - t_start,
                    }
                    files.log(row)
                    t_log, steps_since_log = now, 0
                if args.eval_every and args.val_data and step % args.eval_every == 0:
                    val = evaluate_loss(engine, model, args, rank, world_size)
                    files.log({"step": step, "epoch": epoch, "val_loss": val})
                    engine.train(True)
                if args.save_every and step % args.save_every == 0:
                    last_ckpt, saved_at = checkpoint(batch_idx, epoch), step
            else:
                break  # stop_at reached inside the epoch: keep the epoch/batch position
            epoch += 1
            batch_idx = 0
        if steps_per_epoch is not None and step >= total_steps:
            epoch, batch_idx = args.epochs, 0  # the schedule's last step closes the last epoch
        # position after the loop: mid-epoch (stopped by --max-steps) or the start of `epoch`
        final_batch = batch_idx if (step >= stop_at and epoch < args.epochs) else 0
        if saved_at != step:
            last_ckpt = checkpoint(final_batch, epoch)
        skipped_all = _gather_skipped(loader, world_size)  # collective: only on the normal path
        status = "finished"
    except BaseException as e:
        status = f"failed: {type(e).__name__}: {e}"
        raise
    finally:
        if progress is not None:
            progress.close()
        wall = time.time() - t_train
        summary = {
            "status": status, "steps": step, "epochs_completed": epoch, "steps_per_epoch": steps_per_epoch,
            "schedule_steps": total_steps, "first_loss": first_loss, "final_loss": last_loss,
            "samples_per_s": steps_run * global_batch / wall if steps_run and wall > 0 else None,
            "wall_s": time.time() - t_start, "world_size": world_size, "engine": engine.kind,
            "zero_stage": engine.zero_stage, "precision": args.precision, "model": args.model,
            "global_batch": global_batch,
            "skipped": skipped_all if skipped_all is not None else dict(getattr(loader, "skipped", {}) or {}),
            "last_checkpoint": last_ckpt, "run_dir": str(run_dir),
        }
        files.summary(summary)
    logger.info("done: %d steps, final loss %s, run dir %s", step, last_loss, run_dir)
    return summary


@torch.no_grad()
def evaluate_loss(engine, model, args, rank: int, world_size: int, max_batches: int | None = None) -> float:
    """Mean contrastive loss over ``--val-data`` (all ranks take part; ends together)."""
    from ..data import build_loader

    loader = build_loader(args.val_data, args.batch_size, train=False, image_size=model.image_size,
                          mean=model.image_mean, std=model.image_std, rank=rank, world_size=world_size,
                          seed=args.seed, backend=args.data_backend, num_workers=0, drop_last=True)
    engine.train(False)
    it, total, n = iter(loader), 0.0, 0
    while max_batches is None or n < max_batches:
        b = next(it, None)
        if engine.any_rank(b is None):
            break
        loss, _ = engine.forward_loss(b)
        total += engine.all_mean(loss)
        n += 1
    return total / n if n else float("nan")
