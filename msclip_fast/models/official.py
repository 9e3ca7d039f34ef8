"""Map between our state-dict layout and the official MS-CLIP code's (Hxyou/MSCLIP,
``clip_openai_pe_res_v1``), whose checkpoints store every shared tensor under both the vision
key (``visual.transformer.resblocks.<i>...``) and the text key (``transformer.resblocks.<i>...``)
and keep each LayerNorm as its own ``(D,)`` tensors.

Names were read from the official module definitions (not copied code):
early-conv stem = ``visual.transformer.resblocks.0`` (``conv1``, ``bn1``,
``resnet_stage.conv_<k>.{conv1,bn1,downsample.0,downsample.1}``, ``last_conv``); parallel
branch = ``visual.transformer.parallel_branch_v.<j>`` (stage 0 ``conv``/``bn``; later stages
``resnet_stage.conv_0.{conv1,bn1,conv2,bn2,conv3,bn3,residual_conv,residual_bn}``); adapters
= ``visual.transformer.parallel_lateral_adapter.<j>.{top2bottom_dw_conv.{conv,bn},
top2bottom_pw_conv.conv, bottom_dw_conv.{conv,bn}, ln_adapt}``.
"""
from __future__ import annotations

import re

import torch

_V, _T = "visual.transformer.resblocks.", "transformer.resblocks."
_ADAPTER = {"branch_dw.0": "top2bottom_dw_conv.conv", "branch_dw.1": "top2bottom_dw_conv.bn",
            "branch_pw": "top2bottom_pw_conv.conv", "grid_dw.0": "bottom_dw_conv.conv",
            "grid_dw.1": "bottom_dw_conv.bn", "ln_adapt": "ln_adapt"}
_BOTTLENECK = {"conv1.0": "conv1", "conv1.1": "bn1", "conv2.0": "conv2", "conv2.1": "bn2", "conv3.0": "conv3",
               "conv3.1": "bn3", "shortcut.0": "residual_conv", "shortcut.1": "residual_bn"}
_TOP = {"visual.class_embedding", "visual.positional_embedding", "visual.proj", "logit_scale"}
# SigLIP's learned logit bias has no counterpart in the official (InfoNCE) code: it is written
# under its own name, and an official checkpoint without it leaves the model's initial value
_OPTIONAL = {"logit_bias"}
_TEXT_TOP = {"text.token_embedding.weight": "token_embedding.weight",
             "text.positional_embedding": "positional_embedding", "text.text_projection": "text_projection"}


def _official(key: str, early: bool) -> tuple[str, list[str]]:
    """(kind, official keys) for our ``key``; kind: "copy" (one key), "shared" (one tensor
    stored under several keys) or "rows" (row r of our stacked tensor = key r)."""
    if key in _TOP or key in _OPTIONAL:
        return "copy", [key]
    if key in _TEXT_TOP:
        return "copy", [_TEXT_TOP[key]]
    m = re.fullmatch(r"visual\.(ln_pre|ln_post)\.(\w+)", key) or re.fullmatch(r"text\.(ln_final)\.(\w+)", key)
    if m:
        return "copy", [("visual." if key.startswith("visual.") else "") + f"{m[1]}.{m[2]}"]
    m = re.fullmatch(r"visual\.stem\.(.+)", key)
    if m:
        rest = m[1]
        if not early:
            return "copy", ["visual." + rest]  # PatchEmbed.conv1 -> visual.conv1
        rest = re.sub(r"^stages\.(\d+)\.", r"resnet_stage.conv_\1.", rest)
        return "copy", [_V + "0." + rest]
    m = re.fullmatch(r"visual\.branch\.stages\.0\.0\.([01])\.(\w+)", key)
    if m:
        return "copy", [f"visual.transformer.parallel_branch_v.0.{'conv' if m[1] == '0' else 'bn'}.{m[2]}"]
    m = re.fullmatch(r"visual\.branch\.stages\.(\d+)\.(\w+\.\d)\.(\w+)", key)
    if m and m[2] in _BOTTLENECK:
        return "copy", [f"visual.transformer.parallel_branch_v.{m[1]}.resnet_stage.conv_0.{_BOTTLENECK[m[2]]}.{m[3]}"]
    m = re.fullmatch(r"visual\.branch\.adapters\.(\d+)\.(\w+(?:\.\d)?)\.(\w+)", key)
    if m and m[2] in _ADAPTER:
        return "copy", [f"visual.transformer.parallel_lateral_adapter.{m[1]}.{_ADAPTER[m[2]]}.{m[3]}"]
    m = re.fullmatch(r"visual\.blocks\.(\d+)\.(.+)", key)
    if m:
        return "copy", [f"{_V}{m[1]}.{m[2]}"]
    m = re.fullmatch(r"text\.blocks\.(\d+)\.(.+)", key)
    if m:
        return "copy", [f"{_T}{m[1]}.{m[2]}"]
    m = re.fullmatch(r"blocks\.(\d+)\.(attn|mlp)\.(image|text)\.(.+)", key)
    if m:
        return "copy", [f"{_V if m[3] == 'image' else _T}{m[1]}.{m[2]}.{m[4]}"]
    m = re.fullmatch(r"blocks\.(\d+)\.((?:attn|mlp|ln_1|ln_2)\..+)", key)
    if m:
        kind = "rows" if m[2].startswith("ln_") else "shared"
        return kind, [f"{_V}{m[1]}.{m[2]}", f"{_T}{m[1]}.{m[2]}"]
    raise ValueError(f"parameter {key!r} has no equivalent in the official MS-CLIP layout")


def is_official_state_dict(sd: dict) -> bool:
    """True when ``sd`` uses the official layout (``*transformer.resblocks.*`` keys)."""
    return any(k.startswith((_V, _T)) for k in sd)


def from_official_state_dict(sd: dict, model) -> dict:
    """Our state dict for ``model`` from an official-layout ``sd`` (a shared tensor is read
    from its vision key; LayerNorm ``(D,)`` tensors are stacked into ``(M, D)``). A model
    ``logit_bias`` (SigLIP) absent from ``sd`` keeps the model's current value.

    Raises:
        ValueError: a key ``model`` needs is absent from ``sd``.
    """
    early = model.config.early_specialization
    out = {}
    for key, ref in model.state_dict().items():
        kind, names = _official(key, early)
        missing = [n for n in names if n not in sd]
        if key in _OPTIONAL and missing:
            out[key] = ref.clone()
            continue
        if kind == "rows" and ref.shape[0] == 1:
            names, missing = names[:1], [n for n in names[:1] if n not in sd]
        if missing:
            raise ValueError(f"official state dict lacks {missing[0]!r} (needed for {key!r})")
        if kind == "rows":
            t = torch.stack([sd[n].reshape(ref.shape[1:]) for n in names])
        else:
            t = sd[names[0]]
        out[key] = t.reshape(ref.shape) if t.numel() == ref.numel() else t
    return out


def to_official_state_dict(model) -> dict:
    """The official layout of ``model``'s weights: each shared tensor written under both the
    vision and the text key, each LayerNorm row as its own ``(D,)`` tensor; a ``logit_bias``
    (SigLIP, not in the official code) under ``logit_bias``."""
    early = model.config.early_specialization
    out = {}
    for key, t in model.state_dict().items():
        kind, names = _official(key, early)
        if kind == "rows":
            rows = [t[0]] * len(names) if t.shape[0] == 1 else list(t)
            out.update({n: r.clone() for n, r in zip(names, rows)})
        else:
            for n in names:
                # ModalityLayerNorm (1, D) -> official (D,)
                out[n] = t.reshape(-1).clone() if (t.dim() == 2 and t.shape[0] == 1 and ("ln_" in key)) else t.clone()
    return out
