"""MSCLIP: CLIP (Radford et al. 2021) and MS-CLIP (You et al. 2022, arXiv 2207.12661) in one
module, the sharing spectrum selected by :class:`ModelConfig` (DESIGN §2)."""
from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

from ..modules.block import TransformerBlock
from ..modules.layer_norm import ModalityLayerNorm
from .config import ModelConfig
from .towers import TextTower, VisionTower

logger = logging.getLogger(__name__)


class MSCLIP(nn.Module):
    """Two towers whose blocks in ``cfg.share_layers`` share the components in ``cfg.share``.

    Layout of parameters:
        ``visual.*``: vision stem/patchify, embeddings, ln_pre/ln_post, parallel branch,
        vision-only blocks (``visual.blocks.<i>``), ``visual.proj``.
        ``text.*``: embeddings, text-only blocks (``text.blocks.<i>``), ln_final, projection.
        ``blocks.<i>``: blocks both towers run; shared components are single modules,
        per-modality LayerNorms stacked (2, D).
        ``logit_scale``: 0-d.

    ``cfg.packed``: accepted, but until issue 3 the packed mode runs the per-tower path
    (packed == per-tower; it is the same function).
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        v, t = cfg.vision, cfg.text
        self.visual = VisionTower(cfg)
        self.text = TextTower(cfg)
        self.blocks = nn.ModuleDict({
            str(i): TransformerBlock(v.width, v.heads, (0, 1), cfg.share, cfg.mlp_ratio, cfg.act, cfg.ln_eps,
                                     cfg.parallel_ffn_dim)
            for i in cfg.shared_layer_ids()
        })
        self.logit_scale = nn.Parameter(torch.tensor(float(cfg.logit_scale_init)))
        self._locked = {"image": False, "text": False}
        if cfg.packed:
            logger.debug("packed=True: running the per-tower path (same function) until packed execution lands")
        self._init_clip()

    # -- attributes of the public API -----------------------------------------------------
    @property
    def image_size(self) -> int:
        return self.config.vision.image_size

    @property
    def image_mean(self) -> tuple:
        return tuple(self.config.vision.image_mean)

    @property
    def image_std(self) -> tuple:
        return tuple(self.config.vision.image_std)

    @property
    def context_length(self) -> int:
        return self.config.text.context_length

    @property
    def embed_dim(self) -> int:
        return self.config.embed_dim

    # -- structure ------------------------------------------------------------------------
    def _init_clip(self) -> None:
        for tower_layers, blocks in ((self.config.vision.layers, self.visual.blocks),
                                     (self.config.text.layers, self.text.blocks),
                                     (self.config.vision.layers, self.blocks)):
            for blk in blocks.values():
                blk.init_clip(tower_layers)

    def vision_blocks(self) -> list[TransformerBlock]:
        """The block run at each vision position ``first .. layers-1``."""
        return [self.blocks[str(i)] if str(i) in self.blocks else self.visual.blocks[str(i)]
                for i in range(self.visual.first_block, self.visual.layers)]

    def text_blocks(self) -> list[TransformerBlock]:
        return [self.blocks[str(i)] if str(i) in self.blocks else self.text.blocks[str(i)]
                for i in range(self.text.layers)]

    def shared_parameter_names(self) -> set[str]:
        """Names (as in named_parameters()) of parameters applied to both modalities' tokens:
        the shared attention/FFN (and LayerNorms with "ln" in share). Stacked per-modality
        tensors ((2, D) LayerNorms, the parallel FFN) hold separate values per modality and
        are not listed."""
        return {f"blocks.{i}.{n}" for i, blk in self.blocks.items() for n in blk.shared_parameter_names()}

    def no_weight_decay_names(self) -> set[str]:
        """Gains, biases, BatchNorm/LayerNorm params, embeddings (token, positional, class)
        and logit_scale."""
        names = set()
        for mname, mod in self.named_modules():
            for pname, _ in mod.named_parameters(recurse=False):
                full = f"{mname}.{pname}" if mname else pname
                if (isinstance(mod, (ModalityLayerNorm, nn.BatchNorm2d, nn.Embedding, nn.LayerNorm))
                        or "bias" in pname
                        or pname in ("class_embedding", "positional_embedding", "logit_scale")):
                    names.add(full)
        return names

    def _tower_parameters(self, tower: str) -> list[nn.Parameter]:
        if tower == "image":
            return [*self.visual.parameters(), *(p for b in self.vision_blocks() for p in b.modality_parameters(0))]
        return [*self.text.parameters(), *(p for b in self.text_blocks() for p in b.modality_parameters(1))]

    def _lock(self, tower: str) -> None:
        for p in self._tower_parameters(tower):
            p.requires_grad_(False)
        self._locked[tower] = True
        self.train(self.training)  # puts the locked tower's BatchNorms in eval mode

    def lock_image_tower(self) -> None:
        """Freeze every parameter the image tower uses (shared blocks included, as one tensor
        serves both towers) and keep its BatchNorms in eval mode across ``.train()``."""
        self._lock("image")

    def lock_text_tower(self) -> None:
        """Freeze every parameter the text tower uses (shared blocks included)."""
        self._lock("text")

    def train(self, mode: bool = True):
        super().train(mode)
        for tower, locked in self._locked.items():
            if locked:
                for m in (self.visual if tower == "image" else self.text).modules():
                    if isinstance(m, nn.modules.batchnorm._BatchNorm):
                        m.eval()
        return self

    # -- forward --------------------------------------------------------------------------
    def encode_image(self, images: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """``images`` (B, 3, H, W) float, normalized with image_mean/std -> (B, embed_dim)."""
        x = images.to(self.visual.class_embedding.dtype)
        f = self.visual(x, self.vision_blocks())
        return F.normalize(f, dim=-1) if normalize else f

    def encode_text(self, tokens: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """``tokens`` (B, context_length) int64 -> (B, embed_dim)."""
        f = self.text(tokens, self.text_blocks())
        return F.normalize(f, dim=-1) if normalize else f

    def forward(self, images: torch.Tensor, tokens: torch.Tensor):
        """Returns ``(image_features (B, E), text_features (B', E), scale)``, features
        L2-normalized, ``scale = exp(logit_scale)`` clamped at ``logit_scale_max`` (0-d)."""
        img = self.encode_image(images)
        txt = self.encode_text(tokens)
        scale = self.logit_scale.exp().clamp(max=self.config.logit_scale_max)
        return img, txt, scale
