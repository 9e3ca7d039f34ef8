"""Train-step throughput per model preset: the baseline later issues beat (DESIGN §8).

One step = forward (both towers) + ClipLoss + backward + AdamW step, fp32, the "reference"
backend for every op (MSCLIP_FAST_BACKEND=reference), on the CPU. Each preset is measured with
``torch.utils.benchmark.Measurement`` statistics over single timed steps after warmup, on synthetic inputs
(random pixels; random token ids with SOT, EOT and zero padding), side by side in one process.
Tiny presets run at ``--batch-size`` (32), full-size presets at ``--full-batch-size`` (2).
FLOPs per sample (forward + backward, matmuls and convolutions) come from
``torch.utils.flop_counter.FlopCounterMode`` on one step; MFU is reported when ``--peak-tflops``
is given (a CPU has no single honest peak).

Usage::

    python bench/bench_train_step.py --json bench/results/train_step-cpu.json   # all presets
    python bench/bench_train_step.py --presets tiny
    python bench/bench_train_step.py --presets clip-tiny --repeats 1 --min-run-time 0

The table is printed; ``--json`` writes the results, which ``python -m bench.report`` turns
into bench/RESULTS.md (schema: bench/report.py).
"""
from __future__ import annotations

import argparse
import gc
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.utils.benchmark as benchmark
from torch.utils.benchmark.utils.common import TaskSpec
from torch.utils.flop_counter import FlopCounterMode

import msclip_fast as mf

if str(Path(__file__).resolve().parent) not in sys.path:  # find bench/_common.py also when loaded by path
    sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402
from _common import synthetic_batch  # noqa: E402


@dataclass
class Row:
    preset: str
    params_m: float
    batch: int
    image_size: int
    median_ms: float
    iqr_ms: float
    timed_steps: int
    samples_per_s: float
    gflop_per_sample: float | None
    gflops_achieved: float | None
    mfu: float | None
    cpu_share: float
    loss: float


def is_tiny(name: str) -> bool:
    return name.endswith("-tiny")


def size_class(name: str) -> str:
    return "tiny" if is_tiny(name) else ("b16" if "b16" in name else "b32")


def estimate_seconds(name: str, took: dict[str, float]) -> float:
    """Projected seconds for a preset: the longest one of its size class measured so far, else
    a multiple of a smaller class (a full B/32 step at batch 2 does ~4x the FLOPs of a tiny
    step at batch 32 and runs fewer steps; B/16 has ~4x B/32's image tokens); 0 if unknown."""
    cls = size_class(name)
    if cls in took:
        return took[cls]
    if cls == "b32" and "tiny" in took:
        return 5.0 * took["tiny"]
    if cls == "b16":
        if "b32" in took:
            return 3.0 * took["b32"]
        if "tiny" in took:
            return 15.0 * took["tiny"]
    return 0.0


def select_presets(spec: str) -> list[str]:
    """``tiny`` | ``full`` | ``all`` | comma-separated preset names -> ordered preset list."""
    names = mf.list_models()
    tiny = [n for n in names if is_tiny(n)]
    # cheapest first, so a time budget cuts the slowest (B/16) ones
    full = sorted((n for n in names if not is_tiny(n)), key=lambda n: ("b16" in n, n))
    if spec == "tiny":
        return tiny
    if spec == "full":
        return full
    if spec == "all":
        return tiny + full
    chosen = [s.strip() for s in spec.split(",") if s.strip()]
    unknown = [s for s in chosen if s not in names]
    if unknown or not chosen:
        raise ValueError(f"--presets must be tiny, full, all or names from {names}, got {spec!r}")
    return chosen


def bench_preset(name: str, batch: int, warmup: int, repeats: int, min_run_time: float,
                 flops: bool, peak_tflops: float | None) -> Row:
    torch.manual_seed(0)
    model = mf.create_model(name)
    n_params = sum(p.numel() for p in model.parameters())
    images, tokens = synthetic_batch(batch, model.image_size, model.context_length)
    step = _common.make_train_step(model, images, tokens, lr=1e-5, weight_decay=0.1)

    flop_per_sample = None
    if flops:
        # one counted step (forward + backward; the optimizer's elementwise work is not
        # counted); it also warms up the allocator and autograd graph caches
        counter = FlopCounterMode(display=False)
        with counter:
            img, txt, scale = model(images, tokens)
            mf.ClipLoss()(img, txt, scale).backward()
        model.zero_grad(set_to_none=True)
        flop_per_sample = counter.get_total_flops() / batch
    loss = float("nan")
    for _ in range(warmup):
        loss = step()
    # Timed steps: exactly `repeats` single steps, continued until `min_run_time` has passed.
    # (blocked_autorange decides the count from time alone, and Timer.timeit adds two warmup
    # steps per call, which a multi-second full-size step cannot afford.) The statistics come
    # from torch.utils.benchmark's Measurement.
    times: list[float] = []
    cpu0 = time.process_time()
    while len(times) < repeats or sum(times) < min_run_time:
        t0 = time.perf_counter()
        loss = step()
        times.append(time.perf_counter() - t0)
    # CPU seconds this process got per wall second per thread: ~1 on an idle machine; far
    # below 1 means other processes took the cores and the times are inflated.
    cpu_share = (time.process_time() - cpu0) / sum(times) / torch.get_num_threads()
    m = benchmark.Measurement(
        number_per_run=1, raw_times=times,
        task_spec=TaskSpec(stmt="train_step()", setup="", label="train step", sub_label=name,
                           description=f"batch {batch}", num_threads=torch.get_num_threads()),
    )
    median = m.median
    row = Row(
        preset=name,
        params_m=n_params / 1e6,
        batch=batch,
        image_size=model.image_size,
        median_ms=median * 1e3,
        iqr_ms=m.iqr * 1e3,
        timed_steps=len(times),
        samples_per_s=batch / median,
        gflop_per_sample=flop_per_sample / 1e9 if flop_per_sample else None,
        gflops_achieved=flop_per_sample * batch / median / 1e9 if flop_per_sample else None,
        mfu=(flop_per_sample * batch / median / (peak_tflops * 1e12)
             if (flop_per_sample and peak_tflops) else None),
        cpu_share=cpu_share,
        loss=loss,
    )
    del model, step
    gc.collect()
    return row


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--presets", default="all", help="tiny | full | all | comma-separated names (default: all)")
    p.add_argument("--batch-size", type=int, default=32, help="batch for tiny presets (default: 32)")
    p.add_argument("--full-batch-size", type=int, default=2, help="batch for full-size presets (default: 2)")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps before timing (default: 1)")
    p.add_argument("--repeats", type=int, default=3, help="at least this many timed steps (default: 3)")
    p.add_argument("--min-run-time", type=float, default=2.0,
                   help="keep timing steps until this many seconds have passed (default: 2)")
    p.add_argument("--full-warmup", type=int, default=0,
                   help="untimed steps for full-size presets besides the FLOP-counting one (default: 0)")
    p.add_argument("--full-repeats", type=int, default=2, help="timed steps for full-size presets (default: 2)")
    p.add_argument("--time-budget", type=float, default=270.0,
                   help="skip presets projected to end after this many seconds (default: 270)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--no-flops", action="store_true", help="skip the FLOP-counting step")
    p.add_argument("--peak-tflops", type=float, default=None, help="device peak for the MFU column")
    p.add_argument("--json", type=Path, default=None, help="write the results here (schema: bench/report.py)")
    return p


def main(argv: list[str] | None = None) -> list[Row]:
    """Run the benchmark; returns one Row per measured preset."""
    # the caller's environment (before the backend is pinned below)
    meta = _common.run_meta("cpu", "bench/bench_train_step.py", sys.argv[1:] if argv is None else argv)
    # Pin every op to the plain-PyTorch oracle: this is the baseline.
    with _common.reference_backend():
        return _main(argv, meta)


def _main(argv: list[str] | None, meta: dict) -> list[Row]:
    args = build_parser().parse_args(argv)
    for name in ("batch_size", "full_batch_size", "repeats", "full_repeats"):
        if getattr(args, name) <= 0:
            raise ValueError(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    for name in ("warmup", "full_warmup", "min_run_time"):
        if getattr(args, name) < 0:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(args, name)}")
    if args.threads:
        torch.set_num_threads(args.threads)
    presets = select_presets(args.presets)
    start = time.perf_counter()
    rows, skipped = [], []
    took: dict[str, float] = {}  # size class -> longest preset time so far
    for name in presets:
        elapsed = time.perf_counter() - start
        if elapsed + estimate_seconds(name, took) > args.time_budget:
            skipped.append(name)
            continue
        t0 = time.perf_counter()
        tiny = is_tiny(name)
        batch = args.batch_size if tiny else args.full_batch_size
        # a full-size step takes seconds on a CPU: fewer timed steps, no time-based extension
        warmup = args.warmup if tiny or args.no_flops else args.full_warmup
        repeats = args.repeats if tiny else args.full_repeats
        row = bench_preset(name, batch, warmup, repeats, args.min_run_time if tiny else 0.0,
                           not args.no_flops, args.peak_tflops)
        print(f"{name:18s} batch {batch:3d}: {row.median_ms:9.1f} ms/step  {row.samples_per_s:8.2f} samples/s"
              f"  (CPU share {row.cpu_share:.2f})", flush=True)
        rows.append(row)
        took[size_class(name)] = max(took.get(size_class(name), 0.0), time.perf_counter() - t0)
    settings = {"presets": presets, "batch_size": args.batch_size, "full_batch_size": args.full_batch_size,
                "warmup": args.warmup, "repeats": args.repeats, "full_warmup": args.full_warmup,
                "full_repeats": args.full_repeats, "min_run_time": args.min_run_time,
                "time_budget": args.time_budget, "backend": "reference", "dtype": "fp32",
                "peak_tflops": args.peak_tflops, "skipped": skipped,
                "total_s": round(time.perf_counter() - start, 1)}
    _common.publish("train_step", meta, settings, rows, {f"train_step_samples_per_s_{r.preset}": round(r.samples_per_s, 3) for r in rows}, args.json)
    return rows


if __name__ == "__main__":
    main()
