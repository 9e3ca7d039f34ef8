"""DeepSpeed JSON config resolution: batch sizes, clipping and precision filled from the flags."""
from __future__ import annotations

import copy
import json
import logging
from pathlib import Path

logger = logging.getLogger(__name__)


def read_ds_config(path: str) -> dict:
    """The JSON object in ``path``, checked for what train.py refuses; cheap (no DeepSpeed), so
    :func:`~.params.validate` calls it before a launcher's ranks spend a minute starting up.

    Raises:
        ValueError: no such file, not a JSON object, or an ``optimizer``/``scheduler`` section
            (train.py builds AdamW groups and the schedule itself); the message names the flag
            and the path.
    """
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"--ds_config {path!r}: no such file" if not p.exists() else
                         f"--ds_config {path!r} is not a file")
    try:
        cfg = json.loads(p.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"--ds_config {path!r} cannot be read as JSON: {e}") from None
    if not isinstance(cfg, dict):
        raise ValueError(f"--ds_config {path!r} must hold a JSON object, got {type(cfg).__name__}")
    for section in ("optimizer", "scheduler"):
        if section in cfg:
            raise ValueError(f"--ds_config {path!r} has a {section!r} section; remove it (train.py builds "
                             "the AdamW parameter groups and the warmup+cosine schedule itself)")
    return cfg


def resolve_ds_config(path: str | None, *, batch_size: int, accum_steps: int, world_size: int,
                      grad_clip: float | None, precision: str | None, device_type: str) -> tuple[dict, str, float]:
    """Load a DeepSpeed JSON config and fill it from the flags; returns
    ``(config, precision, grad_clip)`` (the inputs are not changed).

    Batch sizes ("auto" or numbers) always follow ``--batch-size`` (per rank) and
    ``--accum-steps`` (a differing number is overridden with a warning), in both accumulation
    modes: DeepSpeed's accumulation boundary falls after ``accum_steps`` backward passes either
    way. ``gradient_clipping`` follows ``--grad-clip`` when given, else the config's explicit
    value, else 1.0 (DeepSpeed's own silent default, made visible). ``--precision`` (when given)
    rewrites the bf16/fp16 sections; otherwise it is read from them (neither enabled: bf16 on a
    GPU, fp32 on the CPU).

    Raises:
        ValueError: unreadable config, an ``optimizer``/``scheduler`` section (train.py builds
            AdamW groups and the schedule itself), or fp16 on a CPU.
    """
    from .config import check_precision, default_precision

    cfg = copy.deepcopy(read_ds_config(path)) if path else {}
    for key, value in (("train_micro_batch_size_per_gpu", batch_size),
                       ("gradient_accumulation_steps", accum_steps),
                       ("train_batch_size", batch_size * accum_steps * world_size)):
        old = cfg.get(key, "auto")
        if old != "auto" and old != value:
            logger.warning("ds config %s=%r overridden by the command line: %r", key, old, value)
        cfg[key] = value
    clip = cfg.get("gradient_clipping", "auto")
    if grad_clip is not None:
        clip = grad_clip
    elif clip == "auto":
        clip = 1.0
    cfg["gradient_clipping"] = float(clip)
    precision = precision or default_precision(device_type, cfg)
    check_precision(precision, device_type)
    for name in ("bf16", "fp16"):
        section = dict(cfg.get(name, {}))
        section["enabled"] = precision == name
        cfg[name] = section
    if precision in ("bf16", "fp16"):
        # DeepSpeed >= 0.18 casts parameters but keeps float buffers in fp32 unless told;
        # BatchNorm (MS-CLIP-S stem / branch) then fails on the CPU with bf16 weights and fp32
        # running stats ("expected scalar type BFloat16 but found Float"). Match the buffers.
        cfg.setdefault("data_types", {}).setdefault("buffer_dtype", precision)
    cfg["zero_allow_untested_optimizer"] = True  # our torch AdamW under ZeRO
    cfg.setdefault("steps_per_print", 10**9)  # we log ourselves
    cfg.setdefault("wall_clock_breakdown", False)
    return cfg, precision, float(clip)
