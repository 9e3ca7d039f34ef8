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

from .openai import check_extras, fits, is_ignored_key, raise_if_unfit

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
    """True when ``sd`` uses the official layout (``*transformer.resblocks.*`` keys). A plain
    CLIP model's official layout is OpenAI's / open_clip's (:mod:`.openai`); use
    :func:`detect_layout` to tell them apart."""
    return any(k.startswith((_V, _T)) for k in sd)


# keys only the official MS-CLIP layout has (conv stem, parallel branch, adapters)
_OFFICIAL_ONLY = re.compile(r"^visual\.transformer\.(resblocks\.0\.(conv1|bn1|resnet_stage|last_conv)"
                            r"|parallel_branch_v|parallel_lateral_adapter)")


def detect_layout(sd: dict) -> str:
    """The layout of a state dict from its keys: ``"ours"`` (``visual.blocks.*``,
    ``text.*``, ``blocks.*``), ``"official"`` (MS-CLIP keys: conv stem, parallel branch, or
    shared tensors stored under both towers' keys), ``"open_clip"`` (OpenAI / open_clip:
    ``*transformer.resblocks.*``, ``token_embedding.weight``, ``visual.conv1.weight``).

    A plain-CLIP checkpoint is both ``"open_clip"`` and ``"official"`` (same names); it is
    reported as ``"open_clip"`` unless its vision and text blocks hold equal tensors (sharing).
    A dict with none of these markers is reported as ``"ours"`` (so that loading it lists what
    it lacks).
    """
    keys = list(sd)
    if any(k.startswith(("visual.blocks.", "visual.stem.", "text.", "blocks.")) for k in keys):
        return "ours"
    if any(_OFFICIAL_ONLY.match(k) for k in keys):
        return "official"
    if is_official_state_dict(sd) or "token_embedding.weight" in sd or "visual.conv1.weight" in sd:
        for k in keys:
            if k.startswith(_V) and k.endswith("attn.in_proj_weight"):
                t = sd.get(_T + k[len(_V):])
                if isinstance(t, torch.Tensor) and t.shape == sd[k].shape and torch.equal(t, sd[k]):
                    return "official"
        return "open_clip"
    return "ours"  # no external marker: checked (and its problems listed) as ours


def _max_abs_diff(a: torch.Tensor, b: torch.Tensor) -> str:
    if a.shape != b.shape:
        return f"shapes {tuple(a.shape)} vs {tuple(b.shape)}"
    return f"max abs difference {(a.double() - b.double()).abs().max().item():.3g}"


def from_official_state_dict(sd: dict, model) -> dict:
    """Our state dict for ``model`` from an official-layout ``sd`` (a shared tensor is read
    from its vision key after checking that its text alias holds the same values; LayerNorm
    ``(D,)`` tensors are stacked into ``(M, D)``). A model ``logit_bias`` (SigLIP) absent from
    ``sd`` keeps the model's current value; a ``logit_bias`` the model lacks is ignored, and so
    are ``attn_mask`` buffers and OpenAI's ``input_resolution`` / ``context_length`` /
    ``vocab_size`` entries (checked against the config).

    Raises:
        ValueError: ``sd`` does not fit ``model`` (one message listing every missing key,
            unexpected key and shape mismatch with both shapes), or the two aliases of a shared
            tensor differ (names the key pair and the max abs difference).
    """
    check_extras(sd, model.config)
    early = model.config.early_specialization
    out, used, missing, mismatched, aliases = {}, set(), [], [], []
    for key, ref in model.state_dict().items():
        kind, names = _official(key, early)
        if kind == "rows" and ref.shape[0] == 1:
            kind = "shared"  # one LayerNorm for both towers ("ln" shared), stored under both keys
        absent = [n for n in names if n not in sd]
        if key in _OPTIONAL and absent:
            out[key] = ref.clone()
            continue
        if absent:
            missing += [f"{n} (for {key})" for n in absent]
            continue
        used.update(names)
        want = ref.shape[1:] if kind == "rows" else ref.shape
        bad = [n for n in names if not fits(sd[n].shape, want)]
        if bad:
            mismatched += [f"{n}: checkpoint {tuple(sd[n].shape)} vs model {tuple(want)}" for n in bad]
            continue
        if kind == "rows":
            out[key] = torch.stack([sd[n].reshape(want) for n in names])
            continue
        if kind == "shared":
            for n in names[1:]:
                if not torch.equal(sd[n], sd[names[0]]):
                    aliases.append(f"{names[0]!r} vs {n!r}: {_max_abs_diff(sd[names[0]], sd[n])}")
        out[key] = sd[names[0]].reshape(ref.shape)
    unexpected = [k for k in sd if k not in used and k not in _OPTIONAL and not is_ignored_key(k)]
    raise_if_unfit("official MS-CLIP", missing, unexpected, mismatched)
    if aliases:
        raise ValueError("official state dict stores different values under the two keys of a shared tensor "
                         "(the model has one tensor for both towers): " + "; ".join(aliases[:10])
                         + (f" ... ({len(aliases)} in all)" if len(aliases) > 10 else ""))
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
