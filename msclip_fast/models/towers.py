"""The per-modality ends of the model: everything of a tower except the blocks it shares.

Each tower keeps its tower-only transformer blocks in ``blocks`` (a ModuleDict keyed by
block index); the shared blocks live on the model and are passed in at forward time, so a
shared weight is one tensor that appears once in ``model.parameters()``.
"""
from __future__ import annotations

import torch
from torch import nn

from ..modules.block import TransformerBlock
from ..modules.layer_norm import IMAGE, TEXT, ModalityLayerNorm
from ..modules.packing import PackedBatch, text_lengths
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
        self.branch = (
            ParallelBranch(v.width, v.branch_strides, v.adapter_kernels, cfg.ln_eps) if v.parallel_branch else None
        )
        self.ln_post = ModalityLayerNorm(v.width, 1, cfg.ln_eps)
        self.proj = nn.Parameter(scale * torch.randn(v.width, cfg.embed_dim))

    # The tower's own steps; the model's executor runs the blocks between them.
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

    def embed_flat(self, images: torch.Tensor) -> tuple[torch.Tensor, PackedBatch]:
        """:meth:`embed` as flat rows ``(B·L, D)`` with their (uniform) layout."""
        x = self.embed(images)
        B, L, D = x.shape
        return x.reshape(B * L, D), PackedBatch.from_seqlens([(IMAGE, [L] * B)], x.device)

    def adapter_runner(self, images: torch.Tensor):
        """The lateral adapters of one forward, as the executor calls them: ``run(j, x)`` with
        ``x`` the image rows ``(B·L, D)`` advances the parallel branch to stage ``j`` (from the
        images, stage by stage; adapters run in order) and fuses it into the tokens. None when
        the tower has no parallel branch.

        Raises:
            ValueError: (from ``run``) adapters called out of order.
        """
        if self.branch is None:
            return None
        state = {"next": 0, "map": images}

        def run(j: int, x: torch.Tensor) -> torch.Tensor:
            if j != state["next"]:
                raise ValueError(f"lateral adapter {j} called before adapter {state['next']}")
            state["map"], state["next"] = self.branch.stages[j](state["map"]), j + 1
            B = images.shape[0]
            return self.branch.adapters[j](state["map"], x.view(B, -1, x.shape[-1]), self.grid).reshape(x.shape)

        return run

    def pool(self, x: torch.Tensor) -> torch.Tensor:
        """CLS token -> ln_post -> projection: (B, L, D) or flat (B·L, D) -> (B, embed_dim)."""
        if x.dim() == 2:
            x = x.view(-1, self.grid**2 + 1, x.shape[-1])
        return self.ln_post(x[:, 0]) @ self.proj


class TextTower(nn.Module):
    """Text tower: token + positional embedding, causal blocks, ln_final, EOT pooling (the
    position of the largest token id, CLIP's EOT 49407), bias-free projection. Captions may
    run trimmed at their EOT (:meth:`embed`)."""

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

    # The tower's own steps; the model's executor runs the blocks between them.
    def embed(self, tokens: torch.Tensor, lengths=None, trim: bool = True) -> tuple[torch.Tensor, PackedBatch, torch.Tensor]:
        """Token + positional embedding of every caption as flat rows, with their layout and
        the row each caption pools (its EOT token).

        Trimmed (``trim``), caption ``b`` keeps its first ``lengths[b] = eot + 1`` tokens
        (ragged rows, ``sum(lengths)`` of them); padded, every caption keeps all
        ``context_length`` tokens. The rows are the same numbers either way (the padded
        embedding, gathered), so trimming changes which rows exist, never their values.

        Args:
            tokens: ``(B, context_length)`` int64 (or int32).
            lengths: ``(B,)`` host lengths ``eot + 1`` (tensor or sequence), e.g. the loader's
                ``batch["text_lengths"]``; None computes them from ``tokens``
                (:func:`~msclip_fast.modules.packing.text_lengths`: one host sync for device
                tokens). Checked against CPU tokens; trusted for device tokens and under
                ``torch.compile``. Unused when not trimming. Under ``torch.compile`` pass
                them as a Python list of ints (``batch["text_lengths"].tolist()`` outside the
                compiled function): a tensor's values, or computing them from the tokens, are
                read on the host (a graph break); each new set of lengths is a new graph
                (they are specialized, as host shapes are).
            trim: trim at EOT.
        Returns:
            ``(x (rows, D), pack, pool_rows (B,) int64 on x's device)``.
        Raises:
            ValueError: wrong shape or dtype of ``tokens``, or lengths of the wrong count,
                out of ``[1, context_length]``, or (CPU tokens) not ``eot + 1``.
        """
        if tokens.dim() != 2 or tokens.shape[1] != self.context_length:
            raise ValueError(f"tokens must be (B, {self.context_length}), got shape {tuple(tokens.shape)}")
        if tokens.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"tokens must be int64 (or int32), got {tokens.dtype}")
        B, L = tokens.shape
        x = self.token_embedding(tokens) + self.positional_embedding  # (B, L, D)
        D, dev = x.shape[-1], x.device
        if not trim:
            pool = tokens.argmax(dim=-1) + torch.arange(B, device=tokens.device) * L
            return x.reshape(B * L, D), PackedBatch.from_seqlens([(TEXT, [L] * B)], dev), pool
        lens = self._host_lengths(tokens, lengths)
        if torch.compiler.is_compiling():
            # the same index from host ints (a graph constant): repeat_interleave by a tensor
            # and int(ends[-1]) would break a torch.compile graph
            ends, a = [], 0
            for b in lens:
                a += b
                ends.append(a)
            index = torch.tensor([b * L + p for b, n in enumerate(lens) for p in range(n)] + [e - 1 for e in ends],
                                 dtype=torch.int64)
            rows = index[:sum(lens)]
        else:
            n = torch.tensor(lens, dtype=torch.int64)
            ends = n.cumsum(0)
            pos = torch.arange(int(ends[-1]) if B else 0) - torch.repeat_interleave(ends - n, n)
            rows = torch.repeat_interleave(torch.arange(B) * L, n) + pos
            index = torch.cat([rows, ends - 1])
        if dev.type != "cpu":
            index = index.to(dev, non_blocking=True)
        rows, pool = index[:rows.numel()], index[rows.numel():]
        return x.reshape(B * L, D).index_select(0, rows), PackedBatch.from_seqlens([(TEXT, lens)], dev), pool

    def _host_lengths(self, tokens: torch.Tensor, lengths) -> list[int]:
        if lengths is None:
            return text_lengths(tokens).tolist()
        if isinstance(lengths, torch.Tensor):
            if lengths.dim() != 1 or lengths.is_floating_point() or lengths.dtype == torch.bool:
                raise ValueError(f"text lengths must be a (B,) integer tensor, got shape {tuple(lengths.shape)} "
                                 f"dtype {lengths.dtype}")
            lengths = lengths.tolist()  # a host sync only if the caller put them on a device
        lens = [int(n) for n in lengths]
        B, L = tokens.shape
        if len(lens) != B:
            raise ValueError(f"text lengths must have one entry per caption ({B}), got {len(lens)}")
        bad = [(b, n) for b, n in enumerate(lens) if not 1 <= n <= L]
        if bad:
            raise ValueError(f"text lengths must lie in [1, {L}], got (caption, length) {bad[:4]}")
        # (under torch.compile given lengths are trusted, as for device tokens: the check reads
        # token values on the host, a graph break)
        if tokens.device.type == "cpu" and not torch.compiler.is_compiling():
            want = text_lengths(tokens).tolist()
            wrong = [(b, n, w) for b, (n, w) in enumerate(zip(lens, want)) if n != w]
            if wrong:
                raise ValueError(f"text lengths must be eot + 1 (the position of the largest token id + 1); "
                                 f"(caption, given, eot+1): {wrong[:4]}")
        return lens

    def pool(self, x: torch.Tensor, pool_rows: torch.Tensor) -> torch.Tensor:
        """EOT rows -> ln_final -> projection: flat ``(rows, D)`` and ``(B,)`` row indices
        (from :meth:`embed`) -> ``(B, embed_dim)``."""
        pooled = x.index_select(0, pool_rows)
        # LayerNorm is per row, so normalizing the pooled rows equals CLIP's ln_final-then-pool.
        return self.ln_final(pooled) @ self.text_projection.to(pooled.dtype)
