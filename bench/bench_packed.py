"""Packed vs per-tower training step time (DESIGN §3, issue 3 "Benchmarks").

For each preset, two models with identical weights run the same batch: one with
``packed=True`` (image and text tokens through each shared block in one call) and one with
``packed=False`` (the towers one after the other). One step = forward + ClipLoss + backward +
AdamW step, fp32, every op pinned to the plain-PyTorch ``reference`` backend
(MSCLIP_FAST_BACKEND=reference), on the CPU. Timed steps of the two modes alternate
(packed, per-tower, packed, ...) in one process so that load from other processes hits both
alike; the ratio is per-tower median / packed median (> 1: packed is faster).

Each preset is measured with the text trimmed at EOT (``trim_text=True``, the default: ragged
text sequences of ``eot + 1`` tokens) and padded to the context length (``trim_text=False``),
``--trim`` selects. Captions (``--text``): a seeded sample of the openclipart training captions
(bench_trim.py's corpus; the default where /usr/share/openclipart is installed) or synthetic
tokens (random ids, EOT at a uniform random position); ``text_lengths`` come from the CPU tokens.

Usage::

    python bench/bench_packed.py --json bench/results/packed-cpu.json
    python bench/bench_packed.py --presets msclip-tiny --batch-size 4 --repeats 1 --text synthetic

The table is printed; ``--json`` writes the results, which ``python -m bench.report`` turns
into bench/RESULTS.md (schema: bench/report.py).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

if str(Path(__file__).resolve().parent) not in sys.path:  # find bench/_common.py also when loaded by path
    sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402
import bench_trim  # noqa: E402
from _common import synthetic_batch  # noqa: E402

DEFAULT_PRESETS = ("msclip-s-tiny", "msclip-tiny")


@dataclass
class Row:
    preset: str
    trim: bool               # text trimmed at EOT (trim_text)
    batch: int
    text_rows: int           # text tokens run: sum of eot + 1 (trimmed) or B·context_length
    tokens_packed: int       # T = B·L_img + text_rows
    packed_ms: float          # median step time
    packed_iqr_ms: float
    per_tower_ms: float
    per_tower_iqr_ms: float
    repeats: int
    ratio: float              # per_tower / packed
    loss_diff: float          # |loss_packed - loss_per_tower| of the first step (same function)


def _make_step(model, images, tokens, lengths):
    """Closure running one train step (with the batch's CPU ``text_lengths``); returns
    (wall seconds, loss)."""
    train_step = bench_trim.make_step(model, images, tokens, lengths)

    def step() -> tuple[float, float]:
        t = time.perf_counter()
        loss, _ = train_step()
        return time.perf_counter() - t, loss

    return step


def _iqr(xs: list[float]) -> float:
    if len(xs) < 2:
        return 0.0
    q = statistics.quantiles(xs, n=4, method="inclusive")
    return q[2] - q[0]


def bench_preset(name: str, batch: int, warmup: int, repeats: int, trim: bool = True,
                 corpus: "bench_trim.Corpus | None" = None) -> Row:
    """One preset with ``trim_text=trim``; captions from ``corpus`` (None: synthetic tokens)."""
    from msclip_fast.models import create_model
    from msclip_fast.modules import text_lengths

    torch.manual_seed(0)
    packed = create_model(name, packed=True, trim_text=trim)
    per_tower = create_model(name, packed=False, trim_text=trim)
    per_tower.load_state_dict(packed.state_dict())
    if corpus is None:
        images, tokens = synthetic_batch(batch, packed.image_size, packed.context_length)
        lengths = text_lengths(tokens)
    else:
        images, tokens, lengths = corpus.batch(batch, packed.image_size, seed=0)
    steps = {"packed": _make_step(packed, images, tokens, lengths),
             "per_tower": _make_step(per_tower, images, tokens, lengths)}
    first = {k: s()[1] for k, s in steps.items()}  # the first step: same weights, so same loss
    for _ in range(max(warmup - 1, 0)):
        for s in steps.values():
            s()
    times = {k: [] for k in steps}
    for _ in range(repeats):
        for k, s in steps.items():
            times[k].append(s()[0] * 1e3)
    L_img = packed.config.grid_size**2 + 1
    text_rows = int(lengths.sum()) if trim else batch * packed.context_length
    pm, tm = statistics.median(times["packed"]), statistics.median(times["per_tower"])
    return Row(name, trim, batch, text_rows, batch * L_img + text_rows, pm, _iqr(times["packed"]), tm,
               _iqr(times["per_tower"]), repeats, tm / pm, abs(first["packed"] - first["per_tower"]))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--presets", default=",".join(DEFAULT_PRESETS), help="comma-separated preset names")
    p.add_argument("--batch-size", type=int, default=64, help="images = texts per step (default: 64)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per mode (default: 2)")
    p.add_argument("--repeats", type=int, default=7, help="timed steps per mode (default: 7)")
    p.add_argument("--trim", choices=("both", "on", "off"), default="both",
                   help="text trimmed at EOT (on), padded (off) or both, trimmed first (default: both)")
    p.add_argument("--text", choices=("auto", "openclipart", "synthetic"), default="auto",
                   help="captions: openclipart training captions, synthetic tokens, or auto (openclipart "
                        "where installed, else synthetic; default)")
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
    trims = {"both": [True, False], "on": [True], "off": [False]}[args.trim]
    t0 = time.time()
    corpus, text = None, "synthetic"
    from msclip_fast.data.openclipart import DEFAULT_ROOT

    if args.text == "openclipart" or (args.text == "auto" and os.path.isdir(os.path.join(DEFAULT_ROOT, "png"))):
        from msclip_fast.models import get_model_config

        corpus = bench_trim.Corpus(bench_trim.openclipart_captions(),
                                   get_model_config(presets[0]).text.context_length, "openclipart")
        text = "openclipart training captions (make_shards)"
    with _common.reference_backend():
        rows = []
        for name in presets:
            for trim in trims:
                rows.append(bench_preset(name, args.batch_size, args.warmup, args.repeats, trim, corpus))
                r = rows[-1]
                print(f"{name} {'trimmed' if trim else 'padded'}: packed {r.packed_ms:.1f} ms, per-tower "
                      f"{r.per_tower_ms:.1f} ms, ratio {r.ratio:.2f}", file=sys.stderr)
        total = time.time() - t0
    settings = {"presets": presets, "batch_size": args.batch_size, "warmup": args.warmup, "repeats": args.repeats,
                "trims": trims, "text": text, "backend": "reference", "dtype": "fp32", "total_s": round(total, 1)}
    if corpus is not None:
        settings["corpus_lengths"] = corpus.stats
    headline = {f"packed_vs_per_tower_{r.preset}{'' if r.trim else '_padded'}": round(r.ratio, 3) for r in rows}
    _common.publish("packed", meta, settings, rows, headline, args.json)
    return rows


if __name__ == "__main__":
    main()
