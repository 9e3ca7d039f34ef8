"""Training engines: DeepSpeed (ZeRO 0-3, bf16) when launched with a ds config, plain PyTorch otherwise.

Both expose the same small interface to the loop in :mod:`msclip_fast.training.main`:
``forward_loss(batch) -> (loss, scale)``, ``backward(loss)``, ``step() -> grad_norm``,
``lrs()``, ``save_state(dir)`` / ``load_state(dir)``, ``consolidated_state_dict()`` and the
collectives ``any_rank(flag)``, ``all_mean(x)``, ``barrier()``.
"""
from __future__ import annotations

import contextlib
import copy
import json
import logging
import math
import os
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn

from ..losses import ClipLoss

logger = logging.getLogger(__name__)


def dist_ready() -> bool:
    return dist.is_available() and dist.is_initialized()


def _fp32_cpu(state: dict) -> dict:
    """Copy of a state_dict on the CPU with floating tensors in float32 (what model.pt holds)."""
    out = {}
    for k, v in state.items():
        v = v.detach().cpu()
        out[k] = v.float().clone() if v.is_floating_point() else v.clone()
    return out


class _EngineBase:
    """Shared pieces: loss, batch transfer, collectives."""

    def __init__(self, model: nn.Module, optimizer, scheduler, args, rank: int, world_size: int, device):
        self.model = model  # the bare MSCLIP module (not a wrapper)
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.args = args
        self.rank = rank
        self.world_size = world_size
        self.device = device
        self.loss_fn = ClipLoss(local_loss=args.local_loss, gather_with_grad=True, rank=rank, world_size=world_size)
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
        t = x.detach().float().reshape(1).clone().to(self.device)
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


class TorchEngine(_EngineBase):
    """One process, plain PyTorch: AdamW, grad accumulation, clipping, optional bf16/fp16 autocast."""

    kind = "torch"
    zero_stage = None

    def __init__(self, model, optimizer, scheduler, args, device):
        super().__init__(model, optimizer, scheduler, args, rank=0, world_size=1, device=device)
        self.grad_clip = 1.0 if args.grad_clip is None else args.grad_clip
        self.autocast_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.precision)
        self.scaler = torch.amp.GradScaler(device.type) if args.precision == "fp16" else None
        self.micro = 0
        optimizer.zero_grad(set_to_none=True)

    def forward_loss(self, batch: dict):
        images, tokens, lengths = self._inputs(batch)
        ctx = (torch.autocast(self.device.type, dtype=self.autocast_dtype) if self.autocast_dtype
               else contextlib.nullcontext())
        with ctx:
            img, txt, scale = self.model(images, tokens, text_lengths=lengths)
        loss = self.loss_fn(img.float(), txt.float(), scale.float())
        return loss, scale.detach()

    def backward(self, loss: torch.Tensor) -> None:
        loss = loss / self.args.accum_steps  # gradient of the mean over micro-batches
        (self.scaler.scale(loss) if self.scaler else loss).backward()
        self.micro += 1

    def step(self) -> float | None:
        """Optimizer + scheduler step once ``accum_steps`` micro-batches were accumulated."""
        if self.micro % self.args.accum_steps:
            return None
        if self.scaler:
            self.scaler.unscale_(self.optimizer)
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        max_norm = self.grad_clip if self.grad_clip > 0 else math.inf
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


def resolve_ds_config(path: str | None, args, world_size: int, device_type: str) -> dict:
    """Load a DeepSpeed JSON config and fill it from the flags.

    Batch sizes ("auto" or numbers) always follow ``--batch-size`` (per rank) and
    ``--accum-steps`` (a differing number is overridden with a warning);
    ``gradient_clipping`` follows ``--grad-clip`` when given, else the config's explicit value,
    else 1.0 (DeepSpeed's own silent default, made visible). ``--precision`` (when given)
    rewrites the bf16/fp16 sections; otherwise it is read from them into ``args.precision``
    (neither enabled: bf16 on a GPU, fp32 on the CPU).

    Raises:
        ValueError: unreadable config, an ``optimizer``/``scheduler`` section (train.py builds
            AdamW groups and the schedule itself), or fp16 on a CPU.
    """
    cfg = {}
    if path:
        try:
            cfg = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"--ds_config {path!r} cannot be read as JSON: {e}") from e
    cfg = copy.deepcopy(cfg)
    for section in ("optimizer", "scheduler"):
        if section in cfg:
            raise ValueError(f"--ds_config {path!r} has a {section!r} section; remove it (train.py builds "
                             "the AdamW parameter groups and the warmup+cosine schedule itself)")
    for key, value in (("train_micro_batch_size_per_gpu", args.batch_size),
                       ("gradient_accumulation_steps", args.accum_steps),
                       ("train_batch_size", args.batch_size * args.accum_steps * world_size)):
        old = cfg.get(key, "auto")
        if old != "auto" and old != value:
            logger.warning("ds config %s=%r overridden by the command line: %r", key, old, value)
        cfg[key] = value
    clip = cfg.get("gradient_clipping", "auto")
    if args.grad_clip is not None:
        clip = args.grad_clip
    elif clip == "auto":
        clip = 1.0
    cfg["gradient_clipping"] = float(clip)
    args.grad_clip = float(clip)
    if args.precision is None:
        # a config that enables neither trains in bf16 with fp32 master weights on a GPU (fp32
        # GEMMs there forgo the tensor cores) and in fp32 on the CPU
        args.precision = ("bf16" if cfg.get("bf16", {}).get("enabled") else
                          "fp16" if cfg.get("fp16", {}).get("enabled") else
                          "bf16" if device_type == "cuda" else "fp32")
    for name in ("bf16", "fp16"):
        section = dict(cfg.get(name, {}))
        section["enabled"] = args.precision == name
        cfg[name] = section
    if args.precision in ("bf16", "fp16"):
        # DeepSpeed >= 0.18 casts parameters but keeps float buffers in fp32 unless told;
        # BatchNorm (MS-CLIP-S stem / branch) then fails on the CPU with bf16 weights and fp32
        # running stats ("expected scalar type BFloat16 but found Float"). Match the buffers.
        cfg.setdefault("data_types", {}).setdefault("buffer_dtype", args.precision)
    if args.precision == "fp16" and device_type == "cpu":
        raise ValueError("--precision fp16 needs a CUDA device (DeepSpeed refuses fp16 on the CPU); use bf16")
    cfg["zero_allow_untested_optimizer"] = True  # our torch AdamW under ZeRO
    cfg.setdefault("steps_per_print", 10**9)  # we log ourselves
    cfg.setdefault("wall_clock_breakdown", False)
    return cfg


def promote_scalar_params(model: nn.Module) -> list[str]:
    """Replace every 0-d parameter (``logit_scale``) by a ``(1,)`` one, in place.

    Why: DeepSpeed's ``_broadcast_model`` does ``p.data.view(torch.uint8)``, which raises for 0-d
    tensors ("self.dim() cannot be 0 to view Float as Byte"). The model's math is unchanged
    (``exp(logit_scale)`` broadcasts); :class:`DeepSpeedEngine` reshapes these entries back to
    0-d in the consolidated ``model.pt``. Call before building the optimizer.
    Returns the state_dict names of the promoted parameters.
    """
    new: dict[int, nn.Parameter] = {}
    for module in model.modules():
        for name, p in list(module._parameters.items()):
            if p is not None and p.dim() == 0:
                if id(p) not in new:
                    new[id(p)] = nn.Parameter(p.data.reshape(1).clone(), requires_grad=p.requires_grad)
                module._parameters[name] = new[id(p)]
    promoted = {id(p) for p in new.values()}
    return [n for n, p in model.named_parameters(remove_duplicate=False) if id(p) in promoted]


class DeepSpeedEngine(_EngineBase):
    """deepspeed.initialize with our AdamW groups and scheduler; ZeRO stage from the config."""

    kind = "deepspeed"

    def __init__(self, model, optimizer, scheduler, args, ds_config: dict, rank, world_size, device,
                 scalar_names=()):
        import deepspeed

        self.scalar_names = list(scalar_names)  # from promote_scalar_params: 0-d again in model.pt
        model.to(device)
        self.ds, ds_opt, _, ds_sched = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config, dist_init_required=False
        )
        super().__init__(model, optimizer, scheduler, args, rank, world_size, self.ds.device)
        self.ds_optimizer = ds_opt
        self.zero_stage = int(self.ds.zero_optimization_stage())
        self.dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.precision)

    def forward_loss(self, batch: dict):
        images, tokens, lengths = self._inputs(batch, dtype=self.dtype)  # DeepSpeed casts the module itself
        # DeepSpeed's forward hands keyword arguments to the module unchanged (its fp16 input
        # cast touches floating tensors only), so the CPU lengths reach the model as they are
        img, txt, scale = self.ds(images, tokens, text_lengths=lengths)
        loss = self.loss_fn(img, txt, scale)
        return loss, scale.detach().float()

    def backward(self, loss: torch.Tensor) -> None:
        self.ds.backward(loss)  # scales by 1/accum and all-reduces (averages) over ranks

    def step(self) -> float | None:
        boundary = self.ds.is_gradient_accumulation_boundary()
        self.ds.step()  # optimizer + our scheduler at accumulation boundaries only
        if not boundary:
            return None
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


def use_deepspeed(args) -> bool:
    """DeepSpeed when a ds config is given or when started by a launcher with several ranks."""
    return bool(args.ds_config) or int(os.environ.get("WORLD_SIZE", "1")) > 1
