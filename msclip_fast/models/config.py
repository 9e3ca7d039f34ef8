"""Model architecture as data: dataclasses loaded from the JSON presets in ``configs/``.

Every field is validated; a bad value raises ``ValueError`` naming the field and the value,
and unknown keys are rejected (a typo never silently falls back to a default).
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from ..modules.block import SHARE_CHOICES
from ..ops import ACTIVATIONS

# OpenAI CLIP's normalization constants (RGB, for [0, 1] pixels).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def _fail(name: str, value: Any, why: str):
    raise ValueError(f"{name}={value!r}: {why}")


def _int(name, value, lo=None):
    if isinstance(value, bool) or not isinstance(value, int):
        _fail(name, value, "must be an int")
    if lo is not None and value < lo:
        _fail(name, value, f"must be >= {lo}")
    return value


def _int_list(name, value, lo=1):
    if not isinstance(value, (list, tuple)):
        _fail(name, value, "must be a list of ints")
    for v in value:
        if isinstance(v, bool) or not isinstance(v, int) or v < lo:
            _fail(name, value, f"must be a list of ints >= {lo}")
    return tuple(value)


def _bool(name, value):
    if not isinstance(value, bool):
        _fail(name, value, "must be true or false")
    return value


def _float(name, value):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        _fail(name, value, "must be a finite number")
    return float(value)


def _from_dict(cls, d: dict, prefix: str):
    if not isinstance(d, dict):
        _fail(prefix.rstrip("."), d, "must be a JSON object")
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
        raise ValueError(f"unknown config key(s) {[prefix + k for k in unknown]}; known: {sorted(names)}")
    return cls(**d)


@dataclass
class VisionConfig:
    """Image tower.

    Fields:
        image_size: input side in pixels (square).
        width, heads, layers: transformer width, heads, and number of block positions. With
            early specialization, position 0 is the conv stem, so ``layers - 1`` blocks run.
        patch_size: ViT patch (conv kernel = stride, bias-free) when there is no stem.
        stem_strides: strides of the stem's four residual stages (after its stride-2 first
            conv); token grid = image_size / (2 * prod(stem_strides)).
        parallel_branch: the efficient parallel CNN branch with lateral adapters.
        branch_strides: stride of each branch stage (stage 0: conv3x3+BN+ReLU; then
            bottleneck blocks); channels ``width / 2**(n-1-j)``.
        adapter_layers: vision block index before which adapter ``j`` runs (one per stage).
        adapter_kernels: depthwise kernel = stride of adapter ``j`` (maps stage ``j`` to the
            token grid).
        image_mean, image_std: normalization constants (CLIP's).
    """

    image_size: int = 224
    width: int = 768
    heads: int = 12
    layers: int = 12
    patch_size: int = 32
    stem_strides: tuple = (2, 2, 2, 2)
    parallel_branch: bool = False
    branch_strides: tuple = (2, 2, 2, 2, 2)
    adapter_layers: tuple = (2, 4, 6, 8, 10)
    adapter_kernels: tuple = (16, 8, 4, 2, 1)
    image_mean: tuple = CLIP_MEAN
    image_std: tuple = CLIP_STD

    def __post_init__(self):
        p = "vision."
        _int(p + "image_size", self.image_size, 1)
        _int(p + "width", self.width, 1)
        _int(p + "heads", self.heads, 1)
        if self.width % self.heads:
            _fail(p + "heads", self.heads, f"must divide vision.width={self.width}")
        _int(p + "layers", self.layers, 1)
        _int(p + "patch_size", self.patch_size, 1)
        self.stem_strides = _int_list(p + "stem_strides", self.stem_strides)
        if len(self.stem_strides) != 4:
            _fail(p + "stem_strides", self.stem_strides, "must have 4 entries (one per residual stage)")
        _bool(p + "parallel_branch", self.parallel_branch)
        self.branch_strides = _int_list(p + "branch_strides", self.branch_strides)
        self.adapter_layers = _int_list(p + "adapter_layers", self.adapter_layers, lo=0)
        self.adapter_kernels = _int_list(p + "adapter_kernels", self.adapter_kernels)
        for name in ("image_mean", "image_std"):
            v = getattr(self, name)
            if not isinstance(v, (list, tuple)) or len(v) != 3:
                _fail(p + name, v, "must be 3 numbers (RGB)")
            setattr(self, name, tuple(_float(p + name, x) for x in v))
        if any(s <= 0 for s in self.image_std):
            _fail(p + "image_std", self.image_std, "must be positive")


@dataclass
class TextConfig:
    """Text tower (causal transformer, EOT pooling)."""

    context_length: int = 77
    vocab_size: int = 49408
    width: int = 512
    heads: int = 8
    layers: int = 12

    def __post_init__(self):
        p = "text."
        _int(p + "context_length", self.context_length, 1)
        _int(p + "vocab_size", self.vocab_size, 2)
        _int(p + "width", self.width, 1)
        _int(p + "heads", self.heads, 1)
        if self.width % self.heads:
            _fail(p + "heads", self.heads, f"must divide text.width={self.width}")
        _int(p + "layers", self.layers, 1)


@dataclass
class ModelConfig:
    """A CLIP / MS-CLIP architecture.

    Fields:
        embed_dim: joint embedding width (bias-free projections).
        vision, text: tower configs.
        share: components shared between the towers in ``share_layers``: subset of
            {"attn", "mlp", "ln"}; empty = separate towers (CLIP). Needs equal tower widths
            and heads.
        share_layers: ``[start, end)`` block indices that share; default all layers (or
            ``[1, layers)`` with early specialization).
        early_specialization: vision block 0 becomes the conv stem and text block 0 stays
            text-only (so ``share_layers`` must start at >= 1).
        packed: ``model(images, tokens)`` runs image and text tokens through each shared
            block in one call (DESIGN §3); false runs the towers one after the other (same
            function). Default (null): true when attention and FFN are both shared; true
            with any other sharing raises.
        parallel_ffn_dim: hidden width of the optional per-modality bottleneck FFN beside
            each shared block (0 = off).
        parallel_attn_dim, parallel_attn_heads: width and heads of the optional light
            per-modality attention beside each shared block's attention (0 = off; the width
            must be a multiple of the heads).
        trim_text: each caption runs only its own ``eot + 1`` tokens (exactly the same
            features as the padded ``context_length``, since the text tower is causal and
            pools the EOT token; DESIGN §3); false runs every caption padded.
        mlp_ratio, act, ln_eps: FFN ratio, activation, LayerNorm epsilon.
        logit_scale_init: initial log temperature (CLIP: ln(1/0.07)); logit_scale_max: clamp of
            exp(logit_scale) (100).
        logit_bias_init: initial value of a learned 0-d ``logit_bias`` added to every logit
            (SigLIP, Zhai et al. 2023: -10, with logit_scale_init ln 10); null (the CLIP default)
            builds no bias parameter, and the forward returns three values instead of four.
        name: the preset name (informational).
    """

    embed_dim: int = 512
    vision: VisionConfig = field(default_factory=VisionConfig)
    text: TextConfig = field(default_factory=TextConfig)
    share: tuple = ()
    share_layers: tuple | None = None
    early_specialization: bool = False
    packed: bool | None = None
    parallel_ffn_dim: int = 0
    parallel_attn_dim: int = 0
    parallel_attn_heads: int = 1
    trim_text: bool = True
    mlp_ratio: float = 4.0
    act: str = "quick_gelu"
    ln_eps: float = 1e-12
    logit_scale_init: float = math.log(1 / 0.07)
    logit_scale_max: float = 100.0
    logit_bias_init: float | None = None
    name: str = ""

    def __post_init__(self):
        if isinstance(self.vision, dict):
            self.vision = _from_dict(VisionConfig, self.vision, "vision.")
        if isinstance(self.text, dict):
            self.text = _from_dict(TextConfig, self.text, "text.")
        if not isinstance(self.vision, VisionConfig):
            _fail("vision", self.vision, "must be a VisionConfig or object")
        if not isinstance(self.text, TextConfig):
            _fail("text", self.text, "must be a TextConfig or object")
        _int("embed_dim", self.embed_dim, 1)
        if not isinstance(self.name, str):
            _fail("name", self.name, "must be a string")
        if isinstance(self.share, str) or not isinstance(self.share, (list, tuple, set, frozenset)):
            _fail("share", self.share, f"must be a list, subset of {list(SHARE_CHOICES)}")
        if any(s not in SHARE_CHOICES for s in self.share) or len(set(self.share)) != len(self.share):
            _fail("share", self.share, f"must be distinct entries of {list(SHARE_CHOICES)}")
        self.share = tuple(s for s in SHARE_CHOICES if s in self.share)
        _bool("early_specialization", self.early_specialization)
        _int("parallel_ffn_dim", self.parallel_ffn_dim, 0)
        _int("parallel_attn_dim", self.parallel_attn_dim, 0)
        _int("parallel_attn_heads", self.parallel_attn_heads, 1)
        if self.parallel_attn_dim % self.parallel_attn_heads:
            _fail("parallel_attn_heads", self.parallel_attn_heads,
                  f"must divide parallel_attn_dim={self.parallel_attn_dim}")
        _bool("trim_text", self.trim_text)
        self.mlp_ratio = _float("mlp_ratio", self.mlp_ratio)
        if self.mlp_ratio <= 0:
            _fail("mlp_ratio", self.mlp_ratio, "must be positive")
        if self.act not in ACTIVATIONS:
            _fail("act", self.act, f"must be one of {list(ACTIVATIONS)}")
        self.ln_eps = _float("ln_eps", self.ln_eps)
        if self.ln_eps <= 0:
            _fail("ln_eps", self.ln_eps, "must be positive")
        self.logit_scale_init = _float("logit_scale_init", self.logit_scale_init)
        self.logit_scale_max = _float("logit_scale_max", self.logit_scale_max)
        if self.logit_scale_max <= 0:
            _fail("logit_scale_max", self.logit_scale_max, "must be positive")
        if self.logit_bias_init is not None:
            self.logit_bias_init = _float("logit_bias_init", self.logit_bias_init)
        v, t = self.vision, self.text
        n_common = min(v.layers, t.layers)
        first = 1 if self.early_specialization else 0
        if self.share_layers is None:
            self.share_layers = (first, n_common) if self.share else (0, 0)
        sl = self.share_layers
        if (not isinstance(sl, (list, tuple)) or len(sl) != 2
                or any(isinstance(x, bool) or not isinstance(x, int) for x in sl)):
            _fail("share_layers", sl, "must be [start, end) block indices")
        self.share_layers = tuple(sl)
        if not 0 <= sl[0] <= sl[1] <= n_common:
            _fail("share_layers", sl, f"must satisfy 0 <= start <= end <= {n_common} (layers of the shorter tower)")
        if self.share and self.early_specialization and sl[0] < 1 and sl[1] > 0:
            _fail("share_layers", sl, "must start at >= 1 with early_specialization (vision block 0 is the stem)")
        if self.shares_any:
            if v.width != t.width:
                _fail("text.width", t.width, f"must equal vision.width={v.width} when share={list(self.share)}")
            if v.heads != t.heads:
                _fail("text.heads", t.heads, f"must equal vision.heads={v.heads} when share={list(self.share)}")
        if self.parallel_ffn_dim and not self.shares_any:
            _fail("parallel_ffn_dim", self.parallel_ffn_dim, "needs shared layers (share and share_layers)")
        if self.parallel_attn_dim and not self.shares_any:
            _fail("parallel_attn_dim", self.parallel_attn_dim, "needs shared layers (share and share_layers)")
        can_pack = self.shares_any and {"attn", "mlp"} <= set(self.share)
        if self.packed is None:
            self.packed = can_pack
        _bool("packed", self.packed)
        if self.packed and not can_pack:
            _fail("packed", self.packed, "needs share to include 'attn' and 'mlp' with a non-empty share_layers")
        self._check_vision_geometry()

    # -- derived --------------------------------------------------------------------------
    @property
    def shares_any(self) -> bool:
        return bool(self.share) and self.share_layers[1] > self.share_layers[0]

    def shared_layer_ids(self) -> range:
        return range(*self.share_layers) if self.shares_any else range(0)

    def vision_first_block(self) -> int:
        return 1 if self.early_specialization else 0

    @property
    def grid_size(self) -> int:
        """Side of the vision token grid."""
        v = self.vision
        if self.early_specialization:
            return v.image_size // (2 * math.prod(v.stem_strides))
        return v.image_size // v.patch_size

    def _check_vision_geometry(self):
        v = self.vision
        if self.early_specialization:
            down = 2 * math.prod(v.stem_strides)
            if v.image_size % down:
                _fail("vision.stem_strides", v.stem_strides,
                      f"total stride {down} must divide vision.image_size={v.image_size}")
            if v.width % 16:
                _fail("vision.width", v.width, "must be a multiple of 16 for the conv stem (width/16 channels)")
        elif v.image_size % v.patch_size:
            _fail("vision.patch_size", v.patch_size, f"must divide vision.image_size={v.image_size}")
        if not v.parallel_branch:
            return
        n = len(v.branch_strides)
        if n == 0:
            _fail("vision.branch_strides", v.branch_strides, "must not be empty with parallel_branch")
        if len(v.adapter_layers) != n:
            _fail("vision.adapter_layers", v.adapter_layers, f"needs one entry per branch stage ({n})")
        if len(v.adapter_kernels) != n:
            _fail("vision.adapter_kernels", v.adapter_kernels, f"needs one entry per branch stage ({n})")
        if list(v.adapter_layers) != sorted(set(v.adapter_layers)):
            _fail("vision.adapter_layers", v.adapter_layers, "must be strictly increasing")
        first = self.vision_first_block()
        if v.adapter_layers[0] < first or v.adapter_layers[-1] >= v.layers:
            _fail("vision.adapter_layers", v.adapter_layers,
                  f"must lie in [{first}, {v.layers}) (vision blocks that run)")
        if v.width % (2 ** (n - 1)):
            _fail("vision.width", v.width, f"must be divisible by {2 ** (n - 1)} for {n} branch stages")
        size, grid = v.image_size, self.grid_size
        for j, (s, k) in enumerate(zip(v.branch_strides, v.adapter_kernels)):
            if size % s:
                _fail("vision.branch_strides", v.branch_strides, f"stage {j} stride {s} must divide its input {size}")
            size //= s
            if size % k or size // k != grid:
                _fail("vision.adapter_kernels", v.adapter_kernels,
                      f"adapter {j} maps a {size}x{size} map by {k} to {size // k}, not the {grid}x{grid} token grid")

    # -- (de)serialization ---------------------------------------------------------------
    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        """Build and validate from a JSON-able dict (nested "vision"/"text" objects)."""
        return _from_dict(cls, dict(d), "")

    def to_dict(self) -> dict:
        """JSON-able dict (tuples as lists); ``from_dict(to_dict())`` round-trips."""
        def conv(x):
            if isinstance(x, dict):
                return {k: conv(v) for k, v in x.items()}
            if isinstance(x, (list, tuple)):
                return [conv(v) for v in x]
            return x
        return conv(dataclasses.asdict(self))

    def replace(self, **overrides) -> "ModelConfig":
        """A validated copy with top-level fields replaced; dict values for "vision"/"text"
        update those sub-configs field by field."""
        d = self.to_dict()
        for k, v in overrides.items():
            if k in ("vision", "text") and isinstance(v, dict):
                d[k] = {**d[k], **v}
            else:
                d[k] = v
        if ("share" in overrides or "early_specialization" in overrides) and "share_layers" not in overrides:
            d["share_layers"] = None  # recompute the default for the new sharing
        if "packed" not in overrides and ("share" in overrides or "share_layers" in overrides):
            d["packed"] = None
        return ModelConfig.from_dict(d)
