"""The frozen training configuration: every ``train.py`` flag, with precision, gradient clipping
and the DeepSpeed config resolved once (engines and the loop only read it)."""
from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Mapping

import torch

from .ds_config import resolve_ds_config

# the one precision -> autocast / DeepSpeed dtype map (None: fp32, no autocast)
PRECISION_DTYPES: Mapping[str, torch.dtype | None] = MappingProxyType(
    {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16})
ACCUM_MODES = ("exact", "independent")


def default_precision(device_type: str, ds_config: Mapping | None = None) -> str:
    """What a run trains in when ``--precision`` is not given: what the DeepSpeed config enables,
    else bf16 autocast with fp32 master weights on a GPU (fp32 GEMMs there forgo the tensor
    cores) and fp32 on the CPU."""
    ds_config = ds_config or {}
    if ds_config.get("bf16", {}).get("enabled"):
        return "bf16"
    if ds_config.get("fp16", {}).get("enabled"):
        return "fp16"
    return "bf16" if device_type == "cuda" else "fp32"


def check_precision(precision: str, device_type: str) -> None:
    """Raises ValueError for a precision this device cannot train in (fp16 on the CPU)."""
    if precision not in PRECISION_DTYPES:
        raise ValueError(f"--precision must be one of {sorted(PRECISION_DTYPES)}, got {precision!r}")
    if precision == "fp16" and device_type == "cpu":
        raise ValueError("--precision fp16 needs a CUDA device (no fp16 training on the CPU, and DeepSpeed "
                         "refuses it there); use bf16")


@dataclass(frozen=True)
class TrainConfig:
    """One run's settings, built once by :meth:`from_args`; nothing writes to it afterwards.

    Fields mirror the ``train.py`` flags (see ``train.py --help``); these are resolved:
    ``precision`` ("fp32" | "bf16" | "fp16", never None), ``grad_clip`` (max global grad norm,
    0 = off), ``ds_config`` (the DeepSpeed config dict handed to ``deepspeed.initialize``, None
    for the plain engine, read-only), ``world_size`` and ``device_type``. ``loss`` is "clip" |
    "siglip"; ``logit_scale_init`` / ``logit_bias_init`` override the preset's model config
    fields (None: keep the preset's; the bias "none": no bias parameter), already filled with
    SigLIP's values for ``loss="siglip"`` by :func:`~.params.validate`.
    """

    model: str = "msclip-tiny"
    train_data: str = ""
    batch_size: int = 32
    output: str = "runs/default"
    precision: str = "fp32"
    grad_clip: float = 1.0
    world_size: int = 1
    device_type: str = "cpu"
    ds_config: Mapping[str, Any] | None = None
    ds_config_path: str | None = None
    val_data: str | None = None
    image_size: int | None = None
    packed: bool | None = None
    workers: int = 0
    data_backend: str = "torch"
    epochs: int = 1
    max_steps: int | None = None
    lr: float = 5e-4
    lr_share: float = 5e-4
    wd: float = 0.2
    wd_share: float = 0.2
    beta1: float = 0.9
    beta2: float = 0.98
    eps: float = 1e-6
    warmup: int = 100
    accum_steps: int = 1
    accum_mode: str = "exact"
    grad_checkpointing: bool = False
    seed: int = 0
    lock_image: bool = False
    lock_text: bool = False
    local_loss: bool = False
    loss: str = "clip"
    logit_scale_init: float | None = None
    logit_bias_init: float | str | None = None
    resume: str | None = None
    save_every: int = 0
    log_every: int = 1
    eval_every: int | None = 0  # None: once per epoch, until main resolves it from the loader's length
    no_progress: bool = False

    @property
    def distributed(self) -> bool:
        """True for the DeepSpeed engine (a resolved ds config exists)."""
        return self.ds_config is not None

    @property
    def autocast_dtype(self) -> torch.dtype | None:
        return PRECISION_DTYPES[self.precision]

    @property
    def global_batch(self) -> int:
        """Samples per optimizer step: ``batch_size x accum_steps x world_size``."""
        return self.batch_size * self.accum_steps * self.world_size

    @property
    def contrastive_batch(self) -> int:
        """Pairs one loss sees: the global batch under exact accumulation, else one
        micro-batch over all ranks (``batch_size x world_size``)."""
        return self.global_batch if self.accum_mode == "exact" else self.batch_size * self.world_size

    @classmethod
    def from_args(cls, args: argparse.Namespace, *, world_size: int = 1, device_type: str = "cpu",
                  distributed: bool = False) -> "TrainConfig":
        """Resolve parsed, validated flags (:func:`~.params.parse_args`); ``args`` is not changed.

        Raises:
            ValueError: an unreadable or conflicting ``--ds_config``, or fp16 on a CPU.
        """
        flags = dict(vars(args))
        precision, grad_clip, ds = flags.get("precision"), flags.get("grad_clip"), None
        if distributed:
            ds, precision, grad_clip = resolve_ds_config(
                flags.get("ds_config"), batch_size=args.batch_size, accum_steps=args.accum_steps,
                world_size=world_size, grad_clip=grad_clip, precision=precision, device_type=device_type)
            ds = MappingProxyType(ds)
        else:
            precision = precision or default_precision(device_type)
            grad_clip = 1.0 if grad_clip is None else float(grad_clip)
        check_precision(precision, device_type)
        names = {f.name for f in dataclasses.fields(cls)} - {"ds_config", "ds_config_path"}
        values = {k: flags[k] for k in names if k in flags}
        values.update(precision=precision, grad_clip=float(grad_clip), world_size=world_size,
                      device_type=device_type, ds_config=ds, ds_config_path=flags.get("ds_config"))
        return cls(**values)

    def to_json(self) -> dict:
        """JSON-able view (args.json of the run dir): the flags plus the resolved values."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "ds_config"}
        out["ds_config"] = None if self.ds_config is None else plain_dict(self.ds_config)
        out["global_batch"] = self.global_batch
        out["contrastive_batch"] = self.contrastive_batch
        return out


def plain_dict(x):
    """A deep copy of ``x`` with every mapping a plain dict and every tuple a list (what
    ``json`` and ``deepspeed.initialize`` take; DeepSpeed edits its config in place)."""
    if isinstance(x, Mapping):
        return {k: plain_dict(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [plain_dict(v) for v in x]
    return x
