"""``train.py``'s entry: ``main(argv=None)`` (callable from tests) sets up one run and hands it
to :class:`~.loop.TrainLoop`.

Setup order: flags -> process group -> one frozen :class:`~.config.TrainConfig` (precision,
clipping and the DeepSpeed config resolved once) -> model (+ activation checkpointing) ->
loader -> optimizer, schedule, engine -> resume (:class:`~.loop.TrainState` from the
checkpoint) -> the loop -> the final checkpoint and ``summary.json``.
"""
from __future__ import annotations

import dataclasses
import json
import logging
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
from .config import TrainConfig
from .engine import DeepSpeedEngine, TorchEngine, dist_ready, pick_device, use_deepspeed
from .loop import TrainLoop, TrainState, gather_skipped
from .optim import create_optimizer
from .params import check_inputs, parse_args
from .run_files import RunFiles
from .scalar_params import promote_scalar_params
from .schedule import create_scheduler
from .step import NonFiniteLossError

__all__ = ["NonFiniteLossError", "check_run_dir", "evaluate_loss", "main", "quiet_dependency_noise", "seed_everything"]

logger = logging.getLogger("msclip_fast.training")


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


def _model_overrides(cfg: TrainConfig) -> dict:
    o = {}
    if cfg.packed is not None:
        o["packed"] = cfg.packed
    if cfg.image_size is not None:
        o["vision"] = {"image_size": cfg.image_size}
    if cfg.logit_scale_init is not None:
        o["logit_scale_init"] = cfg.logit_scale_init
    if cfg.logit_bias_init is not None:
        o["logit_bias_init"] = None if cfg.logit_bias_init == "none" else cfg.logit_bias_init
    return o


def _loader_len(loader) -> int | None:
    try:
        return len(loader)
    except TypeError:
        return None


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


class _DropRecord(logging.Filter):
    """Drops the records of one logger whose unformatted message starts with ``prefix``."""

    def __init__(self, prefix: str):
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefix)


_CPP_EXTENSION_LOGGER = "torch.utils.cpp_extension"
_NO_CUDA_RUNTIME = "No CUDA runtime is found"


def quiet_dependency_noise() -> None:
    """Silence what torch and DeepSpeed say on every run that a user can do nothing about.

    Exactly these, nothing else: torch's deprecation FutureWarnings of
    ``all_gather_into_tensor`` (its own all_gather on gloo calls it once per step) and of
    ``reduce_scatter_tensor`` (DeepSpeed's ZeRO gradient partitioning calls it each step); and
    ``torch.utils.cpp_extension``'s "No CUDA runtime is found, using CUDA_HOME=..." record,
    logged when DeepSpeed's CPU accelerator builds its shared-memory all-reduce op on a CPU
    machine that has the CUDA toolkit installed (it compiles C++, so CUDA is irrelevant).
    """
    for name in ("all_gather_into_tensor", "reduce_scatter_tensor"):
        warnings.filterwarnings("ignore", message=rf".*{name}. is deprecated", category=FutureWarning)
    ext_logger = logging.getLogger(_CPP_EXTENSION_LOGGER)
    if not any(isinstance(f, _DropRecord) for f in ext_logger.filters):
        ext_logger.addFilter(_DropRecord(_NO_CUDA_RUNTIME))


def check_run_dir(args) -> None:
    """The run-directory guards that need no model or engine, run before DeepSpeed starts: a new
    run must not overwrite one, and ``--resume`` must name a checkpoint of the same ``--model``,
    ``--loss`` and ``--accum-mode`` (:func:`~.checkpoint.load_checkpoint` checks them again,
    with the global batch, which needs the world size)."""
    run_dir = Path(args.output)
    if not args.resume and (run_dir / "checkpoints" / "latest").exists():
        raise ValueError(f"--output {run_dir} already holds a run (checkpoints/latest); pass --resume {run_dir} "
                         "to continue it, or choose a new --output")
    if args.resume:
        ckpt = resolve_checkpoint(args.resume)
        meta = json.loads((ckpt / "meta.json").read_text())
        for key, flag in (("model", "--model"), ("loss", "--loss"), ("accum_mode", "--accum-mode")):
            if key in meta and meta[key] != getattr(args, key):
                raise ValueError(f"checkpoint {ckpt} was trained with {key}={meta[key]!r}, this run has "
                                 f"{key}={getattr(args, key)!r}: resume with the same {flag}")


def main(argv=None) -> dict:
    """Train; returns the summary dict (also written to ``OUTPUT/summary.json``).

    Every check of the user's input that needs no model, loader or process group runs before
    DeepSpeed is imported: under a launcher, that start-up alone takes most of a minute.

    Raises:
        ValueError: bad flags or inputs. NonFiniteLossError: the loss became NaN/inf.
    """
    args = parse_args(argv)
    check_inputs(args)
    check_run_dir(args)
    quiet_dependency_noise()
    distributed = use_deepspeed(args.ds_config)
    if distributed:
        if "RANK" not in os.environ:
            _single_process_env()
        # the launcher set RANK: log as that rank already, so the slow start below is announced
        _setup_logging(int(os.environ["RANK"]))
        logger.info("starting DeepSpeed%s", " (on the CPU its shared-memory all-reduce op is compiled on first "
                    "use, about a minute; cached after)" if not torch.cuda.is_available() else "")
        import deepspeed

        deepspeed.init_distributed()
        rank, world_size = dist.get_rank(), dist.get_world_size()
        local_rank = int(os.environ.get("LOCAL_RANK", args.local_rank if args.local_rank >= 0 else 0))
    else:
        rank, world_size, local_rank = 0, 1, 0
    _setup_logging(rank)
    try:
        device = pick_device(local_rank)
        if device.type == "cuda":
            torch.cuda.set_device(device)  # collectives (all_gather_object) use the current device
        cfg = TrainConfig.from_args(args, world_size=world_size, device_type=device.type, distributed=distributed)
        summary = _train(cfg, rank, device)
        if dist_ready():
            # leave together: a rank that tears gloo down while its peer still finishes the
            # last checkpoint's collectives has aborted at exit ("terminate called ...")
            dist.barrier()
        return summary
    finally:
        if dist_ready():
            dist.destroy_process_group()


def _train(cfg: TrainConfig, rank: int, device: torch.device) -> dict:
    from ..data import build_loader
    from ..models import create_model

    t_start = time.time()
    world_size = cfg.world_size
    run_dir = Path(cfg.output)

    seed_everything(cfg.seed)  # same init on every rank
    model = create_model(cfg.model, **_model_overrides(cfg))
    if cfg.lock_image:
        model.lock_image_tower()
    if cfg.lock_text:
        model.lock_text_tower()
    if cfg.grad_checkpointing:
        model.set_grad_checkpointing(True)
    model.to(device)
    seed_everything(cfg.seed + rank)

    loader = build_loader(
        cfg.train_data, cfg.batch_size, train=True, image_size=model.image_size, mean=model.image_mean,
        std=model.image_std, rank=rank, world_size=world_size, seed=cfg.seed, epoch=0,
        backend=cfg.data_backend, num_workers=cfg.workers,
    )
    n_batches = _loader_len(loader)
    steps_per_epoch = None if n_batches is None else n_batches // cfg.accum_steps
    if steps_per_epoch is not None:
        if steps_per_epoch < 1:
            raise ValueError(f"--train-data {cfg.train_data!r} gives {n_batches} full batches of --batch-size "
                             f"{cfg.batch_size} per rank, fewer than --accum-steps {cfg.accum_steps}: "
                             "lower --batch-size or add data")
        if n_batches % cfg.accum_steps:
            logger.info("each epoch ends with %d micro-batch(es) that do not fill a group of --accum-steps %d: "
                        "they are dropped on every rank", n_batches % cfg.accum_steps, cfg.accum_steps)
        total_steps = cfg.epochs * steps_per_epoch
    elif cfg.max_steps:
        total_steps = cfg.max_steps
    else:
        raise ValueError(f"--train-data {cfg.train_data!r} has no manifest (unknown length): pass --max-steps")
    stop_at = min(total_steps, cfg.max_steps) if cfg.max_steps else total_steps
    if cfg.eval_every is None:  # --val-data without --eval-every
        cfg = dataclasses.replace(cfg, eval_every=min(steps_per_epoch or stop_at, stop_at))
        logger.info("--val-data without --eval-every: validation loss every %d steps (%s); pass --eval-every N "
                    "to choose, 0 for none", cfg.eval_every,
                    "once per epoch" if cfg.eval_every == steps_per_epoch else "at the last step")

    scalar_names = promote_scalar_params(model) if cfg.distributed else []
    optimizer = create_optimizer(model, cfg)
    scheduler = create_scheduler(optimizer, cfg.warmup, total_steps)
    if cfg.distributed:
        engine = DeepSpeedEngine(model, optimizer, scheduler, cfg, rank, world_size, device, scalar_names=scalar_names)
    else:
        engine = TorchEngine(model, optimizer, scheduler, cfg, device)

    state = TrainState()
    if cfg.resume:
        meta = load_checkpoint(cfg.resume, engine, expect={
            "model": (cfg.model, "--model"),
            "global_batch": (cfg.global_batch, "--batch-size x --accum-steps x ranks"),
            "accum_mode": (cfg.accum_mode, "--accum-mode"),
            "loss": (cfg.loss, "--loss")})
        state = TrainState.from_meta(meta)
        if state.step >= stop_at:
            raise ValueError(f"--resume {cfg.resume}: its checkpoint is at step {state.step}, already at or past "
                             f"the end of this run (step {stop_at}); raise --max-steps or --epochs")
    files = RunFiles(run_dir, rank, state.step if cfg.resume else None)
    files.write_json("args.json", cfg.to_json())
    engine.barrier()

    logger.info("engine %s (ZeRO %s), %d rank(s), precision %s, %s steps/epoch, schedule %d steps, stop at %d",
                engine.kind, engine.zero_stage, world_size, cfg.precision, steps_per_epoch, total_steps, stop_at)
    logger.info("contrastive batch: %d pairs per loss (%s accumulation, --accum-steps %d x --batch-size %d x %d "
                "rank(s) = %d samples per step)%s", cfg.contrastive_batch, cfg.accum_mode, cfg.accum_steps,
                cfg.batch_size, world_size, cfg.global_batch,
                ", activation checkpointing on" if cfg.grad_checkpointing else "")
    bias = model.logit_bias
    logger.info("loss %s (%s), logit scale init %.4g, logit bias %s", cfg.loss, type(engine.loss_fn).__name__,
                model.config.logit_scale_init, "none" if bias is None else f"init {model.config.logit_bias_init:g}")
    meta_common = {"engine": engine.kind, "zero_stage": engine.zero_stage, "world_size": world_size,
                   "precision": cfg.precision, "model": cfg.model, "global_batch": cfg.global_batch,
                   "accum_mode": cfg.accum_mode, "contrastive_batch": cfg.contrastive_batch, "loss": cfg.loss}

    saved = {"step": state.step if cfg.resume else None}

    def save(s: TrainState) -> str:
        saved["step"] = s.step
        return str(save_checkpoint(run_dir, s.step, engine, model.config.to_dict(), {**s.meta(), **meta_common}))

    progress = None
    if rank == 0 and not cfg.no_progress:
        from tqdm.auto import tqdm

        progress = tqdm(total=stop_at, initial=state.step, desc="train", unit="step", dynamic_ncols=True,
                        file=sys.stderr)

    def on_step(s: TrainState, result) -> None:
        if progress is not None:
            progress.update(1)
            progress.set_postfix(loss=f"{result.loss:.4f}", epoch=s.epoch)

    loop = TrainLoop(cfg, engine, loader, files, stop_at=stop_at, total_steps=total_steps, save=save,
                     evaluate=lambda: evaluate_loss(engine, model, cfg, rank, world_size), on_step=on_step)
    skipped_all = None  # summed over ranks at the end; this rank's counts if the run fails
    status = "running"
    t_train = time.time()
    try:
        loop.run(state)
        if saved["step"] != state.step:  # the end position (mid-epoch or the next epoch's start)
            state.last_checkpoint = save(state)
        skipped_all = gather_skipped(loader, world_size)  # collective: only on the normal path
        status = "finished"
    except BaseException as e:
        status = f"failed: {type(e).__name__}: {e}"
        raise
    finally:
        if progress is not None:
            progress.close()
        wall = time.time() - t_train
        summary = {
            "status": status, "steps": state.step, "epochs_completed": state.epoch,
            "steps_per_epoch": steps_per_epoch, "schedule_steps": total_steps,
            "first_loss": loop.first_loss, "final_loss": loop.last_loss,
            "samples_per_s": loop.steps_run * cfg.global_batch / wall if loop.steps_run and wall > 0 else None,
            "wall_s": time.time() - t_start, "world_size": world_size, "engine": engine.kind,
            "zero_stage": engine.zero_stage, "precision": cfg.precision, "model": cfg.model,
            "global_batch": cfg.global_batch, "accum_mode": cfg.accum_mode, "loss": cfg.loss,
            "contrastive_batch": cfg.contrastive_batch, "grad_checkpointing": cfg.grad_checkpointing,
            "skipped": skipped_all if skipped_all is not None else dict(getattr(loader, "skipped", {}) or {}),
            "last_checkpoint": state.last_checkpoint, "run_dir": str(run_dir),
        }
        files.summary(summary)
    logger.info("done: %d steps, final loss %s, run dir %s", state.step, loop.last_loss, run_dir)
    return summary


def evaluate_loss(engine, model, cfg: TrainConfig, rank: int, world_size: int, max_batches: int | None = None) -> float:
    """Mean training loss (``--loss``) over ``--val-data`` (all ranks take part; ends together)."""
    from ..data import build_loader

    loader = build_loader(cfg.val_data, cfg.batch_size, train=False, image_size=model.image_size,
                          mean=model.image_mean, std=model.image_std, rank=rank, world_size=world_size,
                          seed=cfg.seed, backend=cfg.data_backend, num_workers=0, drop_last=True)
    engine.train(False)
    it, total, n = iter(loader), 0.0, 0
    with torch.no_grad():
        while max_batches is None or n < max_batches:
            b = next(it, None)
            if engine.any_rank(b is None):
                break
            loss, _ = engine.forward_loss(b)
            total += engine.all_mean(loss)
            n += 1
    return total / n if n else float("nan")
