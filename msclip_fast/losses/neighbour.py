"""Differentiable exchanges of features between data-parallel ranks, for the distributed
sigmoid loss (:class:`msclip_fast.losses.SigLipLoss`).

- :func:`neighbour_exchange_with_grad`: send a tensor to one rank and receive one from another
  (a ring shift when ``to_rank = rank + 1`` and ``from_rank = rank - 1``). Backward sends the
  gradient of what was received back to ``from_rank`` and receives the gradient of what was
  sent from ``to_rank``.
- :func:`neighbour_exchange_bidir_with_grad`: both ring directions at once (send left and
  right, receive from left and right); backward is the same exchange of the gradients.
- :func:`broadcast_each_with_grad`: every rank's tensor to every other rank, one broadcast per
  source rank; backward reduces (sums) each received copy's gradient onto its source rank.

All are point-to-point or rooted collectives that gloo implements (no reduce_scatter, no
all_to_all), and they take the receive shapes from the caller, so ranks may hold different row
counts. Peer ranks are global ranks (torch.distributed's P2P convention), also with ``group``.
Gradient convention: the same as :mod:`msclip_fast.losses.distributed` (a rank's features
receive the sum of every rank's loss gradient with respect to them).

Ordering: every rank must run the same sequence of exchanges, in forward and (automatically, as
autograd replays the graph in reverse) in backward. A Function whose outputs reach the loss runs
its backward even for outputs that did not (with zero gradients), so with the same graph on
every rank no rank waits for a peer that skipped an exchange.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.distributed as dist


def _recv_buffer(like: torch.Tensor, rows: int) -> torch.Tensor:
    return like.new_empty((rows,) + tuple(like.shape[1:]))


def _run_p2p(ops: list) -> None:
    for req in dist.batch_isend_irecv(ops):
        req.wait()


def neighbour_exchange(from_rank: int, to_rank: int, tensor: torch.Tensor, recv_rows: int | None = None,
                       group=None) -> torch.Tensor:
    """Send ``tensor`` to ``to_rank``, return the ``(recv_rows, *tensor.shape[1:])`` tensor that
    ``from_rank`` sends here (``recv_rows`` defaults to this tensor's row count). No gradient."""
    rows = tensor.shape[0] if recv_rows is None else int(recv_rows)
    out = _recv_buffer(tensor, rows)
    _run_p2p([
        dist.P2POp(dist.isend, tensor.contiguous(), to_rank, group=group),
        dist.P2POp(dist.irecv, out, from_rank, group=group),
    ])
    return out


def neighbour_exchange_bidir(left_rank: int, right_rank: int, to_left: torch.Tensor, to_right: torch.Tensor,
                             rows_from_left: int | None = None, rows_from_right: int | None = None,
                             group=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Send ``to_left`` to ``left_rank`` and ``to_right`` to ``right_rank``; return
    ``(from_left, from_right)``: what ``left_rank`` sent rightwards and what ``right_rank`` sent
    leftwards (row counts default to those of ``to_right`` and ``to_left``). No gradient.

    Messages between one pair of ranks are matched in posting order (NCCL ignores tags), so the
    sends are posted rightwards first and the receives from the left first: the k-th message
    from a peer then lands in the k-th receive from it even when ``left_rank == right_rank``
    (two ranks).
    """
    n_left = to_right.shape[0] if rows_from_left is None else int(rows_from_left)
    n_right = to_left.shape[0] if rows_from_right is None else int(rows_from_right)
    from_left = _recv_buffer(to_right, n_left)
    from_right = _recv_buffer(to_left, n_right)
    _run_p2p([
        dist.P2POp(dist.isend, to_right.contiguous(), right_rank, group=group),
        dist.P2POp(dist.isend, to_left.contiguous(), left_rank, group=group),
        dist.P2POp(dist.irecv, from_left, left_rank, group=group),
        dist.P2POp(dist.irecv, from_right, right_rank, group=group),
    ])
    return from_left, from_right


class _NeighbourExchange(torch.autograd.Function):
    @staticmethod
    def forward(ctx, from_rank, to_rank, recv_rows, group, tensor):
        ctx.from_rank, ctx.to_rank, ctx.group = from_rank, to_rank, group
        ctx.sent_rows = tensor.shape[0]
        return neighbour_exchange(from_rank, to_rank, tensor, recv_rows, group)

    @staticmethod
    def backward(ctx, grad):
        # the gradient of what came from `from_rank` belongs to it; the gradient of what this
        # rank sent comes back from `to_rank` (applied through the Function: double backward)
        g = _NeighbourExchange.apply(ctx.to_rank, ctx.from_rank, ctx.sent_rows, ctx.group, grad)
        return None, None, None, None, g


class _NeighbourExchangeBidir(torch.autograd.Function):
    @staticmethod
    def forward(ctx, left_rank, right_rank, rows_from_left, rows_from_right, group, to_left, to_right):
        ctx.ranks, ctx.group = (left_rank, right_rank), group
        ctx.sent_rows = (to_left.shape[0], to_right.shape[0])
        return neighbour_exchange_bidir(left_rank, right_rank, to_left, to_right, rows_from_left,
                                        rows_from_right, group)

    @staticmethod
    def backward(ctx, g_from_left, g_from_right):
        # the gradient of from_left goes back left, where it is the gradient of that rank's
        # to_right; symmetrically on the right: the same exchange, on the gradients
        g_to_left, g_to_right = _NeighbourExchangeBidir.apply(
            *ctx.ranks, ctx.sent_rows[0], ctx.sent_rows[1], ctx.group, g_from_left, g_from_right)
        return None, None, None, None, None, g_to_left, g_to_right


def neighbour_exchange_with_grad(from_rank: int, to_rank: int, tensor: torch.Tensor,
                                 recv_rows: int | None = None, group=None) -> torch.Tensor:
    """Differentiable :func:`neighbour_exchange` (see the module docstring for the backward)."""
    return _NeighbourExchange.apply(from_rank, to_rank, recv_rows, group, tensor)


def neighbour_exchange_bidir_with_grad(left_rank: int, right_rank: int, to_left: torch.Tensor,
                                       to_right: torch.Tensor, rows_from_left: int | None = None,
                                       rows_from_right: int | None = None,
                                       group=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Differentiable :func:`neighbour_exchange_bidir`; returns ``(from_left, from_right)``."""
    return _NeighbourExchangeBidir.apply(left_rank, right_rank, rows_from_left, rows_from_right, group,
                                         to_left, to_right)


class _BroadcastEach(torch.autograd.Function):
    @staticmethod
    def forward(ctx, sizes, group, tensor):
        rank = dist.get_rank(group)
        ctx.sizes, ctx.group, ctx.rank = sizes, group, rank
        ctx.meta = (tuple(tensor.shape[1:]), tensor.dtype, tensor.device)
        x = tensor.contiguous()
        outs = []
        for src, rows in enumerate(sizes):
            buf = x if src == rank else _recv_buffer(x, rows)
            dist.broadcast(buf, dist.get_global_rank(group, src) if group is not None else src, group=group)
            if src != rank:
                outs.append(buf)
        return tuple(outs)

    @staticmethod
    def backward(ctx, *grads):
        rank, group = ctx.rank, ctx.group
        grads = iter(grads)
        mine = None
        for src, rows in enumerate(ctx.sizes):
            dst = dist.get_global_rank(group, src) if group is not None else src
            if src == rank:
                # this rank's own copy has no gradient here: it receives everyone else's
                tail, dtype, device = ctx.meta
                mine = torch.zeros((rows,) + tail, dtype=dtype, device=device)
                dist.reduce(mine, dst, op=dist.ReduceOp.SUM, group=group)
            else:
                dist.reduce(next(grads).contiguous().clone(), dst, op=dist.ReduceOp.SUM, group=group)
        return None, None, mine


def broadcast_each_with_grad(tensor: torch.Tensor, sizes: Sequence[int], group=None) -> list[torch.Tensor]:
    """The tensors of every OTHER rank, in rank order: ``sizes[r]`` rows from rank ``r``
    (``sizes`` are the row counts of all ranks, this one included). One broadcast per source
    rank; backward reduces (sums) the gradients of the copies onto their source rank."""
    if len(sizes) <= 1:
        return []
    return list(_BroadcastEach.apply(tuple(int(s) for s in sizes), group, tensor))
