"""open_clip-compatible ClipLoss backed by :func:`msclip_fast.ops.contrastive_loss`."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import ops
from .distributed import _sizes, gather_features


class ClipLoss(nn.Module):
    """Symmetric CLIP InfoNCE loss with open_clip's constructor and forward arguments.

    Args:
        local_loss: each rank scores only its own rows against all gathered columns (memory
            O(N_r x N) instead of O(N x N)); with equal rows per rank the mean over ranks
            equals the full-batch loss (unequal rows weight each rank's rows differently).
        gather_with_grad: let gradients flow through the gather. Needed for the parameter
            gradient (after DDP/DeepSpeed averaging over ranks) to equal the single-process
            gradient on the concatenated batch; see :mod:`msclip_fast.losses.distributed` for
            the ``world_size`` factor this implies on per-rank feature gradients.
        cache_labels: keep the label vector between calls (same N and device).
        rank, world_size: this process's data-parallel position.
        use_horovod: not supported (ValueError when world_size > 1).
        fused_distributed: memory-lean mode for world_size > 1 (not in open_clip): each rank
            gathers the features of all ranks and computes, in ``fused_tile`` x ``fused_tile``
            blocks, the terms of the global loss that belong to its own pairs (its image rows
            against all N texts and its text rows against all N images), through
            :func:`msclip_fast.ops.contrastive_loss_share`. Memory O(tile² + N x D): neither the
            N x N nor this rank's N_r x N logits exist. The returned value is
            ``world_size x (this rank's share)``: the mean over ranks is exactly the full-batch
            loss (for equal rows per rank it is also open_clip's ``local_loss`` value). With
            ``gather_with_grad`` the gradients follow the convention of
            :mod:`msclip_fast.losses.distributed` (per-rank feature gradient = world_size x the
            full-batch one; DDP/DeepSpeed averaging gives the single-process parameter gradient),
            exact for unequal rows per rank too. Without it, only the local features get
            gradients. ``local_loss`` is ignored; ``logit_bias`` is not supported (ValueError).
        fused_tile: rows/columns per block of ``fused_distributed`` (>= 1).

    Forward:
        image_features ``(N, E)``, text_features ``(N, E)`` (normally L2-normalized, any float
        dtype), logit_scale 0-d tensor (already ``exp(logit_scale)``, as open_clip passes it),
        optional ``logit_bias`` (SigLIP-style, added to the logits), ``output_dict``.
        Returns a 0-d float32 tensor (float64 for float64 inputs), or
        ``{"contrastive_loss": loss}`` when ``output_dict``.

    world_size == 1, or a full gather without ``local_loss`` and without bias, uses the fused
    op ``ops.contrastive_loss`` on the (gathered) features (every rank then computes the whole
    N x N loss in O(N) memory); ``fused_distributed`` uses ``ops.contrastive_loss_share`` (each
    rank only its own pairs' terms, tiled); other cases use the reference math (materialized
    ``N_r x N`` or ``N x N`` logits).
    """

    def __init__(
        self,
        local_loss: bool = False,
        gather_with_grad: bool = False,
        cache_labels: bool = False,
        rank: int = 0,
        world_size: int = 1,
        use_horovod: bool = False,
        fused_distributed: bool = False,
        fused_tile: int = ops.contrastive_share.DEFAULT_TILE,
    ):
        super().__init__()
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        if int(fused_tile) < 1:
            raise ValueError(f"fused_tile must be >= 1, got {fused_tile}")
        self.fused_distributed = fused_distributed
        self.fused_tile = int(fused_tile)
        self.local_loss = local_loss
        self.gather_with_grad = gather_with_grad
        self.cache_labels = cache_labels
        self.rank = rank
        self.world_size = world_size
        self.use_horovod = use_horovod
        self._labels: dict = {}

    def get_ground_truth(self, device, num_logits: int, offset: int | None = None) -> torch.Tensor:
        """``(num_logits,)`` int64 targets; under ``local_loss`` shifted by this rank's first
        row in the gathered batch (``offset``; default ``num_logits * rank``, equal batches)."""
        if self.world_size > 1 and self.local_loss and offset is None:
            offset = num_logits * self.rank
        offset = offset if (self.world_size > 1 and self.local_loss) else 0
        key = (device, num_logits, offset)
        if key in self._labels:
            return self._labels[key]
        labels = torch.arange(num_logits, device=device, dtype=torch.long) + offset
        if self.cache_labels:
            self._labels = {key: labels}
        return labels

    def get_logits(self, image_features, text_features, logit_scale, logit_bias=None):
        """``(logits_per_image, logits_per_text)``, open_clip's layout (materialized)."""
        if self.world_size > 1:
            all_img, all_txt = self._gather(image_features, text_features)
            if self.local_loss:
                per_image = logit_scale * image_features @ all_txt.T
                per_text = logit_scale * text_features @ all_img.T
            else:
                per_image = logit_scale * all_img @ all_txt.T
                per_text = per_image.T
        else:
            per_image = logit_scale * image_features @ text_features.T
            per_text = per_image.T
        if logit_bias is not None:
            per_image = per_image + logit_bias
            per_text = per_text + logit_bias
        return per_image, per_text

    def _gather(self, image_features, text_features):
        return gather_features(
            image_features,
            text_features,
            local_loss=self.local_loss,
            gather_with_grad=self.gather_with_grad,
            rank=self.rank,
            world_size=self.world_size,
            use_horovod=self.use_horovod,
        )

    def forward(self, image_features, text_features, logit_scale, logit_bias=None, output_dict=False):
        if image_features.shape[0] != text_features.shape[0]:
            raise ValueError(
                f"image_features and text_features need one row count, got "
                f"{image_features.shape[0]} and {text_features.shape[0]}"
            )
        if self.fused_distributed and self.world_size > 1:
            return self._fused_distributed(image_features, text_features, logit_scale, logit_bias, output_dict)
        if logit_bias is None and (self.world_size == 1 or not self.local_loss):
            img, txt = image_features, text_features
            if self.world_size > 1:
                img, txt = self._gather(img, txt)
            if not isinstance(logit_scale, torch.Tensor):
                logit_scale = torch.tensor(float(logit_scale), device=img.device)
            loss = ops.contrastive_loss(img, txt, logit_scale)
        else:
            per_image, per_text = self.get_logits(image_features, text_features, logit_scale, logit_bias)
            acc = torch.promote_types(per_image.dtype, torch.float32)
            offset = None
            if self.world_size > 1 and self.local_loss:  # exact even when ranks hold unequal rows
                offset = sum(_sizes(image_features)[: self.rank])
            labels = self.get_ground_truth(per_image.device, per_image.shape[0], offset)
            loss = (F.cross_entropy(per_image.to(acc), labels) + F.cross_entropy(per_text.to(acc), labels)) / 2
        return {"contrastive_loss": loss} if output_dict else loss

    def _fused_distributed(self, image_features, text_features, logit_scale, logit_bias, output_dict):
        """``fused_distributed`` forward: world_size x this rank's tiled share of the global loss."""
        if logit_bias is not None:
            raise ValueError("logit_bias is not supported with fused_distributed=True")
        all_img, all_txt = gather_features(
            image_features,
            text_features,
            local_loss=True,  # gathered copies as they are (no own-slice substitution)
            gather_with_grad=self.gather_with_grad,
            rank=self.rank,
            world_size=self.world_size,
            use_horovod=self.use_horovod,
        )
        if not isinstance(logit_scale, torch.Tensor):
            logit_scale = torch.tensor(float(logit_scale), device=image_features.device)
        share = ops.contrastive_loss_share(image_features, text_features, all_img, all_txt, logit_scale,
                                           tile=self.fused_tile)
        loss = share * self.world_size
        return {"contrastive_loss": loss} if output_dict else loss
