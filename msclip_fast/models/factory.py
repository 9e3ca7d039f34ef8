"""Presets, model construction and loading (DESIGN §5, checkpoint layout in CONTRACTS)."""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import warnings
import zipfile
from collections.abc import Mapping
from pathlib import Path

import torch

from .config import ModelConfig, TextConfig, VisionConfig
from .msclip import MSCLIP
from .official import detect_layout, from_official_state_dict, to_official_state_dict
from .openai import (OPENAI_EXTRAS, OPENAI_LN_EPS, fits, from_open_clip_state_dict, open_clip_structure_errors, raise_if_unfit,
                     to_open_clip_state_dict)

logger = logging.getLogger(__name__)

LAYOUTS = ("ours", "official", "open_clip")

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


def create_model(name: str, pretrained=None, **overrides) -> MSCLIP:
    """Preset ``name`` with top-level config fields replaced by ``overrides`` (``vision``/``text``
    may be dicts of sub-fields), e.g. ``create_model("msclip-s-tiny", packed=False)``; in
    training mode.

    ``pretrained``: weights to load (see :func:`load_pretrained` for what is accepted): a state
    dict or a file path in our layout, the official MS-CLIP layout, or OpenAI's / open_clip's
    (into a plain CLIP preset: ``clip-b32`` for ViT-B/32, ``clip-b16`` for ViT-B/16). With
    OpenAI / open_clip weights the LayerNorm epsilon becomes their 1e-5 unless ``ln_eps`` is
    given, and the FFN activation is the config's ``act``: ``"quick_gelu"`` (the presets'
    default) for OpenAI's weights and open_clip's ``*-quickgelu`` models, ``"gelu"`` for
    open_clip's plain configs such as ``"ViT-B-32"`` (the weights do not say which; a logged
    line names the one in use), e.g. ``create_model("clip-b32", pretrained=sd, act="gelu")``.

    Raises:
        ValueError: unknown preset or bad override (a tower field given at top level, e.g.
            ``width=``, says to pass ``vision={...}`` / ``text={...}``); weights that do not
            fit (missing, unexpected and shape-mismatched keys listed).
    """
    cfg = get_model_config(name)
    check_overrides(overrides)
    sd = None
    if pretrained is not None:
        sd = read_state_dict(pretrained)
        if (detect_layout(sd) == "open_clip" and "ln_eps" not in overrides
                and not open_clip_structure_errors(cfg.replace(**overrides) if overrides else cfg)):
            overrides = {**overrides, "ln_eps": OPENAI_LN_EPS}
    if overrides:
        cfg = cfg.replace(**overrides)
    model = create_model_from_config(cfg)
    if sd is not None:
        load_pretrained(model, sd)
    return model


def check_overrides(overrides: Mapping) -> None:
    """Reject unknown top-level override names, saying which tower config a name belongs to.

    Raises:
        ValueError: e.g. ``width``: "width is a field of vision (and text): pass
            vision={'width': ...}", with the valid top-level fields listed.
    """
    top = {f.name for f in dataclasses.fields(ModelConfig)}
    towers = {"vision": {f.name for f in dataclasses.fields(VisionConfig)},
              "text": {f.name for f in dataclasses.fields(TextConfig)}}
    unknown = [k for k in overrides if k not in top]
    if not unknown:
        return
    hints = []
    for k in unknown:
        owners = [t for t, names in towers.items() if k in names]
        if owners:
            also = f" (and {', '.join(owners[1:])})" if len(owners) > 1 else ""
            hints.append(f"{k} is a field of {owners[0]}{also}: pass {owners[0]}={{{k!r}: ...}}")
        else:
            hints.append(f"{k} is not a config field")
    raise ValueError(f"unknown override(s) {unknown}: {'; '.join(hints)}. Top-level fields: {sorted(top)}; "
                     f"vision fields: {sorted(towers['vision'])}; text fields: {sorted(towers['text'])}")


def get_preprocess(model, train: bool = False, seed: int | None = None):
    """The image preprocess of ``model``: a :class:`~msclip_fast.data.preprocess.Preprocess`
    with its ``image_size`` / ``image_mean`` / ``image_std``, doing exactly what the loaders do
    (transparency on white; eval: shorter side + center crop; train: the augmentation).

    ``preprocess(path | bytes | PIL image)`` -> ``(3, S, S)`` float32 tensor; stack them for
    ``model.encode_image``. Works for any MSCLIP (``load_model``, ``create_model``, a
    DeepSpeed/DDP ``.module`` wrapper); nothing is stored on the model, so its state dict is
    unchanged.

    Raises:
        ValueError: ``model`` has no ``image_size`` / ``image_mean`` / ``image_std``.
    """
    from ..data.preprocess import Preprocess

    m = model
    while not hasattr(m, "image_size") and hasattr(m, "module"):
        m = m.module
    try:
        size, mean, std = m.image_size, m.image_mean, m.image_std
    except AttributeError:
        raise ValueError(f"model must have image_size, image_mean and image_std, got {type(model).__name__}") from None
    return Preprocess(size, mean, std, train=train, seed=seed)


def create_model_and_transforms(name: str, pretrained=None, **overrides):
    """``(model, preprocess_train, preprocess_val)`` as open_clip's function of the same name.

    ``model`` is :func:`create_model` ``(name, pretrained, **overrides)`` (training mode);
    the two preprocess callables are :func:`get_preprocess` ``(model, train=True)`` and
    ``(model, train=False)``: path / bytes / PIL image -> ``(3, S, S)`` float32.

    Raises:
        ValueError: as :func:`create_model`.
    """
    model = create_model(name, pretrained=pretrained, **overrides)
    return model, get_preprocess(model, train=True), get_preprocess(model, train=False)


def read_state_dict(src, map_location="cpu") -> dict:
    """A flat ``{name: tensor}`` state dict from ``src``.

    Accepted: a state dict (mapping), or a path to a ``torch.save``'d state dict or to an
    OpenAI CLIP TorchScript archive (``ViT-B-32.pt``: read with ``torch.jit.load(...)
    .state_dict()``, which runs TorchScript: load only files you trust). Plain files are read
    with ``torch.load(weights_only=True)``. A ``{"state_dict" | "model" | "module": ...}``
    wrapper (open_clip and our training checkpoints) is unwrapped and ``module.`` (DDP) /
    ``_orig_mod.`` (torch.compile) key prefixes are stripped.

    Raises:
        ValueError: a missing file, or content that is not a state dict.
    """
    if isinstance(src, Mapping):
        sd = src
    else:
        path = Path(src)
        if not path.is_file():
            raise ValueError(f"weights file {str(path)!r} does not exist")
        if _is_torchscript(path):
            with warnings.catch_warnings():  # torch >= 2.9 marks TorchScript deprecated; these files are TorchScript
                warnings.simplefilter("ignore", FutureWarning)
                sd = torch.jit.load(str(path), map_location=map_location).state_dict()
        else:
            sd = torch.load(path, map_location=map_location, weights_only=True)
    for key in ("state_dict", "model", "module"):
        if isinstance(sd, Mapping) and key in sd and isinstance(sd[key], Mapping):
            sd = sd[key]
    if not isinstance(sd, Mapping) or not sd:
        raise ValueError(f"expected a non-empty state dict, got {type(sd).__name__}")
    out = {}
    for k, v in sd.items():
        while k.startswith(("module.", "_orig_mod.")):
            k = k.split(".", 1)[1]
        out[k] = v
    # OpenAI's input_resolution / context_length / vocab_size may be plain ints
    bad = [k for k, v in out.items() if not isinstance(v, torch.Tensor) and not (k in OPENAI_EXTRAS and isinstance(v, int))]
    if bad:
        raise ValueError(f"state dict entries must be tensors; not tensors: {bad[:5]}")
    return out


def _is_torchscript(path: Path) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as z:
        return any(n.split("/", 1)[-1] == "constants.pkl" for n in z.namelist())


def _from_ours(sd: dict, model) -> dict:
    ref = model.state_dict()
    missing = [k for k in ref if k not in sd]
    unexpected = [k for k in sd if k not in ref]
    mismatched = [f"{k}: checkpoint {tuple(sd[k].shape)} vs model {tuple(ref[k].shape)}"
                  for k in ref if k in sd and not fits(sd[k].shape, ref[k].shape)]
    raise_if_unfit("msclip_fast", missing, unexpected, mismatched)
    return {k: sd[k].reshape(ref[k].shape) for k in ref}


def _layout_name(layout: str) -> str:
    layout = "open_clip" if layout == "openai" else layout
    if layout not in LAYOUTS:
        raise ValueError(f"layout={layout!r}: must be one of {list(LAYOUTS)} (or 'openai', the same as 'open_clip')")
    return layout


def load_pretrained(model: MSCLIP, pretrained, layout: str = "auto", map_location="cpu") -> MSCLIP:
    """Load weights into ``model`` in place (strict) and return it.

    Args:
        model: the model; its config decides the architecture (this never changes ``act`` or
            ``ln_eps``: build the model with the values the weights were trained with, see
            :func:`create_model`).
        pretrained: what :func:`read_state_dict` accepts (a state dict, a ``torch.save`` file, an
            OpenAI TorchScript ``.pt``).
        layout: ``"auto"`` (from the keys, :func:`~.official.detect_layout`), ``"ours"``,
            ``"official"`` (MS-CLIP code: shared tensors under both towers' keys, checked equal),
            ``"open_clip"`` / ``"openai"`` (OpenAI CLIP / open_clip; plain CLIP models only). For
            a plain CLIP model the official and OpenAI layouts are the same names.
        map_location: passed to ``torch.load`` / ``torch.jit.load``.
    Raises:
        ValueError: weights that do not fit: every missing key, unexpected key and shape
            mismatch (both shapes) in one message; two aliases of a shared tensor that differ
            (official layout); OpenAI ``input_resolution`` / ``context_length`` /
            ``vocab_size`` that disagree with the config.
    """
    sd = read_state_dict(pretrained, map_location)
    hint = ""
    if layout == "auto":
        layout = detect_layout(sd)
        if layout != "ours":
            # the two external layouts name a plain CLIP model alike: the model decides
            if layout == "open_clip" and open_clip_structure_errors(model.config):
                hint = (" (these keys look like an OpenAI / open_clip checkpoint, which needs a plain CLIP "
                        "model such as clip-b32 / clip-b16)")
            layout = "official" if open_clip_structure_errors(model.config) else "open_clip"
    else:
        layout = _layout_name(layout)
    try:
        if layout == "ours":
            sd = _from_ours(sd, model)
        elif layout == "open_clip":
            sd = from_open_clip_state_dict(sd, model)
        else:
            sd = from_official_state_dict(sd, model)
    except ValueError as e:
        if not hint:
            raise
        raise ValueError(f"{e}{hint}") from None
    model.load_state_dict(sd, strict=True)
    cfg = model.config
    if layout == "open_clip":
        logger.info("loaded OpenAI / open_clip weights into %s: FFN activation act=%r (OpenAI's weights and open_clip "
                    "'-quickgelu' models need 'quick_gelu', open_clip's plain configs such as ViT-B-32 need 'gelu'), "
                    "LayerNorm eps %g (theirs: 1e-5)", cfg.name or "the model", cfg.act, cfg.ln_eps)
    else:
        logger.info("loaded %s-layout weights into %s (act=%r, ln_eps=%g)", layout, cfg.name or "the model",
                    cfg.act, cfg.ln_eps)
    return model


def export_state_dict(model: MSCLIP, layout: str) -> dict:
    """``model``'s weights as a new state dict (copies) in ``layout``:

    - ``"ours"``: ``model.state_dict()``;
    - ``"official"``: the official MS-CLIP code's names, each shared tensor under both the
      vision and the text key, each LayerNorm ``(D,)`` (:func:`~.official.to_official_state_dict`);
    - ``"open_clip"`` (or ``"openai"``): OpenAI CLIP / open_clip names, the exact key set of the
      open_clip ``CLIP`` of the same shape (plain CLIP models only: clip-b32, clip-b16,
      clip-tiny and overrides of them without sharing; :func:`~.openai.to_open_clip_state_dict`).

    Every layout loads back with :func:`load_pretrained` / ``create_model(..., pretrained=)``.

    Raises:
        ValueError: unknown layout, or ``"open_clip"`` for a model with shared blocks, a conv
            stem or a parallel branch (the message says which).
    """
    layout = _layout_name(layout)
    if layout == "ours":
        return {k: v.detach().clone() for k, v in model.state_dict().items()}
    if layout == "official":
        return to_official_state_dict(model)
    return to_open_clip_state_dict(model)


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


def load_model(path: str | os.PathLike, map_location="cpu", config: ModelConfig | dict | str | None = None) -> MSCLIP:
    """Load a model in eval mode.

    Args:
        path: a run dir (uses ``path/checkpoints/latest``), a checkpoint dir holding
            ``model.pt`` + ``config.json``, or a weights file (``config.json`` beside it unless
            ``config`` is given): a state dict (optionally wrapped as
            ``{"state_dict"|"model": ...}``, ``module.`` prefixes allowed) in our layout, the
            official MS-CLIP layout or the OpenAI / open_clip layout, or an OpenAI TorchScript
            ``.pt`` (see :func:`read_state_dict`, :func:`load_pretrained`).
        map_location: passed to ``torch.load``.
        config: use this config instead of ``config.json`` (needed for official and OpenAI /
            open_clip files): a ModelConfig, its dict, or a preset name (then, as in
            :func:`create_model`, OpenAI / open_clip weights get LayerNorm eps 1e-5).
    Raises:
        ValueError: missing files, or a state dict that does not fit the config.
    """
    model_pt, config_json = _resolve_checkpoint(path)
    if isinstance(config, str):
        return create_model(config, pretrained=read_state_dict(model_pt, map_location)).eval()
    if config is None:
        if not config_json.is_file():
            raise ValueError(f"no config.json beside {str(model_pt)!r}; pass config= (a preset name, dict or ModelConfig)")
        with open(config_json) as f:
            config = json.load(f)
    model = create_model_from_config(config)
    try:
        load_pretrained(model, model_pt, map_location=map_location)
    except ValueError as e:
        raise ValueError(f"weights of {str(model_pt)!r} do not fit the config: {e}") from None
    return model.eval()
