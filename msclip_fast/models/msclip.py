"""MSCLIP: CLIP (Radford et al. 2021) and MS-CLIP (You et al. 2022, arXiv 2207.12661) in one
module, the sharing spectrum selected by :class:`ModelConfig` (DESIGN §2)."""
from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

from ..modules.block import TransformerBlock
from ..modules.layer_norm import IMAGE, TEXT, ModalityLayerNorm
from ..modules.packing import PackedBatch
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

    ``cfg.packed``: ``forward(images, tokens)`` runs every shared block once on the packed
    image+text tokens (DESIGN §3, :meth:`forward_features`); ``encode_image`` /
    ``encode_text`` always run per tower. Both paths compute the same function.
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
        L2-normalized, ``scale = exp(logit_scale)`` clamped at ``logit_scale_max`` (0-d).
        ``B`` and ``B'`` may differ. Packed execution when ``config.packed``."""
        img, txt = self.forward_features(images, tokens)
        scale = self.logit_scale.exp().clamp(max=self.config.logit_scale_max)
        return F.normalize(img, dim=-1), F.normalize(txt, dim=-1), scale

    def forward_features(self, images: torch.Tensor, tokens: torch.Tensor,
                         packed: bool | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Unnormalized ``(image (B, E), text (B', E))`` features of both towers.

        Args:
            images: ``(B, 3, H, W)`` float, normalized.
            tokens: ``(B', context_length)`` int64; ``B'`` may differ from ``B``.
            packed: packed (True) or per-tower (False) execution; default ``config.packed``.
                Packed needs a config whose shared blocks share attention and FFN.
        Raises:
            ValueError: bad input shapes, or ``packed=True`` on a config that cannot pack.
        """
        packed = self.config.packed if packed is None else packed
        if not packed:
            x = images.to(self.visual.class_embedding.dtype)
            return self.visual(x, self.vision_blocks()), self.text(tokens, self.text_blocks())
        if not all(b.can_pack for b in self.blocks.values()) or not self.blocks:
            raise ValueError(f"packed execution needs share to include 'attn' and 'mlp' with non-empty share_layers; "
                             f"this model has share={list(self.config.share)}, "
                             f"share_layers={list(self.config.share_layers)}")
        return self._features_packed(images, tokens)

    def _features_packed(self, images: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Packed execution (DESIGN §3).

        1. Per-tower prefixes: vision stem/patchify + CLS + pos-emb + ln_pre and any vision-only
           blocks before the shared range (with their adapters); text embeddings and the
           text-only blocks before it (MS-CLIP-S: text block 0).
        2. Shared blocks ``start .. end-1`` on ``x (T, D)``, images first: one GEMM per shared
           weight, one varlen attention call, one modality-indexed LayerNorm call per LN; the
           residual add that ends a block is fused into the next block's ln_1. A lateral
           adapter sitting before shared block ``i`` acts on the image slice between blocks.
        3. Unpack; tower-only blocks after the shared range; CLS / EOT pooling, projections.
        The packing metadata is built once, on the host, from the shapes (no host syncs).
        """
        v, t = self.visual, self.text
        start, end = self.config.share_layers
        images = images.to(v.class_embedding.dtype)
        xi, branch = v.embed(images), images
        for i in range(v.first_block, start):
            xi, branch = v.adapt(i, xi, branch)
            xi = v.blocks[str(i)](xi, IMAGE, causal=False)
        xt = t.embed(tokens)
        for i in range(0, start):
            xt = t.blocks[str(i)](xt, TEXT, causal=True)
        xt = xt.to(xi.dtype)

        pack = PackedBatch.build(xi.shape[0], xi.shape[1], xt.shape[0], xt.shape[1], device=xi.device)
        x, y = pack.pack(xi, xt), None
        n_img = pack.image_rows
        for i in range(start, end):
            if i in v.adapter_layers:
                if y is not None:
                    x, y = x + y, None
                img, branch = v.adapt(i, x[:n_img].reshape(pack.num_images, pack.image_len, -1), branch)
                x = torch.cat([img.reshape(n_img, -1), x[n_img:]], 0)
            x, y = self.blocks[str(i)].forward_packed(x, pack, y)
        xi, xt = pack.unpack(x + y)

        for i in range(end, v.layers):
            xi, branch = v.adapt(i, xi, branch)
            xi = v.blocks[str(i)](xi, IMAGE, causal=False)
        for i in range(end, t.layers):
            xt = t.blocks[str(i)](xt, TEXT, causal=True)
        return v.pool(xi), t.pool(xt, tokens)
