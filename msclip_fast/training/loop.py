"""The training loop: a walk over groups of ``accum_steps`` micro-batches, one
:func:`~.step.train_step` each, with logging, validation and checkpoints between steps.

Every step all ranks agree (one all-reduce) whether any of them ran out of batches, so uneven
shards end the epoch together instead of deadlocking; a partial group at the end of an epoch
is dropped on every rank and logged. The loader is deterministic per (seed, epoch), so a
resumed run skips the consumed micro-batches of its epoch and continues exactly. Checkpoints
sit at step boundaries only, so a resume never lands inside an accumulated step.
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from typing import Callable, Iterator

import torch.distributed as dist

from .config import TrainConfig
from .engine import dist_ready
from .step import StepResult, train_step

logger = logging.getLogger("msclip_fast.training")


@dataclass
class TrainState:
    """Where a run is: completed optimizer steps, the epoch, the micro-batches of that epoch
    already consumed (per rank), and the newest checkpoint's path. Checkpoints save it
    (:meth:`meta`) and resume restores it (:meth:`from_meta`)."""

    step: int = 0
    epoch: int = 0
    batch: int = 0
    last_checkpoint: str | None = None

    def meta(self) -> dict:
        return {"step": self.step, "epoch": self.epoch, "batch": self.batch}

    @classmethod
    def from_meta(cls, meta: dict) -> "TrainState":
        return cls(int(meta["step"]), int(meta["epoch"]), int(meta["batch"]), meta.get("path"))


def gather_skipped(loader, world_size: int) -> dict:
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


def _take(it, n: int) -> list:
    out = []
    for _ in range(n):
        b = next(it, None)
        if b is None:
            break
        out.append(b)
    return out


class TrainLoop:
    """Runs steps until ``stop_at`` (or the last epoch's end) from a :class:`TrainState`.

    Args:
        cfg: the run's configuration. engine: a training engine (:mod:`.engine`).
        loader: the training loader (``set_epoch``, iterable, ``skipped``).
        files: the run's :class:`~.run_files.RunFiles`.
        stop_at: the last step to run; total_steps: the schedule length.
        save: ``save(state) -> path`` writes a checkpoint of ``state`` (collective).
        evaluate: ``evaluate() -> val_loss`` (collective), used every ``cfg.eval_every`` steps.
        on_step: called with each step's :class:`~.step.StepResult` (progress bars).
    """

    def __init__(self, cfg: TrainConfig, engine, loader, files, *, stop_at: int, total_steps: int,
                 save: Callable, evaluate: Callable | None = None, on_step: Callable | None = None):
        self.cfg, self.engine, self.loader, self.files = cfg, engine, loader, files
        self.stop_at, self.total_steps = stop_at, total_steps
        self.save, self.evaluate, self.on_step = save, evaluate, on_step
        self.t_start = time.time()
        self.first_loss: float | None = None
        self.last_loss: float | None = None
        self.steps_run = 0
        self._t_log, self._since_log = time.time(), 0

    def groups(self, state: TrainState) -> Iterator[list]:
        """Groups of ``accum_steps`` micro-batches from ``state``'s position; advances
        ``state.epoch`` / ``state.batch`` across epoch ends (not the step)."""
        k = self.cfg.accum_steps
        while state.epoch < self.cfg.epochs and state.step < self.stop_at:
            # the loader starts at the resume position itself: with a shard index it reads
            # nothing before it (no decode of the consumed micro-batches)
            self.loader.set_epoch(state.epoch, start_batch=state.batch)
            it = iter(self.loader)
            while state.step < self.stop_at:
                micro = _take(it, k)
                if self.engine.any_rank(len(micro) < k):  # some rank ran out: end the epoch together
                    if micro:
                        logger.info("epoch %d: dropped a partial group of %d micro-batch(es) on rank %d "
                                    "(--accum-steps %d); every rank drops its remainder",
                                    state.epoch, len(micro), self.engine.rank, k)
                    break
                yield micro
            else:
                return  # stop_at reached inside the epoch: keep the epoch / batch position
            state.epoch += 1
            state.batch = 0

    def run(self, state: TrainState) -> TrainState:
        cfg = self.cfg
        self.engine.train(True)
        for micro in self.groups(state):
            result = train_step(self.engine, micro, cfg.accum_mode, state.step + 1, state.last_checkpoint)
            state.step += 1
            state.batch += len(micro)
            self._after_step(state, result)
        if state.step >= self.total_steps:
            state.epoch, state.batch = cfg.epochs, 0  # the schedule's last step closes the last epoch
        return state

    def _after_step(self, state: TrainState, result: StepResult) -> None:
        cfg = self.cfg
        self.steps_run += 1
        self._since_log += 1
        self.last_loss = result.loss
        self.first_loss = result.loss if self.first_loss is None else self.first_loss
        if self.on_step is not None:
            self.on_step(state, result)
        if state.step % cfg.log_every == 0 or state.step == self.stop_at:
            self.files.log(self._row(state, result))
        if cfg.eval_every and cfg.val_data and self.evaluate is not None and state.step % cfg.eval_every == 0:
            self.files.log({"step": state.step, "epoch": state.epoch, "val_loss": self.evaluate()})
            self.engine.train(True)
        if cfg.save_every and state.step % cfg.save_every == 0:
            state.last_checkpoint = str(self.save(state))

    def _row(self, state: TrainState, result: StepResult) -> dict:
        skipped = gather_skipped(self.loader, self.cfg.world_size)
        now = time.time()
        shared = [v for k, v in result.lrs.items() if k.startswith("shared")]
        plain = [v for k, v in result.lrs.items() if not k.startswith("shared")]
        lr = plain[0] if plain else shared[0]
        row = {
            "step": state.step, "epoch": state.epoch, "loss": result.loss, "lr": lr,
            "lr_share": shared[0] if shared else lr,
            "logit_scale": math.log(result.scale), "scale": result.scale, "grad_norm": result.grad_norm,
            "samples_per_s": self._since_log * self.cfg.global_batch / max(now - self._t_log, 1e-9),
            "skipped": skipped, "skipped_total": sum(skipped.values()), "time": now - self.t_start,
        }
        if result.bias is not None:
            row["logit_bias"] = result.bias
        self._t_log, self._since_log = now, 0
        return row
