"""The per-modality ends of the model: everything of a tower except the blocks it shares.

Each tower keeps its tower-only transformer blocks in ``blocks`` (a ModuleDict keyed by
block index); the shared blocks live on the model and are passed in at forward time, so a
shared weight is one tensor that appears once in ``model.parameters()``.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from ..modules.block import TransformerBlock
from ..modules.layer_norm import IMAGE, TEXT, ModalityLayerNorm
from .config import ModelConfig
from .parallel_branch import ParallelBranch
from .stem import ConvStem, PatchEmbed


class VisionTower(nn.Module):
    """Image tower: stem/patchify, CLS + positional embedding, ln_pre, [parallel branch],
    ln_post on the CLS token, bias-free projection ``(width, embed_dim)``."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        v = cfg.vision
        self.width, self.grid = v.width, cfg.grid_size
        self.first_block, self.layers = cfg.vision_first_block(), v.layers
        self.stem = ConvStem(v.width, v.stem_strides) if cfg.early_specialization else PatchEmbed(v.width, v.patch_size)
        scale = v.width**-0.5
        self.class_embedding = nn.Parameter(scale * torch.randn(v.width))
        self.positional_embedding = nn.Parameter(scale * torch.randn(self.grid**2 + 1, v.width))
        self.ln_pre = ModalityLayerNorm(v.width, 1, cfg.ln_eps)
        shared = set(cfg.shared_layer_ids())
        self.blocks = nn.ModuleDict({
            str(i): TransformerBlock(v.width, v.heads, (IMAGE,), (), cfg.mlp_ratio, cfg.act, cfg.ln_eps)
            for i in range(self.first_block, v.layers) if i not in shared
        })
        self.adapter_layers = tuple(v.adapter_layers) if v.parallel_branch else ()
        self.branch = (
            ParallelBranch(v.width, v.branch_strides, v.adapter_kernels, cfg.ln_eps) if v.parallel_branch else None
        )
        self.ln_post = ModalityLayerNorm(v.width, 1, cfg.ln_eps)
        self.proj = nn.Parameter(scale * torch.randn(v.width, cfg.embed_dim))

    def forward(self, images: torch.Tensor, blocks: Sequence[TransformerBlock]) -> torch.Tensor:
        """``images`` (B, 3, S, S) normalized -> (B, embed_dim) unnormalized features.
        ``blocks``: the block of every vision position ``first_block .. layers-1``."""
        x = self.embed(images)
        branch = images
        for i, blk in zip(range(self.first_block, self.layers), blocks):
            x, branch = self.adapt(i, x, branch)
            x = blk(x, IMAGE, causal=False)
        return self.pool(x)

    # The pieces of forward, also used by the packed path (MSCLIP), which runs the shared
    # blocks on packed image+text tokens between them.
    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """Stem/patchify + CLS + positional embedding + ln_pre: (B, 3, S, S) -> (B, 1 + grid², D).

        Raises:
            ValueError: images not (B, 3, H, W) or of a size that does not give the token grid.
        """
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be (B, 3, H, W), got shape {tuple(images.shape)}")
        feat = self.stem(images)
        if feat.shape[-2:] != (self.grid, self.grid):
            raise ValueError(
                f"images of size {tuple(images.shape[-2:])} give a {tuple(feat.shape[-2:])} token grid; "
                f"this model expects {self.grid}x{self.grid} (image_size in its config)"
            )
        B = feat.shape[0]
        x = feat.flatten(2).transpose(1, 2)  # (B, grid², D)
        cls = self.class_embedding.to(x.dtype).expand(B, 1, -1)
        x = torch.cat([cls, x], dim=1) + self.positional_embedding.to(x.dtype)
        return self.ln_pre(x)

    def adapt(self, i: int, x: torch.Tensor, branch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Before vision block ``i``: when a lateral adapter sits there, advance the parallel
        branch one stage and fuse it into the tokens. ``x`` (B, 1 + grid², D); ``branch`` the
        branch's current map (the images before stage 0). Returns ``(x, branch)``."""
        if i in self.adapter_layers:
            j = self.adapter_layers.index(i)
            branch = self.branch.stages[j](branch)
            x = self.branch.adapters[j](branch, x, self.grid)
        return x, branch

    def pool(self, x: torch.Tensor) -> torch.Tensor:
        """CLS token -> ln_post -> projection: (B, L, D) -> (B, embed_dim)."""
        return self.ln_post(x[:, 0]) @ self.proj


class TextTower(nn.Module):
    """Text tower: token + positional embedding, causal blocks, ln_final, EOT pooling (the
    position of the largest token id, CLIP's EOT 49407), bias-free projection."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        t = cfg.text
        self.context_length, self.layers = t.context_length, t.layers
        self.token_embedding = nn.Embedding(t.vocab_size, t.width)
        self.positional_embedding = nn.Parameter(torch.empty(t.context_length, t.width))
        shared = set(cfg.shared_layer_ids())
        self.blocks = nn.ModuleDict({
            str(i): TransformerBlock(t.width, t.heads, (TEXT,), (), cfg.mlp_ratio, cfg.act, cfg.ln_eps)
            for i in range(t.layers) if i not in shared
        })
        self.ln_final = ModalityLayerNorm(t.width, 1, cfg.ln_eps)
        self.text_projection = nn.Parameter(torch.empty(t.width, cfg.embed_dim))
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)
        nn.init.normal_(self.text_projection, std=t.width**-0.5)

    def forward(self, tokens: torch.Tensor, blocks: Sequence[TransformerBlock]) -> torch.Tensor:
        """``tokens`` (B, context_length) int64 -> (B, embed_dim) unnormalized features."""
        x = self.embed(tokens)
        for blk in blocks:
            x = blk(x, TEXT, causal=True)
        return self.pool(x, tokens)

    # The pieces of forward, also used by the packed path (MSCLIP).
    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        """Token + positional embedding: (B, context_length) -> (B, context_length, D).

        Raises:
            ValueError: wrong shape or dtype of ``tokens``.
        """
        if tokens.dim() != 2 or tokens.shape[1] != self.context_length:
            raise ValueError(f"tokens must be (B, {self.context_length}), got shape {tuple(tokens.shape)}")
        if tokens.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"tokens must be int64 (or int32), got {tokens.dtype}")
        return self.token_embedding(tokens) + self.positional_embedding

    def pool(self, x: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """EOT row (position of the largest id) -> ln_final -> projection: (B, L, D) -> (B, E)."""
        eot = tokens.argmax(dim=-1)
        pooled = x[torch.arange(x.shape[0], device=x.device), eot]
        # LayerNorm is per row, so normalizing the pooled rows equals CLIP's ln_final-then-pool.
        return self.ln_final(pooled) @ self.text_projection.to(pooled.dtype)
