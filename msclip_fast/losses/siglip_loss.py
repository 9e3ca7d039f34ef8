"""open_clip-compatible SigLipLoss backed by :func:`msclip_fast.ops.sigmoid_loss`."""
from __future__ import annotations

import numbers

import torch
import torch.distributed as dist
import torch.nn as nn

from .. import ops
from .distributed import all_gather_with_grad
from .neighbour import broadcast_each_with_grad, neighbour_exchange_bidir_with_grad, neighbour_exchange_with_grad

DIST_IMPLS = ("bidir", "shift", "gather", "reduce")

# open_clip's forward takes logit_bias positionally with no default; a sentinel lets us say so in
# a ValueError while still accepting an explicit None (open_clip's "no bias")
_REQUIRED = object()


class SigLipLoss(nn.Module):
    """Sigmoid loss (SigLIP: Zhai et al. 2023, "Sigmoid Loss for Language Image Pre-Training",
    arXiv 2303.15343) with the constructor and forward arguments of open_clip's
    ``open_clip.loss.SigLipLoss``, and its value and gradients.

    Per rank ``r`` holding ``N_r`` image/text pairs, the loss is this rank's images against its own
    texts (row i of each is the positive pair, every other pair a negative) plus its images
    against every other rank's texts (all negatives), each term normalized by the LOCAL image
    count ``N_r``::

        L_r = sigmoid_loss(I_r, T_r) + sum_{q != r} sigmoid_loss(I_r, T_q, negative_only=True)
        sigmoid_loss(I, T) = -sum_ij log sigmoid(z_ij (s * I_i . T_j + b)) / N_I

    Every term is one call of :func:`msclip_fast.ops.sigmoid_loss`: with a fused backend (CPU
    extension, CUDA, Triton) neither the local ``N_r x N_r`` nor any ``N_r x N_q`` block of logits
    is ever materialized, so this is also the memory-lean distributed mode (memory O(N x D) for
    the received texts, not O(N_r x N)). Without a fused backend for the inputs (e.g. float64)
    the op's reference materializes each term's logits.

    Args:
        cache_labels: keep the ``get_ground_truth`` matrix between calls (the forward never
            builds one; accepted for open_clip compatibility).
        rank, world_size: this process's position in the default torch.distributed group
            (checked against it at the first distributed forward).
        dist_impl: how the other ranks' texts reach this rank (None means "bidir", open_clip's
            default):

            - ``"bidir"``: ring exchange in both directions (P2P isend/irecv with the left and
              right neighbours), ``(world_size - 1) // 2`` bidirectional hops plus one
              one-directional hop when ``world_size`` is even; each received chunk is scored
              and passed on. Backward sends the gradients back along the same hops.
            - ``"shift"``: ``world_size - 1`` one-directional ring hops (receive from the left,
              send to the right); backward the reverse.
            - ``"gather"``: one all-gather of the texts (with gradient, see
              :func:`msclip_fast.losses.all_gather_with_grad`; backward is an all-reduce of the
              gathered texts' gradient), then ONE negative-only call over the concatenation of
              all other ranks' texts.
            - ``"reduce"``: one broadcast per source rank (backward: one reduce-to-source per
              rank), then one negative-only call over the other ranks' texts. open_clip's
              "reduce" all-reduces a masked copy of the texts instead; the result is the same.

            Every mode first all-gathers the ``(rows, D)`` shape of each rank (a tiny
            collective, and on CUDA one host sync) so that receive buffers have the right size:
            ranks may hold different row counts (see below). Features must have one dtype on
            every rank.

    Forward:
        ``image_features``, ``text_features``: ``(N_r, D)`` each (normally L2-normalized),
        float32/16/bf16/64; ``logit_scale``: 1-element tensor (0-d or ``(1,)``, already
        ``exp`` of the parameter, as open_clip passes it) or a number; ``logit_bias``: 1-element
        tensor or number (SigLIP initializes it to -10), or None for no bias, required as in
        open_clip; ``output_dict``. Returns a 0-d tensor, float32 (float64 for float64
        features; open_clip returns the features' dtype), or ``{"contrastive_loss": loss}``.

    Gradients (the convention of :mod:`msclip_fast.losses.distributed`): every rank's
    texts receive the gradients that all ranks' losses send back, so a rank's feature gradients
    are ``world_size x`` those of ``mean_r L_r``, and after DDP/DeepSpeed average parameter
    gradients over ranks the update is the gradient of ``mean_r L_r``. With equal rows per rank
    ``mean_r L_r`` is exactly the single-process loss on the concatenated batch (as in open_clip).
    With unequal rows (supported by every ``dist_impl``; open_clip's need equal rows) the
    objective is still ``mean_r L_r`` with each ``L_r`` normalized by its own ``N_r``, so rank r's
    pairs weigh ``1 / (world_size N_r)`` instead of the single-process ``1 / N``.

    Raises:
        ValueError: bad ``rank``/``world_size``/``dist_impl``; feature tensors that are not
            2-D or differ in shape; ``logit_bias`` not passed; a distributed forward without an
            initialized process group, with another rank/world size, or with another ``D`` on
            some rank.
    """

    def __init__(self, cache_labels: bool = False, rank: int = 0, world_size: int = 1, dist_impl: str | None = None):
        super().__init__()
        if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
            raise ValueError(f"world_size must be an int >= 1, got {world_size!r}")
        if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < world_size:
            raise ValueError(f"rank must be an int with 0 <= rank < world_size={world_size}, got {rank!r}")
        impl = "bidir" if dist_impl is None else dist_impl
        if impl not in DIST_IMPLS:
            raise ValueError(f"dist_impl must be None or one of {DIST_IMPLS}, got {dist_impl!r}")
        self.cache_labels = cache_labels
        self.rank = rank
        self.world_size = world_size
        self.dist_impl = impl
        self.labels: dict = {}

    def get_ground_truth(self, device, dtype, num_logits: int, negative_only: bool = False) -> torch.Tensor:
        """``(num_logits, num_logits)`` targets, +1 on the diagonal (positives) and -1 elsewhere
        (all -1 with ``negative_only``); open_clip's layout, materialized (the forward does not
        use it)."""
        key = (torch.device(device), dtype, int(num_logits), bool(negative_only))
        if key in self.labels:
            return self.labels[key]
        labels = -torch.ones((num_logits, num_logits), device=device, dtype=dtype)
        if not negative_only:
            labels.diagonal().fill_(1)
        if self.cache_labels:
            self.labels = {key: labels}
        return labels

    def get_logits(self, image_features, text_features, logit_scale, logit_bias=None) -> torch.Tensor:
        """``logit_scale * image_features @ text_features.T (+ logit_bias)``: the ``(N_I, N_T)``
        logits, open_clip's layout, materialized (the forward never builds them)."""
        logits = logit_scale * image_features @ text_features.T
        if logit_bias is not None:
            logits = logits + logit_bias
        return logits

    def _loss(self, image_features, text_features, logit_scale, logit_bias=None, negative_only=False):
        """One term of the loss, as open_clip's ``_loss`` (through the fused op)."""
        return ops.sigmoid_loss(image_features, text_features, logit_scale, logit_bias, negative_only=negative_only)

    def forward(self, image_features, text_features, logit_scale, logit_bias=_REQUIRED, output_dict=False):
        if logit_bias is _REQUIRED:
            raise ValueError("logit_bias is required (as in open_clip's SigLipLoss); pass None for no bias")
        _check_features(image_features, text_features)
        logit_scale = _as_scalar_tensor(logit_scale, "logit_scale", image_features)
        if logit_bias is not None:
            logit_bias = _as_scalar_tensor(logit_bias, "logit_bias", image_features)
        loss = self._loss(image_features, text_features, logit_scale, logit_bias)
        if self.world_size > 1:
            loss = self._add_other_ranks(loss, image_features, text_features, logit_scale, logit_bias)
        return {"contrastive_loss": loss} if output_dict else loss

    def _add_other_ranks(self, total, image, text, scale, bias):
        """``total`` plus this rank's images against every other rank's texts (all negatives),
        added term by term in open_clip's order (same float sums)."""
        sizes = self._row_counts(image)
        rank, world = self.rank, self.world_size

        def negatives(texts):
            return self._loss(image, texts, scale, bias, negative_only=True)

        if self.dist_impl == "gather":
            all_text = all_gather_with_grad(text)
            lo = sum(sizes[:rank])
            return total + negatives(torch.cat([all_text[:lo], all_text[lo + sizes[rank]:]]))
        if self.dist_impl == "reduce":
            return total + negatives(torch.cat(broadcast_each_with_grad(text, sizes)))
        left, right = (rank - 1) % world, (rank + 1) % world
        if self.dist_impl == "shift":
            chunk = text
            for hop in range(1, world):
                # after `hop` hops to the right, the chunk here started on rank - hop
                chunk = neighbour_exchange_with_grad(left, right, chunk, recv_rows=sizes[(rank - hop) % world])
                total = total + negatives(chunk)
            return total
        # bidir: chunks travel both ways; `hop` hops bring rank - hop's texts from the left and
        # rank + hop's from the right
        bidir_hops, one_way = divmod(world - 1, 2)
        to_left = to_right = text
        for hop in range(1, bidir_hops + 1):
            from_left, from_right = neighbour_exchange_bidir_with_grad(
                left, right, to_left, to_right,
                rows_from_left=sizes[(rank - hop) % world], rows_from_right=sizes[(rank + hop) % world])
            total = total + negatives(from_right)  # open_clip adds the right neighbour's first
            total = total + negatives(from_left)
            to_left, to_right = from_right, from_left
        if one_way:
            chunk = neighbour_exchange_with_grad(left, right, to_right,
                                                 recv_rows=sizes[(rank - bidir_hops - 1) % world])
            total = total + negatives(chunk)
        return total

    def _row_counts(self, features: torch.Tensor) -> list[int]:
        """Rows of every rank, in rank order; checks the process group and ``D`` on all ranks."""
        if not (dist.is_available() and dist.is_initialized()):
            raise ValueError(f"world_size={self.world_size} needs an initialized torch.distributed process group")
        if dist.get_world_size() != self.world_size or dist.get_rank() != self.rank:
            raise ValueError(
                f"rank={self.rank}, world_size={self.world_size} disagree with torch.distributed "
                f"(rank {dist.get_rank()}, world size {dist.get_world_size()})"
            )
        shape = torch.tensor(list(features.shape), device=features.device, dtype=torch.long)
        shapes = [torch.empty_like(shape) for _ in range(self.world_size)]
        dist.all_gather(shapes, shape)
        shapes = [tuple(int(v) for v in s.tolist()) for s in shapes]
        dims = sorted({d for _, d in shapes})
        if len(dims) > 1:
            raise ValueError(f"image_features/text_features need one D on every rank, got (rows, D) per rank {shapes}")
        return [n for n, _ in shapes]


def _check_features(image_features, text_features) -> None:
    for name, t in (("image_features", image_features), ("text_features", text_features)):
        if not isinstance(t, torch.Tensor) or t.dim() != 2:
            raise ValueError(f"{name} must be a 2-D (N, D) tensor, got {getattr(t, 'shape', type(t).__name__)}")
    if image_features.shape != text_features.shape:
        raise ValueError(
            f"text_features must have the shape of image_features (row i of each is a positive pair), got "
            f"image_features {tuple(image_features.shape)} and text_features {tuple(text_features.shape)}"
        )


def _as_scalar_tensor(value, name: str, like: torch.Tensor) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        return torch.tensor(float(value), dtype=torch.promote_types(like.dtype, torch.float32), device=like.device)
    raise ValueError(f"{name} must be a 1-element tensor or a number, got {type(value).__name__}")
