"""Atomic checkpoints of a run (layout in CONTRACTS.md / DESIGN §5).

::

    RUN/checkpoints/step_00000100/
        model.pt            consolidated fp32 state_dict (any ZeRO stage) -> load_model needs no DeepSpeed
        config.json         ModelConfig.to_dict()
        meta.json           step, data position (epoch, batch index), precision, ZeRO stage, ...
        trainer_state.pt    plain engine: optimizer + scheduler state   | deepspeed/state/...  DeepSpeed engine
        rng_rank{r}.pt      python / numpy / torch RNG states of rank r
    RUN/checkpoints/latest  text: the newest complete checkpoint's dir name

A checkpoint is written into ``.tmp_step_XXXXXXXX`` and renamed into place only when every
rank finished writing, then ``latest`` is replaced through a temp file + ``os.replace``; a crash
at any point leaves ``latest`` naming the previous complete checkpoint.
"""
from __future__ import annotations

import json
import logging
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch

logger = logging.getLogger(__name__)

LATEST = "latest"


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """A run dir (-> its ``checkpoints/latest``), a ``checkpoints/`` dir, or a checkpoint dir.

    Raises:
        ValueError: nothing checkpoint-like at ``path`` (the message names it).
    """
    p = Path(path)
    if (p / "meta.json").is_file():
        return p
    for ckdir in (p / "checkpoints", p):
        latest = ckdir / LATEST
        if latest.is_file():
            target = ckdir / latest.read_text().strip()
            if not (target / "meta.json").is_file():
                raise ValueError(f"{latest} names {target.name!r}, which is not a complete checkpoint")
            return target
    raise ValueError(f"--resume/--checkpoint {str(path)!r} is neither a run dir with checkpoints/latest nor a checkpoint dir")


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save_checkpoint(run_dir: Path, step: int, engine, model_config: dict, meta: dict) -> Path:
    """Write checkpoint ``step`` of ``engine`` atomically; every rank must call it.

    Args:
        run_dir: the run directory; checkpoints go to ``run_dir/checkpoints``.
        step: completed optimizer steps.
        engine: a training engine (``save_state``, ``consolidated_state_dict``, ``barrier``, ``rank``).
        model_config: ``ModelConfig.to_dict()``.
        meta: JSON-able training position and facts (epoch, batch index, ...).
    Returns:
        the final checkpoint directory.
    """
    ck_root = Path(run_dir) / "checkpoints"
    final = ck_root / step_dir_name(step)
    tmp = ck_root / f".tmp_{step_dir_name(step)}"
    if engine.rank == 0:
        ck_root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():  # left by a crashed earlier attempt
            shutil.rmtree(tmp)
        tmp.mkdir()
    engine.barrier()
    engine.save_state(tmp)
    state = engine.consolidated_state_dict()  # collective under ZeRO-3
    torch.save(rng_state(), tmp / f"rng_rank{engine.rank}.pt")
    if engine.rank == 0:
        torch.save(state, tmp / "model.pt")
        (tmp / "config.json").write_text(json.dumps(model_config, indent=2))
        (tmp / "meta.json").write_text(json.dumps({"step": step, **meta}, indent=2))
    engine.barrier()  # every rank's files are in tmp
    if engine.rank == 0:
        if final.exists():  # same step saved before (e.g. a resumed run): replace it
            old = ck_root / f".old_{final.name}"
            shutil.rmtree(old, ignore_errors=True)
            os.rename(final, old)
            os.rename(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, final)
        _write_text_atomic(ck_root / LATEST, final.name + "\n")
        logger.info("saved checkpoint %s", final)
    engine.barrier()
    return final


def load_checkpoint(path, engine, expect: dict | None = None) -> dict:
    """Restore ``engine`` (model, optimizer, scheduler) and this rank's RNG from ``path``
    (anything :func:`resolve_checkpoint` accepts); returns meta.json's dict.

    ``expect`` maps a meta.json key to ``(value, flag)``: a checkpoint whose recorded value
    differs (another ``--model``, another global batch) raises ValueError naming the flag,
    before any state is loaded.
    """
    ckpt = resolve_checkpoint(path)
    meta = json.loads((ckpt / "meta.json").read_text())
    for key, (value, flag) in (expect or {}).items():
        if key in meta and meta[key] != value:
            raise ValueError(f"checkpoint {ckpt} was trained with {key}={meta[key]!r}, this run has "
                             f"{key}={value!r}: resume with the same {flag}")
    if meta.get("engine") and meta["engine"] != engine.kind:
        raise ValueError(f"checkpoint {ckpt} was written by the {meta['engine']!r} engine; "
                         f"this run uses {engine.kind!r} (launch it the same way)")
    if meta.get("world_size", engine.world_size) != engine.world_size:
        logger.warning("checkpoint %s was written with %s ranks, resuming with %s: the data position is "
                       "not exact", ckpt, meta.get("world_size"), engine.world_size)
    engine.load_state(ckpt)
    rng_file = ckpt / f"rng_rank{engine.rank}.pt"
    if rng_file.is_file():
        set_rng_state(torch.load(rng_file, weights_only=False))
    logger.info("resumed from %s (step %s, epoch %s, batch %s)", ckpt, meta["step"], meta["epoch"], meta["batch"])
    return {**meta, "path": str(ckpt)}
