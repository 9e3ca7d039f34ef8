"""Instance-level, reversible patching of open_clip models with msclip_fast's ops.

:func:`patch` replaces, in ONE model instance (open_clip's classes are never modified), the
self-attention, LayerNorms and MLP of every supported residual block of the vision and text
towers, plus the towers' own LayerNorms (``ln_pre``, ``ln_post``, ``ln_final``), by the
drop-in modules of :mod:`msclip_fast.modules.dropin`: attention through
:func:`msclip_fast.ops.attention` (``causal=True`` where the block gets open_clip's causal
mask), LayerNorm through :func:`msclip_fast.ops.modality_layer_norm` and the MLP through
:func:`msclip_fast.ops.ffn`. The replacements own the very same parameter tensors under the
same names, so the state dict keys are open_clip's and a patched model's state dict loads
into an unpatched model and back. :func:`unpatch` puts the original modules back.

Supported (open-clip-torch 3.x): ``open_clip.CLIP`` and ``open_clip.CustomTextCLIP`` whose
vision tower is a ``VisionTransformer`` and/or whose text tower is open_clip's transformer,
with ``ResidualAttentionBlock`` (``nn.MultiheadAttention``) or ``CustomResidualAttentionBlock``
(open_clip ``Attention``) blocks, GELU (erf or tanh) or QuickGELU, ``nn.LayerNorm`` /
open_clip ``LayerNorm`` / ``LayerNormFp32`` norms. Anything else (see :func:`patch`) is left
alone, logged and listed in the report; a block is patched entirely or not at all.

open_clip is imported inside the functions only, so this module imports without it.
"""
from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field

from torch import nn

from ..modules.dropin import (
    DropInAttention,
    DropInLayerNorm,
    DropInMLP,
    DropInMultiheadAttention,
    multihead_attention_unsupported,
)
from ..ops import OPS
from ..ops.registry import BACKEND_NAMES

logger = logging.getLogger(__name__)

__all__ = ["PatchReport", "REPORT_ATTR", "is_patched", "patch", "unpatch"]

REPORT_ATTR = "_msclip_patch_report"
_DROPINS = (DropInMultiheadAttention, DropInAttention, DropInLayerNorm, DropInMLP)
_PARTS = ("attention", "layer_norm", "mlp")
_PART_OP = {"attention": "attention", "layer_norm": "modality_layer_norm", "mlp": "ffn"}


@dataclass
class PatchReport:
    """What :func:`patch` did (also stored on the model as ``model._msclip_patch_report``).

    Attributes:
        patched: module paths replaced (``"visual.transformer.resblocks.0.attn"`` ...).
        skipped: ``(path, reason)`` of every block or tower LayerNorm left as open_clip's.
        options: the requested parts (``attention``, ``layer_norm``, ``mlp``) and ``backend``.
    """

    patched: list[str] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    options: dict = field(default_factory=dict)


def _backends(backend) -> dict[str, str]:
    """Per-part backend names from ``backend`` (a name for all parts, or a mapping
    ``{"attention": ..., "layer_norm": ..., "mlp": ...}``; missing parts use "auto")."""
    if isinstance(backend, str):
        chosen = {p: backend for p in _PARTS}
    elif isinstance(backend, Mapping):
        unknown = set(backend) - set(_PARTS)
        if unknown:
            raise ValueError(f"backend mapping keys must be among {_PARTS}, got {sorted(unknown)}")
        chosen = {p: backend.get(p, "auto") for p in _PARTS}
    else:
        raise TypeError(f"backend must be a str or a mapping of part -> str, got {type(backend).__name__}")
    for part, name in chosen.items():
        if name == "auto":
            continue
        if name not in BACKEND_NAMES:
            raise ValueError(f"backend for {part} must be 'auto' or one of {BACKEND_NAMES}, got {name!r}")
        op = OPS[_PART_OP[part]]
        if name not in op.backends:
            raise ValueError(f"backend={name!r} is not a backend of the {op.name} op used for {part} "
                             f"(it has {['auto', *op.backends]}); pass a mapping to choose per part")
    return chosen


def _activation(m: nn.Module) -> str | None:
    """msclip_fast activation name of an open_clip MLP activation module, or None."""
    from open_clip.transformer import QuickGELU

    if type(m) is QuickGELU:
        return "quick_gelu"
    if type(m) is nn.GELU:
        return {"none": "gelu", "tanh": "gelu_tanh"}.get(m.approximate)
    return None


def _ln_unsupported(m: nn.Module) -> list[str]:
    """Reasons why :class:`DropInLayerNorm` cannot replace ``m``."""
    from open_clip.transformer import LayerNorm, LayerNormFp32

    if type(m) not in (nn.LayerNorm, LayerNorm, LayerNormFp32):
        return [f"norm type {type(m).__module__}.{type(m).__qualname__} is not nn.LayerNorm / open_clip "
                "LayerNorm / LayerNormFp32"]
    if len(m.normalized_shape) != 1:
        return [f"LayerNorm normalized_shape={tuple(m.normalized_shape)} is not one dim"]
    if m.weight is None or m.bias is None:
        return ["LayerNorm without affine weight and bias"]
    return []


def _mlp_unsupported(m: nn.Module) -> tuple[list[str], str | None]:
    """(reasons, activation name) for an open_clip block MLP."""
    if type(m) is not nn.Sequential:
        return [f"mlp type {type(m).__qualname__} is not open_clip's nn.Sequential(c_fc, act, c_proj)"], None
    names = list(m._modules)
    if names not in (["c_fc", "gelu", "c_proj"], ["c_fc", "gelu", "ln", "c_proj"]):
        return [f"mlp children {names} are not (c_fc, gelu[, ln], c_proj)"], None
    reasons = []
    if type(m.c_fc) is not nn.Linear or type(m.c_proj) is not nn.Linear:
        reasons.append("mlp c_fc/c_proj are not nn.Linear")
    if "ln" in names and type(m.ln) is not nn.Identity:
        reasons.append("mlp has a LayerNorm between c_fc and c_proj (scale_fc)")
    act = _activation(m.gelu)
    if act is None:
        desc = type(m.gelu).__qualname__ + (f"(approximate={m.gelu.approximate!r})" if type(m.gelu) is nn.GELU else "")
        reasons.append(f"mlp activation {desc} is not one of GELU (erf/tanh), QuickGELU")
    return reasons, act


def _custom_attention_unsupported(a: nn.Module) -> list[str]:
    """Reasons why :class:`DropInAttention` cannot replace an open_clip ``Attention``."""
    reasons = []
    if getattr(a, "logit_scale", None) is not None:
        reasons.append("scaled cosine attention")
    if type(getattr(a, "ln_q", None)) is not nn.Identity or type(getattr(a, "ln_k", None)) is not nn.Identity:
        reasons.append("qk-norm")
    if getattr(a, "head_scale", None) is not None:
        reasons.append("per-head scale (scale_heads)")
    if type(getattr(a, "ln_inner", None)) is not nn.Identity:
        reasons.append("inner LayerNorm (scale_attn_inner)")
    for name in ("attn_drop", "out_drop"):
        d = getattr(a, name, None)
        if d is None or getattr(d, "p", 0.0):
            reasons.append(f"{name} p={getattr(d, 'p', None)}")
    if getattr(a, "in_proj_weight", None) is None or a.in_proj_weight.shape[0] != 3 * a.in_proj_weight.shape[1]:
        reasons.append("no packed (3D, D) in_proj_weight")
    return reasons


def _plan_block(block: nn.Module, parts: dict[str, bool], backends: dict[str, str], mask_problem: str | None):
    """Replacements ``[(attr name, new module)]`` for one residual block, or ``(None, reason)``.
    Every requested part is checked before any module is built, so a block is all or nothing."""
    from open_clip.transformer import Attention, CustomResidualAttentionBlock, ResidualAttentionBlock

    reasons: list[str] = []
    custom = type(block) is CustomResidualAttentionBlock
    if type(block) is not ResidualAttentionBlock and not custom:
        return None, f"block type {type(block).__module__}.{type(block).__qualname__} is not supported"
    if hasattr(block, "ln_1_kv"):
        return None, "cross-attention block (ln_1_kv)"
    lns = ["ln_1", "ln_2"] + (["ln_attn"] if custom and type(block.ln_attn) is not nn.Identity else [])
    if parts["attention"]:
        if mask_problem:
            reasons.append(mask_problem)
        if custom:
            if type(block.attn) is not Attention:
                reasons.append(f"attn type {type(block.attn).__qualname__} is not open_clip Attention")
            else:
                reasons += _custom_attention_unsupported(block.attn)
        else:
            reasons += multihead_attention_unsupported(block.attn)
    if parts["layer_norm"]:
        for name in lns:
            reasons += [f"{name}: {r}" for r in _ln_unsupported(getattr(block, name))]
    act = None
    if parts["mlp"]:
        r, act = _mlp_unsupported(block.mlp)
        reasons += r
    if reasons:
        return None, "; ".join(reasons)
    plan = []
    if parts["attention"]:
        cls = DropInAttention if custom else DropInMultiheadAttention
        plan.append(("attn", cls(block.attn, backend=backends["attention"])))
    if parts["layer_norm"]:
        plan += [(name, DropInLayerNorm(getattr(block, name), backend=backends["layer_norm"])) for name in lns]
    if parts["mlp"]:
        plan.append(("mlp", DropInMLP(block.mlp, act, backend=backends["mlp"])))
    return plan, None


def _towers(model: nn.Module, report: PatchReport):
    """``[(prefix, transformer, [tower LayerNorm paths], mask_problem)]`` of the model's
    open_clip transformer towers; towers of other kinds are reported as skipped."""
    from open_clip.model import CLIP
    from open_clip.transformer import TextTransformer, Transformer, VisionTransformer

    towers = []
    visual = model.visual
    if type(visual) is VisionTransformer and type(visual.transformer) is Transformer:
        towers.append(("visual.", visual.transformer, ["visual.ln_pre", "visual.ln_post"], None))
    else:
        report.skipped.append(("visual", f"vision tower {type(visual).__qualname__} is not an open_clip "
                                         "VisionTransformer"))
    if isinstance(model, CLIP):
        # CLIP.encode_text passes exactly its attn_mask buffer (causal, or None with no_causal_mask)
        if type(model.transformer) is Transformer:
            towers.append(("", model.transformer, ["ln_final"], None))
        else:
            report.skipped.append(("transformer", f"text transformer {type(model.transformer).__qualname__}"))
    else:
        text = getattr(model, "text", None)
        if type(text) is TextTransformer and type(text.transformer) is Transformer:
            problem = None
            if text.use_pad_mask or text.cls_emb is not None:
                problem = ("text tower builds a padding / CLS attention mask (use_pad_mask or embed_cls): "
                           "not exactly causal")
            towers.append(("text.", text.transformer, ["text.ln_final"], problem))
        else:
            report.skipped.append(("text", f"text tower {type(text).__qualname__} is not an open_clip "
                                           "TextTransformer"))
    return towers


def _get(model: nn.Module, path: str) -> nn.Module:
    return model.get_submodule(path)


def _set(model: nn.Module, path: str, new: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, name, new)


def is_patched(model: nn.Module) -> bool:
    """Whether ``model`` holds any msclip_fast drop-in module (patched, e.g. by :func:`patch`)."""
    return any(isinstance(m, _DROPINS) for m in model.modules())


def _check_model(model) -> None:
    import open_clip

    if not isinstance(model, (open_clip.CLIP, open_clip.CustomTextCLIP)):
        raise TypeError(f"model must be an open_clip.CLIP or open_clip.CustomTextCLIP instance, got "
                        f"{type(model).__module__}.{type(model).__qualname__}")


def patch(model, attention: bool = True, layer_norm: bool = True, mlp: bool = True, backend="auto",
          return_report: bool = False):
    """Swap msclip_fast modules into one open_clip model instance, in place.

    Per residual block of each tower (``model.visual.transformer.resblocks``,
    ``model.transformer.resblocks`` for ``CLIP``, ``model.text.transformer.resblocks`` for
    ``CustomTextCLIP``) the requested parts are checked first; a block is patched only when
    all of them are supported (never half). Then ``attn`` becomes
    :class:`~msclip_fast.modules.dropin.DropInMultiheadAttention` (or
    :class:`~msclip_fast.modules.dropin.DropInAttention` for ``block_type="custom"`` blocks),
    ``ln_1``/``ln_2`` (and a custom block's ``ln_attn``)
    :class:`~msclip_fast.modules.dropin.DropInLayerNorm`, ``mlp``
    :class:`~msclip_fast.modules.dropin.DropInMLP`. With ``layer_norm`` the towers'
    ``ln_pre``, ``ln_post`` and ``ln_final`` are replaced too, each on its own.

    Left alone, logged (``logging``, warning) and listed in the report: non-ViT vision towers
    (ModifiedResNet, timm), HF text towers, cross-attention blocks, attention with qk-norm,
    scaled cosine attention, head scale, inner norm, dropout, add_bias_kv, kdim/vdim; a text
    tower whose mask is not exactly causal or None (``use_pad_mask``, ``embed_cls``); norms
    other than ``nn.LayerNorm``/open_clip ``LayerNorm``/``LayerNormFp32``; MLP activations
    other than GELU/QuickGELU or a ``scale_fc`` norm. ``AttentionalPooler`` is not touched.

    Patch after dtype conversion (``create_model(precision=...)`` converts before returning;
    open_clip's ``convert_weights_to_lp`` does not recognize the drop-in attention modules).

    Args:
        model: an ``open_clip.CLIP`` or ``open_clip.CustomTextCLIP`` (e.g. from
            ``open_clip.create_model``), not yet patched.
        attention, layer_norm, mlp: which parts to replace.
        backend: backend name for all ops ("auto", "reference", "triton", ...), or a mapping
            ``{"attention": ..., "layer_norm": ..., "mlp": ...}`` (missing parts: "auto").
        return_report: also return the :class:`PatchReport`.
    Returns:
        ``model`` (the same object), or ``(model, report)`` with ``return_report``. The report
        is also stored as ``model._msclip_patch_report``.
    Raises:
        TypeError: ``model`` is not an open_clip CLIP/CustomTextCLIP, or ``backend`` is
            neither a str nor a mapping.
        ValueError: an unknown backend, or one the op of a part lacks.
        RuntimeError: ``model`` is already patched (call :func:`unpatch` first).
    """
    _check_model(model)
    parts = {"attention": bool(attention), "layer_norm": bool(layer_norm), "mlp": bool(mlp)}
    backends = _backends(backend)
    if is_patched(model):
        raise RuntimeError("model is already patched by msclip_fast (see model._msclip_patch_report); "
                           "call msclip_fast.integrations.open_clip.unpatch(model) first")
    report = PatchReport(options={**parts, "backend": backend})
    swaps: list[tuple[str, nn.Module]] = []
    if any(parts.values()):
        for prefix, transformer, tower_lns, mask_problem in _towers(model, report):
            base = f"{prefix}transformer.resblocks"
            for i, block in enumerate(transformer.resblocks):
                plan, reason = _plan_block(block, parts, backends, mask_problem)
                if plan is None:
                    report.skipped.append((f"{base}.{i}", reason))
                else:
                    swaps += [(f"{base}.{i}.{name}", new) for name, new in plan]
            if parts["layer_norm"]:
                for path in tower_lns:
                    ln = _get(model, path)
                    if type(ln) is nn.Identity:
                        continue  # e.g. no_ln_pre
                    r = _ln_unsupported(ln)
                    if r:
                        report.skipped.append((path, "; ".join(r)))
                    else:
                        swaps.append((path, DropInLayerNorm(ln, backend=backends["layer_norm"])))
    for path, new in swaps:
        _set(model, path, new)
        report.patched.append(path)
    object.__setattr__(model, REPORT_ATTR, report)
    logger.info("msclip_fast: patched %d modules of %s (attention=%s, layer_norm=%s, mlp=%s, backend=%s)",
                len(report.patched), type(model).__qualname__, attention, layer_norm, mlp, backend)
    for path, reason in report.skipped:
        logger.warning("msclip_fast: left %s as open_clip's: %s", path, reason)
    return (model, report) if return_report else model


def unpatch(model):
    """Put back the original modules that :func:`patch` replaced, in place.

    Each drop-in's current parameters (and ``out_proj``/``c_fc``/``c_proj`` children) are
    handed back to its original module, so the model computes exactly what it computed
    before patching (with any training since applied). A model that is not patched is
    returned unchanged.

    Args:
        model: an ``open_clip.CLIP`` or ``open_clip.CustomTextCLIP``.
    Returns:
        ``model`` (the same object).
    Raises:
        TypeError: ``model`` is not an open_clip CLIP/CustomTextCLIP.
    """
    _check_model(model)
    found = [(name, m) for name, m in model.named_modules() if isinstance(m, _DROPINS)]
    for name, m in found:
        orig = m._orig
        for pname, p in m._parameters.items():
            if pname in orig._parameters:
                orig._parameters[pname] = p
        for cname, c in m._modules.items():
            if cname in orig._modules:
                orig._modules[cname] = c
        orig.train(m.training)
        _set(model, name, orig)
    if REPORT_ATTR in model.__dict__:
        object.__delattr__(model, REPORT_ATTR)
    logger.info("msclip_fast: unpatched %d modules of %s", len(found), type(model).__qualname__)
    return model
