"""Training engines: DeepSpeed (ZeRO 0-3, bf16) when launched with a ds config, plain PyTorch otherwise.

Both expose the same small interface to the step functions of :mod:`msclip_fast.training.step`:
``forward(batch) -> (image_features, text_features, scale[, logit_bias])`` (the model's
output: the bias only for a model that has one; autograd follows the caller's grad mode),
``loss(image_features, text_features, scale, logit_bias=None)`` (``--loss``), ``backward(t, mean_over_accum)``
once per micro-batch, ``step() -> grad_norm`` once per ``accum_steps`` backward passes,
``lrs()``, ``save_state(dir)`` / ``load_state(dir)``, ``consolidated_state_dict()`` and the
collectives ``any_rank(flag)``, ``all_mean(x)``, ``barrier()``. Both read a frozen
:class:`~.config.TrainConfig`.
"""
from __future__ import annotations

import contextlib
import logging
import math
import os
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn

from ..losses import ClipLoss, SigLipLoss
from .config import TrainConfig, plain_dict

logger = logging.getLogger(__name__)


def _acc(t: torch.Tensor) -> torch.Tensor:
    """At least float32 (float64 stays float64: the tests' exact comparisons)."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def dist_ready() -> bool:
    return dist.is_available() and dist.is_initialized()


def _fp32_cpu(state: dict) -> dict:
    """Copy of a state_dict on the CPU with floating tensors in float32 (what model.pt holds)."""
    out = {}
    for k, v in state.items():
        v = v.detach().cpu()
        out[k] = v.float().clone() if v.is_floating_point() else v.clone()
    return out


def make_loss(cfg: TrainConfig, rank: int, world_size: int) -> nn.Module:
    """The training loss of ``cfg.loss`` on rank ``rank`` of ``world_size``.

    Both follow one gradient convention across ranks (losses.distributed): a rank's local
    feature gradient is ``world_size x`` the full-batch one and the parameter gradients
    averaged over ranks are the single-process ones, which exact accumulation's cached
    feature gradients rely on. ClipLoss: every rank computes the full-batch loss, gathered
    with gradient. SigLipLoss: each rank scores its own images against every rank's texts
    (normalized by its own images), so the mean over ranks is the full-batch loss.
    """
    if cfg.loss == "siglip":
        # "gather" rather than open_clip's default "bidir": one all-gather of the texts
        # (backward: one all-reduce) and ONE fused negative-only call over all other ranks'
        # texts, where bidir runs about world_size / 2 rounds of point-to-point exchanges, each
        # a separate fused call, and replays them in backward. Gather holds all N x E texts at
        # once instead of two chunks, which is small beside any tower's activations; the fused
        # op never forms the N_r x N logits either way
        return SigLipLoss(rank=rank, world_size=world_size, dist_impl="gather")
    if cfg.loss != "clip":
        raise ValueError(f"--loss must be 'clip' or 'siglip', got {cfg.loss!r}")
    # gather_with_grad: the loss over all ranks' pairs back-propagates into every rank's
    # features (losses.distributed), which exact accumulation's feature gradients rely on
    return ClipLoss(local_loss=cfg.local_loss, gather_with_grad=True, rank=rank, world_size=world_size)


class _EngineBase:
    """Shared pieces: loss, batch transfer, collectives."""

    def __init__(self, model: nn.Module, optimizer, scheduler, cfg: TrainConfig, rank: int, world_size: int, device):
        self.model = model  # the bare MSCLIP module (not a wrapper)
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.cfg = cfg
        self.rank = rank
        self.world_size = world_size
        self.device = device
        self.loss_fn = make_loss(cfg, rank, world_size)
        # SigLipLoss takes the bias positionally even when it is None (open_clip's signature);
        # a clip loss gets one only from a model that has one
        self._bias_always = cfg.loss == "siglip"
        self.group_names = [g.get("name", str(i)) for i, g in enumerate(optimizer.param_groups)]

    # --- collectives (no-ops on one process) ---
    def any_rank(self, flag: bool) -> bool:
        """True when ``flag`` is true on any rank (one all-reduce; every rank must call it)."""
        if not dist_ready() or self.world_size == 1:
            return bool(flag)
        t = torch.tensor([1.0 if flag else 0.0], device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item() > 0)

    def all_mean(self, x: torch.Tensor) -> float:
        """Mean of a scalar over ranks (every rank must call it)."""
        t = x.detach().double().reshape(1).clone().to(self.device)
        if dist_ready() and self.world_size > 1:
            dist.all_reduce(t)
            t /= self.world_size
        return float(t.item())

    def barrier(self) -> None:
        if dist_ready() and self.world_size > 1:
            dist.barrier()

    def lrs(self) -> dict[str, float]:
        """group name -> current lr."""
        return {n: float(g["lr"]) for n, g in zip(self.group_names, self.optimizer.param_groups)}

    def _inputs(self, batch: dict, dtype=None):
        """``(images, tokens, text_lengths)`` of a loader batch for the model's forward.

        images ``(B,3,H,W)`` and tokens ``(B,L)`` int64 move to the device; text_lengths is
        the batch's ``(B,)`` int64 ``"text_lengths"`` (None when absent: the model then
        computes it) and stays on the CPU: the model plans its EOT trimming on the host, and
        lengths on the device would cost it a device-to-host sync every step.
        """
        images = batch["image"].to(self.device, non_blocking=True)
        tokens = batch["text"].to(self.device, non_blocking=True)
        if dtype is not None:
            images = images.to(dtype)
        return images, tokens, batch.get("text_lengths")

    def loss(self, image_features: torch.Tensor, text_features: torch.Tensor, scale: torch.Tensor,
             logit_bias: torch.Tensor | None = None) -> torch.Tensor:
        """The contrastive loss (0-d float32) of this rank's ``(N_r, E)`` features against all
        ranks' (:func:`make_loss`); collective."""
        if logit_bias is not None:
            extra = (_acc(logit_bias),)
        else:
            extra = (None,) if self._bias_always else ()
        return self.loss_fn(_acc(image_features), _acc(text_features), _acc(scale), *extra)

    def forward_loss(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """``(loss, scale)`` of one batch: :meth:`forward` then :meth:`loss` (validation)."""
        out = self.forward(batch)
        return self.loss(*out), out[2].detach().float()


class TorchEngine(_EngineBase):
    """One process, plain PyTorch: AdamW, grad accumulation, clipping, optional bf16/fp16 autocast."""

    kind = "torch"
    zero_stage = None

    def __init__(self, model, optimizer, scheduler, cfg: TrainConfig, device):
        super().__init__(model, optimizer, scheduler, cfg, rank=0, world_size=1, device=device)
        self.autocast_dtype = cfg.autocast_dtype
        self.scaler = torch.amp.GradScaler(device.type) if cfg.precision == "fp16" else None
        optimizer.zero_grad(set_to_none=True)

    def forward(self, batch: dict):
        images, tokens, lengths = self._inputs(batch)
        ctx = (torch.autocast(self.device.type, dtype=self.autocast_dtype) if self.autocast_dtype
               else contextlib.nullcontext())
        with ctx:
            return self.model(images, tokens, text_lengths=lengths)

    def backward(self, t: torch.Tensor, mean_over_accum: bool = True) -> None:
        """Accumulate the gradient of ``t`` (divided by ``accum_steps`` when ``mean_over_accum``:
        the gradient of the mean of independent micro-batch losses)."""
        if mean_over_accum:
            t = t / self.cfg.accum_steps
        (self.scaler.scale(t) if self.scaler else t).backward()

    def step(self) -> float:
        """Clip, optimizer + scheduler step, zero the gradients; returns the global grad norm
        before clipping."""
        if self.scaler:
            self.scaler.unscale_(self.optimizer)
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        max_norm = self.cfg.grad_clip if self.cfg.grad_clip > 0 else math.inf
        norm = float(torch.nn.utils.clip_grad_norm_(params, max_norm))
        if self.scaler:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return norm

    def train(self, mode: bool = True) -> None:
        self.model.train(mode)

    def consolidated_state_dict(self) -> dict:
        return _fp32_cpu(self.model.state_dict())

    def save_state(self, ckpt_dir: Path) -> None:
        state = {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict()}
        if self.scaler:
            state["scaler"] = self.scaler.state_dict()
        torch.save(state, ckpt_dir / "trainer_state.pt")

    def load_state(self, ckpt_dir: Path) -> None:
        sd = torch.load(ckpt_dir / "model.pt", map_location="cpu", weights_only=True)
        self.model.load_state_dict(sd)
        state = torch.load(ckpt_dir / "trainer_state.pt", map_location="cpu", weights_only=False)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.scaler and "scaler" in state:
            self.scaler.load_state_dict(state["scaler"])


class DeepSpeedEngine(_EngineBase):
    """deepspeed.initialize with our AdamW groups and scheduler; ZeRO stage from the config."""

    kind = "deepspeed"

    def __init__(self, model, optimizer, scheduler, cfg: TrainConfig, rank, world_size, device, scalar_names=()):
        import deepspeed

        if cfg.ds_config is None:
            raise ValueError("DeepSpeedEngine needs a TrainConfig with a resolved ds_config")
        self.scalar_names = list(scalar_names)  # from promote_scalar_params: 0-d again in model.pt
        model.to(device)
        ds_config = plain_dict(cfg.ds_config)  # deepspeed.initialize wants (and may edit) a dict
        self.ds, ds_opt, _, ds_sched = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config, dist_init_required=False
        )
        super().__init__(model, optimizer, scheduler, cfg, rank, world_size, self.ds.device)
        self.ds_optimizer = ds_opt
        self.zero_stage = int(self.ds.zero_optimization_stage())
        self.dtype = cfg.autocast_dtype

    def forward(self, batch: dict):
        images, tokens, lengths = self._inputs(batch, dtype=self.dtype)  # DeepSpeed casts the module itself
        # DeepSpeed's forward hands keyword arguments to the module unchanged (its fp16 input
        # cast touches floating tensors only), so the CPU lengths reach the model as they are
        return self.ds(images, tokens, text_lengths=lengths)

    def backward(self, t: torch.Tensor, mean_over_accum: bool = True) -> None:
        """``engine.backward`` (loss scaling, ZeRO gradient partitioning and, at the
        accumulation boundary, the average over ranks), then DeepSpeed's own ``step()`` for
        every micro-batch but the last, which only advances its micro-step counter: so
        DeepSpeed's boundary is exactly our ``accum_steps``-th backward."""
        self.ds.backward(t, scale_wrt_gas=mean_over_accum)
        if not self.ds.is_gradient_accumulation_boundary():
            self.ds.step()

    def step(self) -> float | None:
        """Optimizer + scheduler step at the accumulation boundary; returns the global grad norm.

        Raises:
            RuntimeError: called before ``accum_steps`` backward passes (a loop bug).
        """
        if not self.ds.is_gradient_accumulation_boundary():
            raise RuntimeError("DeepSpeedEngine.step() called before the accumulation boundary "
                               f"(micro step {self.ds.micro_steps}, accum_steps {self.cfg.accum_steps})")
        self.ds.step()
        norm = self.ds.get_global_grad_norm()
        return None if norm is None else float(norm)

    def train(self, mode: bool = True) -> None:
        self.ds.train(mode)

    def consolidated_state_dict(self) -> dict | None:
        """Full fp32 state_dict on rank 0 (None elsewhere); collective (every rank calls it).

        ZeRO-3 parameters are gathered layer by layer (DeepSpeed's consolidation helper). Under
        bf16/fp16 the trainable parameters are replaced by DeepSpeed's fp32 master copies
        (``safe_get_full_fp32_param``), so model.pt is not rounded to 16 bits."""
        if self.zero_stage == 3:
            sd = self.ds._zero3_consolidated_16bit_state_dict()  # gathers layer by layer
        else:
            sd = self.ds.module.state_dict() if self.rank == 0 else None
        masters = self._fp32_masters() if self.dtype is not None else {}
        if sd is None:
            return None
        sd = _fp32_cpu(sd)
        for name, value in masters.items():
            if name in sd:
                sd[name] = value.reshape(sd[name].shape)
        for n in self.scalar_names:
            if n in sd:
                sd[n] = sd[n].reshape(())
        return sd

    def _fp32_masters(self) -> dict[str, torch.Tensor]:
        """state_dict name -> fp32 master weight (CPU) on rank 0; collective over ranks."""
        from deepspeed.utils import safe_get_full_fp32_param

        names: dict[int, list[str]] = {}
        for n, p in self.ds.module.named_parameters(remove_duplicate=False):
            names.setdefault(id(p), []).append(n)
        out = {}
        for p in self.ds.module.parameters():  # deduplicated, same order on every rank
            if not p.requires_grad:
                continue
            full = safe_get_full_fp32_param(p)  # all-gathers the partitions
            if full is not None and self.rank == 0:
                full = full.detach().float().cpu().clone()
                for n in names[id(p)]:
                    out[n] = full
        return out

    def save_state(self, ckpt_dir: Path) -> None:
        self.ds.save_checkpoint(str(ckpt_dir / "deepspeed"), tag="state", save_latest=False)

    def load_state(self, ckpt_dir: Path) -> None:
        path, _ = self.ds.load_checkpoint(str(ckpt_dir / "deepspeed"), tag="state")
        if path is None:
            raise ValueError(f"DeepSpeed could not load a checkpoint from {ckpt_dir / 'deepspeed'}")


def pick_device(local_rank: int) -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", max(local_rank, 0))
    return torch.device("cpu")


def use_deepspeed(ds_config_path: str | None) -> bool:
    """DeepSpeed when a ds config is given or when started by a launcher with several ranks."""
    return bool(ds_config_path) or int(os.environ.get("WORLD_SIZE", "1")) > 1
