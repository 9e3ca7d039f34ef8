"""Gathering features across data-parallel ranks, with or without gradient.

Gradient convention (the one open_clip uses, and the one that makes DDP / DeepSpeed produce the
single-process full-batch gradient): every rank computes the *same* full-batch loss ``L`` (or,
with ``local_loss``, its share ``L_r`` with ``L = mean_r L_r``). The backward of the gather sums
the incoming gradients of all ranks, so the gradient a rank sees for its local features is
``world_size * dL/d(local features)``. DDP and DeepSpeed then *average* parameter gradients
over ranks, which divides by ``world_size`` again: the parameter update equals the one a single
process would make on the concatenated batch.
"""
from __future__ import annotations

import torch
import torch.distributed as dist


class _AllGatherWithGrad(torch.autograd.Function):
    """``(N_r, D)`` on rank r -> ``(sum_r N_r, D)`` concatenated in rank order.

    Rows may differ across ranks (sizes are exchanged first). Backward all-reduces (sum) the
    gradient of the concatenation and returns this rank's slice. Works on gloo (which lacks
    reduce_scatter, used by ``torch.distributed.nn.functional.all_gather`` on NCCL).
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, group=None) -> torch.Tensor:
        world_size = dist.get_world_size(group)
        rank = dist.get_rank(group)
        n = torch.tensor([x.shape[0]], device=x.device, dtype=torch.long)
        sizes = [torch.zeros_like(n) for _ in range(world_size)]
        dist.all_gather(sizes, n, group=group)
        sizes = [int(s.item()) for s in sizes]
        n_max = max(sizes)
        x_c = x.contiguous()
        if x.shape[0] < n_max:  # all_gather needs equal shapes: pad, then cut
            x_c = torch.cat([x_c, x_c.new_zeros((n_max - x.shape[0],) + tuple(x.shape[1:]))])
        parts = [torch.empty_like(x_c) for _ in range(world_size)]
        dist.all_gather(parts, x_c, group=group)
        ctx.group = group
        ctx.sizes = sizes
        ctx.rank = rank
        return torch.cat([p[:s] for p, s in zip(parts, sizes)], dim=0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=ctx.group)
        start = sum(ctx.sizes[: ctx.rank])
        return grad[start : start + ctx.sizes[ctx.rank]], None


def all_gather_with_grad(x: torch.Tensor, group=None) -> torch.Tensor:
    """Concatenate ``x`` from all ranks along dim 0, differentiably (see module docstring)."""
    return _AllGatherWithGrad.apply(x, group)


def gather_features(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    local_loss: bool = False,
    gather_with_grad: bool = False,
    rank: int = 0,
    world_size: int = 1,
    use_horovod: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gather ``(N_r, E)`` image/text features of every rank into ``(sum N_r, E)`` each.

    With ``gather_with_grad`` the gradient flows back to every rank's features (see the module
    docstring for the ``world_size`` factor). Without it, the gathered copies are constants
    and, unless ``local_loss``, this rank's own rows are put back so that they keep their
    gradient (open_clip's behaviour; the gradient then differs from the full-batch one).

    Raises:
        ValueError: ``use_horovod`` (not supported) or torch.distributed not initialized.
    """
    if use_horovod:
        raise ValueError("use_horovod=True is not supported by msclip_fast (use torch.distributed)")
    if not (dist.is_available() and dist.is_initialized()):
        raise ValueError(f"world_size={world_size} needs an initialized torch.distributed process group")
    if gather_with_grad:
        return all_gather_with_grad(image_features), all_gather_with_grad(text_features)
    with torch.no_grad():
        all_img = list(all_gather_with_grad(image_features).split(_sizes(image_features), dim=0))
        all_txt = list(all_gather_with_grad(text_features).split(_sizes(text_features), dim=0))
    if not local_loss:
        all_img[rank] = image_features
        all_txt[rank] = text_features
    return torch.cat(all_img, dim=0), torch.cat(all_txt, dim=0)


def _sizes(x: torch.Tensor) -> list[int]:
    """Row counts of ``x`` on every rank, in rank order."""
    n = torch.tensor([x.shape[0]], device=x.device, dtype=torch.long)
    sizes = [torch.zeros_like(n) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, n)
    return [int(s.item()) for s in sizes]
