"""Map between our state-dict layout and OpenAI CLIP's / open_clip's (ViT models: ViT-B/32,
ViT-B/16 and any other plain-CLIP ViT shape, e.g. ``clip-tiny``).

The layout was read from the module definitions (names only, no code copied):

- OpenAI CLIP ``clip/model.py``: ``VisionTransformer`` holds ``conv1`` (bias-free patchify),
  ``class_embedding``, ``positional_embedding``, ``ln_pre``, ``transformer.resblocks.<i>``,
  ``ln_post`` and ``proj``; ``CLIP`` puts the vision tower under ``visual.`` and keeps the text
  tower at the top level (``token_embedding``, ``positional_embedding``,
  ``transformer.resblocks.<i>``, ``ln_final``, ``text_projection``) next to ``logit_scale``;
  ``ResidualAttentionBlock`` = ``ln_1``, ``attn`` (``nn.MultiheadAttention``:
  ``in_proj_weight`` ``(3D, D)``, ``in_proj_bias``, ``out_proj.{weight,bias}``), ``ln_2``,
  ``mlp`` (``c_fc``, activation, ``c_proj``). Its released ``.pt`` files are TorchScript
  archives whose state dict also carries ``input_resolution``, ``context_length`` and
  ``vocab_size`` entries (OpenAI's own ``build_model`` deletes them).
- open_clip ``open_clip/transformer.py`` (``VisionTransformer``, ``TextTransformer``,
  ``ResidualAttentionBlock``) and ``open_clip/model.py`` (``CLIP``): the same names; the
  causal mask is a non-persistent ``attn_mask`` buffer (older versions saved it).
  SigLIP-style models add a top-level ``logit_bias``.

Every LayerNorm there is ``(D,)``; ours are ``ModalityLayerNorm`` rows ``(1, D)``. A plain CLIP
model's official MS-CLIP layout (:mod:`.official`) has the same names, so this layout is the
official one restricted to models without sharing, stem or parallel branch.

What the state dict does not say: the FFN activation. OpenAI's weights were trained with
QuickGELU (open_clip's ``*-quickgelu`` configs use it too); open_clip's plain configs such as
``"ViT-B-32"`` use exact GELU. The model's ``act`` config field selects it (``"quick_gelu"``,
``"gelu"``). LayerNorm epsilon is 1e-5 in both codebases (``ln_eps``).
"""
from __future__ import annotations

import re

import torch

# entries of OpenAI's TorchScript state dicts that are not weights; checked against the config
OPENAI_EXTRAS = {"input_resolution": ("vision", "image_size"), "context_length": ("text", "context_length"),
                 "vocab_size": ("text", "vocab_size")}
OPENAI_LN_EPS = 1e-5

_TOP = {"logit_scale", "logit_bias", "visual.class_embedding", "visual.positional_embedding", "visual.proj"}
_TEXT_TOP = {"text.token_embedding.weight": "token_embedding.weight",
             "text.positional_embedding": "positional_embedding", "text.text_projection": "text_projection",
             "text.ln_final.weight": "ln_final.weight", "text.ln_final.bias": "ln_final.bias"}


def is_ignored_key(key: str) -> bool:
    """Entries of OpenAI / open_clip / official files that are not weights: the causal
    ``attn_mask`` buffers and OpenAI's ``input_resolution`` / ``context_length`` /
    ``vocab_size``."""
    return key in OPENAI_EXTRAS or key == "attn_mask" or key.endswith(".attn_mask")


def check_extras(sd: dict, cfg) -> None:
    """Compare OpenAI's ``input_resolution`` / ``context_length`` / ``vocab_size`` entries
    (when present) with ``cfg``.

    Raises:
        ValueError: an entry that disagrees with the config (names both values).
    """
    bad = []
    for key, (tower, field) in OPENAI_EXTRAS.items():
        if key in sd:
            want = getattr(getattr(cfg, tower), field)
            got = int(sd[key].item()) if isinstance(sd[key], torch.Tensor) else int(sd[key])
            if got != want:
                bad.append(f"{key}={got} but the model's {tower}.{field}={want}")
    if bad:
        raise ValueError("state dict does not fit the model config: " + "; ".join(bad))


def open_clip_structure_errors(cfg) -> list[str]:
    """Why a model of config ``cfg`` has no OpenAI / open_clip layout (empty list: it has):
    that layout holds two separate ViT / text transformers only."""
    why = []
    if cfg.shares_any:
        why.append(f"share={list(cfg.share)} in layers {list(cfg.share_layers)} (towers share weights)")
    if cfg.early_specialization:
        why.append("early_specialization (conv stem instead of a patch embedding)")
    if cfg.vision.parallel_branch:
        why.append("vision.parallel_branch")
    if cfg.parallel_ffn_dim or cfg.parallel_attn_dim:
        why.append("parallel modules (parallel_ffn_dim / parallel_attn_dim)")
    return why


def open_clip_key(key: str) -> str:
    """The OpenAI / open_clip name of our parameter ``key`` (plain CLIP models).

    Raises:
        ValueError: ``key`` has no counterpart in that layout.
    """
    if key in _TOP:
        return key
    if key in _TEXT_TOP:
        return _TEXT_TOP[key]
    if key == "visual.stem.conv1.weight":
        return "visual.conv1.weight"
    m = re.fullmatch(r"visual\.(ln_pre|ln_post)\.(weight|bias)", key)
    if m:
        return key
    m = re.fullmatch(r"visual\.blocks\.(\d+)\.(.+)", key)
    if m:
        return f"visual.transformer.resblocks.{m[1]}.{m[2]}"
    m = re.fullmatch(r"text\.blocks\.(\d+)\.(.+)", key)
    if m:
        return f"transformer.resblocks.{m[1]}.{m[2]}"
    raise ValueError(f"parameter {key!r} has no equivalent in the OpenAI / open_clip layout")


def _is_ln(key: str) -> bool:
    return re.search(r"(^|\.)ln_(1|2|pre|post|final)\.(weight|bias)$", key) is not None


def to_open_clip_state_dict(model) -> dict:
    """``model``'s weights in the OpenAI / open_clip layout: the exact key set of
    ``open_clip.model.CLIP(...).state_dict()`` for the same architecture (LayerNorms ``(D,)``,
    no ``attn_mask``; ``logit_bias`` only when the model has one). Tensors are copies.
    Load it with ``open_clip_model.load_state_dict(sd)``; OpenAI's ``clip.model.build_model(sd)``
    accepts it too.

    Raises:
        ValueError: the model's structure has no such layout (shared blocks, conv stem,
            parallel branch or modules): the message names why.
    """
    why = open_clip_structure_errors(model.config)
    if why:
        raise ValueError(f"model {model.config.name or '(unnamed)'!r} has no OpenAI / open_clip layout: "
                         + "; ".join(why) + " (use layout='official' or 'ours')")
    out = {}
    for key, t in model.state_dict().items():
        out[open_clip_key(key)] = (t.reshape(-1) if _is_ln(key) else t).detach().clone()
    return out


def from_open_clip_state_dict(sd: dict, model) -> dict:
    """Our state dict for ``model`` from an OpenAI / open_clip-layout ``sd`` (LayerNorm
    ``(D,)`` tensors become ``(1, D)`` rows; ``attn_mask`` and OpenAI's
    ``input_resolution`` / ``context_length`` / ``vocab_size`` entries are checked against the
    config and dropped). Tensors keep ``sd``'s dtype (``load_state_dict`` casts them). A
    model ``logit_bias`` absent from ``sd`` keeps the model's current value; a ``logit_bias``
    in ``sd`` that the model lacks is ignored, as in :mod:`.official`.

    Raises:
        ValueError: the model has no such layout, or ``sd`` does not fit it: one message
            listing every missing key, unexpected key and shape mismatch (both shapes).
    """
    why = open_clip_structure_errors(model.config)
    if why:
        raise ValueError(f"an OpenAI / open_clip state dict needs a plain CLIP model; model "
                         f"{model.config.name or '(unnamed)'!r} has " + "; ".join(why))
    check_extras(sd, model.config)
    out, used, missing, mismatched = {}, set(), [], []
    for key, ref in model.state_dict().items():
        name = open_clip_key(key)
        if name not in sd:
            if key == "logit_bias":
                out[key] = ref.clone()
            else:
                missing.append(name)
            continue
        used.add(name)
        t = sd[name]
        if not fits(t.shape, ref.shape):
            mismatched.append(f"{name}: checkpoint {tuple(t.shape)} vs model {tuple(ref.shape)}")
            continue
        out[key] = t.reshape(ref.shape)
    unexpected = [k for k in sd if k not in used and not is_ignored_key(k) and k != "logit_bias"]
    raise_if_unfit("OpenAI / open_clip", missing, unexpected, mismatched)
    return out


def fits(shape, ref_shape) -> bool:
    """True when ``shape`` equals ``ref_shape`` up to size-1 dimensions (a LayerNorm ``(D,)``
    vs our ``(1, D)`` row; a DeepSpeed-promoted ``(1,)`` logit_scale vs 0-d)."""
    return [s for s in shape if s != 1] == [s for s in ref_shape if s != 1]


def raise_if_unfit(layout: str, missing: list, unexpected: list, mismatched: list, limit: int = 20) -> None:
    """Raise one ValueError listing (up to ``limit`` of) each kind of problem, if any."""
    if not (missing or unexpected or mismatched):
        return

    def show(items):
        return f"{items[:limit]}{f' ... ({len(items)} in all)' if len(items) > limit else ''}"

    parts = []
    if missing:
        parts.append(f"missing keys {show(missing)}")
    if unexpected:
        parts.append(f"unexpected keys {show(unexpected)}")
    if mismatched:
        parts.append(f"shape mismatches {show(mismatched)}")
    raise ValueError(f"{layout} state dict does not fit the model: " + "; ".join(parts))
