"""MSCLIP: CLIP (Radford et al. 2021) and MS-CLIP (You et al. 2022, arXiv 2207.12661) in one
module, the sharing spectrum selected by :class:`ModelConfig` (DESIGN §2)."""
from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

from ..modules.block import TransformerBlock
from ..modules.layer_norm import IMAGE, TEXT, ModalityLayerNorm
from .config import ModelConfig
from .executor import Stream, run_packed, run_per_tower
from .plan import ExecutionPlan
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
        ``logit_scale``: 0-d; ``logit_bias``: 0-d, only when ``cfg.logit_bias_init`` is set
        (SigLIP), else the attribute is None.

    Execution (DESIGN §3): one :class:`~.plan.ExecutionPlan` built from the config (which
    block runs at each position, for which modalities, with which adapter before it) and one
    executor. ``cfg.packed``: ``forward(images, tokens)`` runs every shared block once on the
    packed image+text tokens (:meth:`forward_features`); ``encode_image`` / ``encode_text``
    always run per tower. Both schedules compute the same function. ``cfg.trim_text``: each
    caption runs its own ``eot + 1`` tokens (the same features as the padded computation).
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        v, t = cfg.vision, cfg.text
        self.visual = VisionTower(cfg)
        self.text = TextTower(cfg)
        self.blocks = nn.ModuleDict({
            str(i): TransformerBlock(v.width, v.heads, (0, 1), cfg.share, cfg.mlp_ratio, cfg.act, cfg.ln_eps,
                                     cfg.parallel_ffn_dim, cfg.parallel_attn_dim, cfg.parallel_attn_heads)
            for i in cfg.shared_layer_ids()
        })
        self.plan = ExecutionPlan.from_config(cfg)
        self.logit_scale = nn.Parameter(torch.tensor(float(cfg.logit_scale_init)))
        # registered even when absent so that ``model.logit_bias`` is None rather than missing
        self.register_parameter("logit_bias", None if cfg.logit_bias_init is None
                                else nn.Parameter(torch.tensor(float(cfg.logit_bias_init))))
        self._locked = {"image": False, "text": False}
        self.grad_checkpointing = False
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
        """The block run at each vision position ``first .. layers-1`` (from the plan)."""
        return [self.get_submodule(p.block) for p in self.plan.tower(IMAGE)]

    def text_blocks(self) -> list[TransformerBlock]:
        """The block run at each text position ``0 .. layers-1`` (from the plan)."""
        return [self.get_submodule(p.block) for p in self.plan.tower(TEXT)]

    def shared_parameter_names(self) -> set[str]:
        """Names (as in named_parameters()) of parameters applied to both modalities' tokens:
        the shared attention/FFN (and LayerNorms with "ln" in share). Stacked per-modality
        tensors ((2, D) LayerNorms, the parallel FFN) hold separate values per modality and
        are not listed."""
        return {f"blocks.{i}.{n}" for i, blk in self.blocks.items() for n in blk.shared_parameter_names()}

    def no_weight_decay_names(self) -> set[str]:
        """Gains, biases, BatchNorm/LayerNorm params, embeddings (token, positional, class),
        logit_scale and logit_bias."""
        names = set()
        for mname, mod in self.named_modules():
            for pname, _ in mod.named_parameters(recurse=False):
                full = f"{mname}.{pname}" if mname else pname
                if (isinstance(mod, (ModalityLayerNorm, nn.BatchNorm2d, nn.Embedding, nn.LayerNorm))
                        or "bias" in pname
                        or pname in ("class_embedding", "positional_embedding", "logit_scale", "logit_bias")):
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

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute every transformer block in backward instead of storing its activations
        (``torch.utils.checkpoint``, non-reentrant), as open_clip's ``set_grad_checkpointing``.

        Applies to both schedules (packed and per tower) and to frozen towers alike; the
        gradients are those of the plain forward. Cost: one more forward of every block per
        backward. Stems, parallel-branch adapters (BatchNorm), pooling and projections keep
        their activations.
        """
        self.grad_checkpointing = bool(enable)

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
        images = images.to(self.visual.class_embedding.dtype)
        x, pack = self.visual.embed_flat(images)
        out = run_per_tower(self, self.plan, {IMAGE: Stream(x, pack)}, self.visual.adapter_runner(images))
        f = self.visual.pool(out[IMAGE])
        return F.normalize(f, dim=-1) if normalize else f

    def encode_text(self, tokens: torch.Tensor, normalize: bool = True, lengths=None) -> torch.Tensor:
        """``tokens`` (B, context_length) int64 -> (B, embed_dim).

        ``lengths``: ``(B,)`` host (CPU) lengths ``eot + 1`` of the captions, as
        :func:`~msclip_fast.modules.text_lengths` computes them from the CPU tokens (pass them
        when ``tokens`` are on a GPU: without them the model computes them, one host sync).
        Only used with ``config.trim_text``; the features are the same either way.
        """
        x, pack, pool = self.text.embed(tokens, lengths, trim=self.config.trim_text)
        out = run_per_tower(self, self.plan, {TEXT: Stream(x, pack)})
        f = self.text.pool(out[TEXT], pool)
        return F.normalize(f, dim=-1) if normalize else f

    def forward(self, images: torch.Tensor, tokens: torch.Tensor, text_lengths=None):
        """Returns ``(image_features (B, E), text_features (B', E), scale)``, features
        L2-normalized, ``scale = exp(logit_scale)`` clamped at ``logit_scale_max`` (0-d);
        a model with a ``logit_bias`` (SigLIP) returns ``(..., scale, logit_bias)`` (0-d, the
        bias's value with its gradient path), as open_clip's models do.
        ``B`` and ``B'`` may differ. Packed execution when ``config.packed``.
        ``text_lengths``: the captions' host lengths ``eot + 1`` (the loader's
        ``batch["text_lengths"]``), see :meth:`encode_text`."""
        img, txt = self.forward_features(images, tokens, text_lengths=text_lengths)
        scale = self.logit_scale.exp().clamp(max=self.config.logit_scale_max)
        out = (F.normalize(img, dim=-1), F.normalize(txt, dim=-1), scale)
        if self.logit_bias is None:
            return out
        # a copy, not the Parameter: ZeRO-3 releases (empties) a parameter's data when the
        # forward ends, so only a tensor computed inside it (like the scale) reaches the loss
        return (*out, self.logit_bias.clone())

    def forward_features(self, images: torch.Tensor, tokens: torch.Tensor, packed: bool | None = None,
                         text_lengths=None) -> tuple[torch.Tensor, torch.Tensor]:
        """Unnormalized ``(image (B, E), text (B', E))`` features of both towers.

        Both schedules of the plan (DESIGN §3): per tower, or packed: per-tower prefixes
        (vision stem/patchify + CLS + pos-emb + ln_pre and vision-only blocks with their
        adapters; text embeddings and text-only blocks, e.g. MS-CLIP-S text block 0), then the
        shared blocks on the packed image+text rows (one GEMM per shared weight, one varlen
        attention call, one modality-indexed LayerNorm call per LN; an adapter before a shared
        block acts on the image rows), then the tower-only suffixes, CLS / EOT pooling and
        projections. The packing metadata is built once, on the host, from host lengths.

        Args:
            images: ``(B, 3, H, W)`` float, normalized.
            tokens: ``(B', context_length)`` int64; ``B'`` may differ from ``B``.
            packed: packed (True) or per-tower (False) execution; default ``config.packed``.
                Packed needs a config whose shared blocks share attention and FFN.
            text_lengths: ``(B',)`` host lengths ``eot + 1``, or None (see :meth:`encode_text`).
        Raises:
            ValueError: bad input shapes or lengths, or ``packed=True`` on a config that cannot
                pack.
        """
        packed = self.config.packed if packed is None else packed
        if packed and self.plan.packed_span() is None:
            raise ValueError(f"packed execution needs share to include 'attn' and 'mlp' with non-empty share_layers; "
                             f"this model has share={list(self.config.share)}, "
                             f"share_layers={list(self.config.share_layers)}")
        images = images.to(self.visual.class_embedding.dtype)
        xi, pack_i = self.visual.embed_flat(images)
        xt, pack_t, pool = self.text.embed(tokens, text_lengths, trim=self.config.trim_text)
        streams = {IMAGE: Stream(xi, pack_i), TEXT: Stream(xt, pack_t)}
        run = run_packed if packed else run_per_tower
        out = run(self, self.plan, streams, self.visual.adapter_runner(images))
        return self.visual.pool(out[IMAGE]), self.text.pool(out[TEXT], pool)
