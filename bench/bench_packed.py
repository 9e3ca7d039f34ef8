"""Packed vs per-tower training step time (DESIGN §3, issue 3 "Benchmarks").

For each preset, two models with identical weights run the same synthetic batches: one with
``packed=True`` (image and text tokens through each shared block in one call) and one with
``packed=False`` (the towers one after the other). One step = forward + ClipLoss + backward +
AdamW step, fp32, every op pinned to the plain-PyTorch ``reference`` backend
(MSCLIP_FAST_BACKEND=reference), on the CPU. Timed steps of the two modes alternate
(packed, per-tower, packed, ...) in one process so that load from other processes hits both
alike; the ratio is per-tower median / packed median (> 1: packed is faster).

Usage::

    python bench/bench_packed.py --json bench/results/packed-cpu.json
    python bench/bench_packed.py --presets msclip-tiny --batch-size 4 --repeats 1

The table is printed; ``--json`` writes the results, which ``python -m bench.report`` turns
into bench/RESULTS.md (schema: bench/report.py).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

if str(Path(__file__).resolve().parent) not in sys.path:  # find bench/_common.py also when loaded by path
    sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402
from _common import synthetic_batch  # noqa: E402

DEFAULT_PRESETS = ("msclip-s-tiny", "msclip-tiny")


@dataclass
class Row:
    preset: str
    batch: int
    tokens_packed: int       # T = B·L_img + B·L_txt
    packed_ms: float          # median step time
    packed_iqr_ms: float
    per_tower_ms: float
    per_tower_iqr_ms: float
    repeats: int
    ratio: float              # per_tower / packed
    loss_diff: float          # |loss_packed - loss_per_tower| of the first step (same function)


def _make_step(model, images, tokens):
    """Closure running one train step; returns (wall seconds, loss)."""
    train_step = _common.make_train_step(model, images, tokens, lr=1e-4, weight_decay=0.2)

    def step() -> tuple[float, float]:
        t = time.perf_counter()
        loss = train_step()
        return time.perf_counter() - t, loss

    return step


def _iqr(xs: list[float]) -> float:
    if len(xs) < 2:
        return 0.0
    q = statistics.quantiles(xs, n=4, method="inclusive")
    return q[2] - q[0]


def bench_preset(name: str, batch: int, warmup: int, repeats: int) -> Row:
    from msclip_fast.models import create_model

    torch.manual_seed(0)
    packed = create_model(name, packed=True)
    per_tower = create_model(name, packed=False)
    per_tower.load_state_dict(packed.state_dict())
    images, tokens = synthetic_batch(batch, packed.image_size, packed.context_length)
    steps = {"packed": _make_step(packed, images, tokens), "per_tower": _make_step(per_tower, images, tokens)}
    first = {k: s()[1] for k, s in steps.items()}  # the first step: same weights, so same loss
    for _ in range(max(warmup - 1, 0)):
        for s in steps.values():
            s()
    times = {k: [] for k in steps}
    for _ in range(repeats):
        for k, s in steps.items():
            times[k].append(s()[0] * 1e3)
    L_img = packed.config.grid_size**2 + 1
    pm, tm = statistics.median(times["packed"]), statistics.median(times["per_tower"])
    return Row(name, batch, batch * (L_img + packed.context_length), pm, _iqr(times["packed"]), tm,
               _iqr(times["per_tower"]), repeats, tm / pm, abs(first["packed"] - first["per_tower"]))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--presets", default=",".join(DEFAULT_PRESETS), help="comma-separated preset names")
    p.add_argument("--batch-size", type=int, default=64, help="images = texts per step (default: 64)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per mode (default: 2)")
    p.add_argument("--repeats", type=int, default=7, help="timed steps per mode (default: 7)")
    p.add_argument("--json", type=Path, default=None, help="write the results here (schema: bench/report.py)")
    return p


def main(argv: list[str] | None = None) -> list[Row]:
    """Run the benchmark; returns one Row per preset. Restores MSCLIP_FAST_BACKEND."""
    args = build_parser().parse_args(argv)
    if args.batch_size < 1 or args.repeats < 1 or args.warmup < 0:
        raise ValueError(f"--batch-size/--repeats must be >= 1 and --warmup >= 0, got "
                         f"{args.batch_size}/{args.repeats}/{args.warmup}")
    meta = _common.run_meta("cpu", "bench/bench_packed.py", sys.argv[1:] if argv is None else argv)
    presets = [n.strip() for n in args.presets.split(",") if n.strip()]
    with _common.reference_backend():
        t0 = time.time()
        rows = []
        for name in presets:
            rows.append(bench_preset(name, args.batch_size, args.warmup, args.repeats))
            r = rows[-1]
            print(f"{name}: packed {r.packed_ms:.1f} ms, per-tower {r.per_tower_ms:.1f} ms, "
                  f"ratio {r.ratio:.2f}", file=sys.stderr)
        total = time.time() - t0
    settings = {"presets": presets, "batch_size": args.batch_size, "warmup": args.warmup, "repeats": args.repeats,
                "backend": "reference", "dtype": "fp32", "total_s": round(total, 1)}
    _common.publish("packed", meta, settings, rows, {f"packed_vs_per_tower_{r.preset}": round(r.ratio, 3) for r in rows}, args.json)
    return rows


if __name__ == "__main__":
    main()
