"""Presets, model construction and loading (DESIGN §5, checkpoint layout in CONTRACTS)."""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from .config import ModelConfig
from .msclip import MSCLIP
from .official import from_official_state_dict, is_official_state_dict

CONFIG_DIR = Path(__file__).parent / "configs"


def list_models() -> list[str]:
    """Preset names (the JSON files in ``configs/``), sorted."""
    return sorted(p.stem for p in CONFIG_DIR.glob("*.json"))


def get_model_config(name: str) -> ModelConfig:
    """The validated :class:`ModelConfig` of preset ``name``.

    Raises:
        ValueError: unknown preset name (the message lists the presets).
    """
    if not isinstance(name, str) or name not in list_models():
        raise ValueError(f"model name {name!r} is not a preset; choose one of {list_models()}")
    with open(CONFIG_DIR / f"{name}.json") as f:
        return ModelConfig.from_dict(json.load(f))


def create_model_from_config(cfg: ModelConfig | dict) -> MSCLIP:
    """An initialized :class:`MSCLIP` (training mode) for ``cfg`` (a ModelConfig or its dict)."""
    if isinstance(cfg, dict):
        cfg = ModelConfig.from_dict(cfg)
    if not isinstance(cfg, ModelConfig):
        raise ValueError(f"cfg must be a ModelConfig or dict, got {type(cfg).__name__}")
    return MSCLIP(cfg)


def create_model(name: str, **overrides) -> MSCLIP:
    """Preset ``name`` with top-level config fields replaced by ``overrides`` (``vision``/``text``
    may be dicts of sub-fields), e.g. ``create_model("msclip-s-tiny", packed=False)``."""
    cfg = get_model_config(name)
    if overrides:
        cfg = cfg.replace(**overrides)
    return create_model_from_config(cfg)


def _resolve_checkpoint(path: str | os.PathLike) -> tuple[Path, Path]:
    """(model.pt, config.json) for a run dir, a checkpoint dir, or a model.pt file."""
    p = Path(path)
    if p.is_file():
        return p, p.parent / "config.json"
    if not p.is_dir():
        raise ValueError(f"checkpoint path {str(p)!r} does not exist")
    latest = p / "checkpoints" / "latest"
    if latest.is_file():
        p = p / "checkpoints" / latest.read_text().strip()
    if not (p / "model.pt").is_file():
        raise ValueError(f"no model.pt in {str(p)!r} (expected a run dir with checkpoints/latest, "
                         "a checkpoint dir, or a model.pt file)")
    return p / "model.pt", p / "config.json"


def load_model(path: str | os.PathLike, map_location="cpu", config: ModelConfig | dict | None = None) -> MSCLIP:
    """Load a model in eval mode.

    Args:
        path: a run dir (uses ``path/checkpoints/latest``), a checkpoint dir holding
            ``model.pt`` + ``config.json``, or a ``model.pt`` file (``config.json`` beside it).
            ``model.pt`` is a state_dict (optionally wrapped as ``{"state_dict"|"model": ...}``)
            in our layout or the official MS-CLIP layout (shared tensors under both towers).
        map_location: passed to ``torch.load``.
        config: use this config instead of ``config.json`` (needed for official checkpoints).
    Raises:
        ValueError: missing files, or a state dict that does not fit the config.
    """
    model_pt, config_json = _resolve_checkpoint(path)
    if config is None:
        if not config_json.is_file():
            raise ValueError(f"no config.json beside {str(model_pt)!r}; pass config=")
        with open(config_json) as f:
            config = json.load(f)
    model = create_model_from_config(config)
    sd = torch.load(model_pt, map_location=map_location, weights_only=True)
    for key in ("state_dict", "model", "module"):
        if isinstance(sd, dict) and key in sd and isinstance(sd[key], dict):
            sd = sd[key]
    sd = {k[len("module."):] if k.startswith("module.") else k: v for k, v in sd.items()}
    if is_official_state_dict(sd):
        sd = from_official_state_dict(sd, model)
    missing, unexpected = model.load_state_dict(sd, strict=False)
    if missing or unexpected:
        raise ValueError(f"state dict of {str(model_pt)!r} does not fit the config: "
                         f"missing {missing[:10]}{'...' if len(missing) > 10 else ''}, "
                         f"unexpected {unexpected[:10]}{'...' if len(unexpected) > 10 else ''}")
    return model.eval()
