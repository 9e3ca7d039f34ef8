"""The one executor of an :class:`~.plan.ExecutionPlan` (DESIGN §3).

Tokens travel flat, ``(rows, D)``, one :class:`Stream` per modality, each with the
:class:`~msclip_fast.modules.PackedBatch` that says where its sequences sit. Every block step
is :meth:`TransformerBlock.forward_packed` with the block's final residual add left pending
(fused into the next block's first LayerNorm). Two schedules walk the same plan:

- per tower: each modality's positions in turn, on its own stream;
- packed: tower-only positions up to the first packable shared position on each stream,
  then one joint stream (images first) through the shared span, then split again.

So packed and per-tower execution differ only in which rows share a call: the same blocks,
adapters and residual adds run in the same order on every token.

Activation checkpointing (``model.grad_checkpointing``, open_clip's attribute name) wraps this
one step, so every block of every schedule is recomputed in backward instead of keeping its
activations. Only transformer blocks are wrapped: the adapters of the parallel branch hold
BatchNorm, whose running statistics a recomputation would update a second time.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..modules.layer_norm import IMAGE, TEXT
from ..modules.packing import PackedBatch
from .plan import ExecutionPlan, Position

# adapter(j, image rows (B_img·L_img, D)) -> image rows: lateral adapter j on the image tokens
Adapter = Callable[[int, torch.Tensor], torch.Tensor]


@dataclass
class Stream:
    """One modality's (or the packed batch's) tokens between positions.

    Fields:
        x: ``(rows, D)`` residual stream; pending: ``(rows, D)`` update still to be added to
        it (the previous block's output is ``x + pending``), or None; pack: the layout.
    """

    x: torch.Tensor
    pack: PackedBatch
    pending: torch.Tensor | None = None

    def flush(self) -> torch.Tensor:
        """Add the pending update (once) and return the tokens."""
        if self.pending is not None:
            self.x, self.pending = self.x + self.pending, None
        return self.x


def _step(model: nn.Module, pos: Position, s: Stream, adapter: Adapter | None) -> None:
    if pos.adapter is not None and IMAGE in s.pack.modalities:
        if adapter is None:
            raise ValueError(f"position {pos.index} ({pos.block}) has adapter {pos.adapter} but no adapter runner")
        x = s.flush()
        n = s.pack.image_rows
        s.x = adapter(pos.adapter, x) if n == x.shape[0] else torch.cat([adapter(pos.adapter, x[:n]), x[n:]], 0)
    block = model.get_submodule(pos.block)
    if getattr(model, "grad_checkpointing", False) and torch.is_grad_enabled():
        # non-reentrant: it accepts inputs that do not require grad (a frozen tower's tokens),
        # a None ``pending`` and the host-side PackedBatch, and under DeepSpeed ZeRO-3 the
        # submodules' parameter-gathering hooks fire again inside the recomputation
        s.x, s.pending = checkpoint(block.forward_packed, s.x, s.pack, s.pending, use_reentrant=False)
    else:
        s.x, s.pending = block.forward_packed(s.x, s.pack, s.pending)


def run_per_tower(model: nn.Module, plan: ExecutionPlan, streams: Mapping[int, Stream],
                  adapter: Adapter | None = None) -> dict[int, torch.Tensor]:
    """Each modality's positions on its own stream. Returns ``{modality: (rows, D)}``."""
    for m, s in streams.items():
        for pos in plan.tower(m):
            _step(model, pos, s, adapter)
    return {m: s.flush() for m, s in streams.items()}


def run_packed(model: nn.Module, plan: ExecutionPlan, streams: Mapping[int, Stream],
               adapter: Adapter | None = None) -> dict[int, torch.Tensor]:
    """The packed schedule (both modalities' streams needed). The joint layout is built once,
    on the host, from the two streams' host lengths.

    Raises:
        ValueError: the plan has no packable shared position, or a stream is missing.
    """
    span = plan.packed_span()
    if span is None:
        raise ValueError("packed execution needs shared positions with shared attention and FFN; this plan has none")
    if set(streams) != {IMAGE, TEXT}:
        raise ValueError(f"packed execution needs an image and a text stream, got modalities {sorted(streams)}")
    first, end = span
    si, st = streams[IMAGE], streams[TEXT]
    for pos in plan.positions[:first]:
        for m in pos.modalities:
            _step(model, pos, streams[m], adapter)
    pack = PackedBatch.from_seqlens([(IMAGE, si.pack.seqlens[0]), (TEXT, st.pack.seqlens[0])], si.x.device)
    joint = Stream(torch.cat([si.flush(), st.flush().to(si.x.dtype)], 0), pack)
    for pos in plan.positions[first:end]:
        _step(model, pos, joint, adapter)
    si.x, st.x = pack.split(joint.flush())
    for pos in plan.positions[end:]:
        for m in pos.modalities:
            _step(model, pos, streams[m], adapter)
    return {IMAGE: si.flush(), TEXT: st.flush()}
