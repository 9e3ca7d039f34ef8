"""The model's execution plan: which block runs at each position of each tower, and what runs
before it (DESIGN §3).

A plan is data built once from the :class:`ModelConfig`: an ordered list of positions, each
naming its block (a module path of the model), the modalities whose tokens it runs and the
lateral adapter that acts on the image tokens just before it. The executor
(:mod:`.executor`) walks it in one of two schedules, per tower or packed, so where shared
blocks, tower-only blocks and adapters sit is written down once.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..modules.layer_norm import IMAGE, TEXT
from .config import ModelConfig


@dataclass(frozen=True)
class Position:
    """One step of the plan.

    Fields:
        index: the block index within its tower(s) (vision position 0 is the conv stem under
            early specialization, so it has no position).
        block: module path of the block in the model (``"blocks.3"`` shared,
            ``"visual.blocks.0"``, ``"text.blocks.0"``).
        modalities: the modality ids whose tokens run it: ``(IMAGE,)``, ``(TEXT,)`` or
            ``(IMAGE, TEXT)`` (a shared block).
        adapter: index ``j`` of the lateral adapter that runs on the image tokens before this
            position (it advances the parallel branch one stage), or None.
        packable: both modalities can run it in one packed call (shared attention and FFN).
    """

    index: int
    block: str
    modalities: tuple
    adapter: int | None = None
    packable: bool = False


@dataclass(frozen=True)
class ExecutionPlan:
    """The positions of both towers in block order (see the module docstring).

    Fields:
        positions: every :class:`Position`; at one index a shared block gives one position,
            separate towers give a vision and a text position.
    """

    positions: tuple

    @classmethod
    def from_config(cls, cfg: ModelConfig) -> "ExecutionPlan":
        """The plan of ``cfg``: vision positions ``vision_first_block() .. vision.layers-1``,
        text positions ``0 .. text.layers-1``, shared where ``cfg.shared_layer_ids()`` says,
        adapter ``j`` before vision position ``vision.adapter_layers[j]``."""
        v = cfg.vision
        shared = set(cfg.shared_layer_ids())
        packable = {"attn", "mlp"} <= set(cfg.share)
        adapters = {i: j for j, i in enumerate(v.adapter_layers)} if v.parallel_branch else {}
        vision = range(cfg.vision_first_block(), v.layers)
        positions = []
        for i in range(max(v.layers, cfg.text.layers)):
            if i in shared:
                positions.append(Position(i, f"blocks.{i}", (IMAGE, TEXT), adapters.get(i), packable))
                continue
            if i in vision:
                positions.append(Position(i, f"visual.blocks.{i}", (IMAGE,), adapters.get(i)))
            if i < cfg.text.layers:
                positions.append(Position(i, f"text.blocks.{i}", (TEXT,)))
        return cls(tuple(positions))

    def tower(self, modality: int) -> tuple:
        """The positions ``modality``'s tokens run, in order."""
        return tuple(p for p in self.positions if modality in p.modalities)

    def packed_span(self) -> tuple[int, int] | None:
        """``(first, end)`` indices into :attr:`positions` of the contiguous run of packable
        shared positions (where packed execution packs and unpacks), or None when there is
        none. Raises ValueError when packable positions are not contiguous (a config the
        packed schedule cannot run in one span)."""
        idx = [k for k, p in enumerate(self.positions) if p.packable]
        if not idx:
            return None
        if idx != list(range(idx[0], idx[-1] + 1)):
            raise ValueError(f"packable shared positions must be contiguous, got positions {idx}")
        return idx[0], idx[-1] + 1
