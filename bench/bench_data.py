"""Input pipeline throughput: the DALI backend vs the torch DataLoader backend of
``msclip_fast.data.build_loader``, images/s at 224 px, and the time to build the shard index.

One run, one thread count for both backends (``--threads``, default: the usable cores): DALI
``num_threads`` = torch DataLoader ``num_workers`` = threads. Shards: ``--data DIR`` (its
``*.tar``, recursively, without ``*.fallback.tar``), or ``--make-shards N``: N samples of
``--source`` (openclipart, or digits for tests) written to a temp folder first by
``python -m msclip_fast.data.make_shards --image-size 256 --val-fraction 0`` (its time is
recorded, not part of any figure).

(a) Index build (:mod:`msclip_fast.data.index`): ``trusted`` = what make_shards does for its own
    shards (``build_shard_index(trusted=True)``, tar headers only, one shard after the other;
    only for shards this run made: trusting foreign shards is not this script's call);
    ``validating`` = ``build_index(shards, workers=threads, force=True)``, the full check that
    decodes every image once (what ``python -m msclip_fast.data.index DIR --force`` does). The
    validating build runs last, so the shards keep a validated index (with ``--data`` the
    existing index files are rebuilt in place).
(b) Loader throughput, per backend and mode (train: random-resized-crop; eval: resize + center
    crop), batch ``--batch-size``: a fresh ``iter()`` per measurement (epoch = repeat, the same
    samples and order for both backends), the first ``--warmup`` batches (worker start-up /
    pipeline build, reported as ``startup_s`` = time to the first batch) are excluded, then
    images/s over the next ``--batches`` batches. ``--repeats`` rounds; within a round every
    (mode, backend) runs once, the backend order alternating between rounds, so load from other
    processes hits both alike. Median and IQR over the rounds; ratio = DALI / torch images/s
    (> 1: DALI faster), of the medians, and the median of the same-round ratios.

DALI decodes on the CPU here (``"cpu"``; ``"mixed"``, nvJPEG, when CUDA is available: then the
batch ends on the GPU and each timed window ends with ``torch.cuda.synchronize()``). When DALI
is not importable the DALI rows are ``not_run`` with the reason and the torch rows still run;
when Pillow (make_shards, the index, the torch decoder) or the data source is missing, every
row is ``not_run`` and the script still exits 0 (the GPU machine has neither DALI nor Pillow).
A measurement that raises is ``failed`` (exit status 1).

Usage::

    python bench/bench_data.py --make-shards 2000 --json bench/results/data-cpu.json
    python bench/bench_data.py --data /path/to/shards --threads 8 --batches 50
    python bench/bench_data.py --make-shards 80 --source digits --batch-size 8 --batches 2 --repeats 1

The table is printed; ``--json`` writes the results, which ``python -m bench.report`` turns
into bench/RESULTS.md (schema: bench/report.py).
"""
from __future__ import annotations

import argparse
import gc
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

if str(Path(__file__).resolve().parent) not in sys.path:  # find bench/_common.py also when loaded by path
    sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402

BACKENDS = ("torch", "dali")
MODES = ("train", "eval")
OPENCLIPART_ROOT = "/usr/share/openclipart"


@dataclass
class Row:
    backend: str                      # "torch" | "dali"
    mode: str                         # "train" | "eval"
    status: str                       # "ok" | "not_run" | "failed"
    images_per_s: float | None = None         # median over the rounds
    iqr_images_per_s: float | None = None
    ratio: float | None = None                # dali rows: dali / torch images/s (of the medians)
    round_ratio_median: float | None = None   # dali rows: median of the same-round ratios
    startup_s: float | None = None            # median time from iter() to the first batch
    repeats: int = 0
    batches: int = 0
    warmup: int = 0
    batch_size: int = 0
    threads: int = 0
    images_timed: int = 0                     # per round
    runs_images_per_s: list = field(default_factory=list)
    decoder: str = ""                         # "PIL" | "dali-cpu" | "dali-mixed"
    reason: str = ""


@dataclass
class IndexRow:
    kind: str                         # "trusted" | "validating"
    status: str
    seconds: float | None = None
    shards: int = 0
    samples: int = 0
    shards_per_s: float | None = None
    samples_per_s: float | None = None
    workers: int = 0
    good: int | None = None
    fallback: dict = field(default_factory=dict)
    skipped: dict = field(default_factory=dict)
    reason: str = ""


def usable_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def dali_status() -> tuple[str | None, str]:
    """(DALI version or None, reason it is unusable)."""
    try:
        import nvidia.dali as dali
        from nvidia.dali.plugin.pytorch import DALIGenericIterator  # noqa: F401
    except Exception as e:  # ImportError or a broken install
        return None, f"nvidia-dali is not importable ({type(e).__name__}: {e})"
    return getattr(dali, "__version__", "?"), ""


def find_shards(d: Path) -> list[str]:
    """``*.tar`` under ``d``, recursively, without the index's ``*.fallback.tar``, sorted."""
    out = []
    for root, dirs, files in os.walk(d):
        dirs.sort()
        out += [os.path.join(root, f) for f in sorted(files) if f.endswith(".tar") and not f.endswith(".fallback.tar")]
    return out


def make_shards(source: str, n: int, out: Path, image_size: int, shard_size: int, workers: int,
                root: str | None) -> float:
    """Run make_shards in a child process (its log and summary line stay out of this table);
    returns its seconds. Raises RuntimeError with the tail of its output when it fails."""
    cmd = [sys.executable, "-m", "msclip_fast.data.make_shards", "--source", source, "--out", str(out),
           "--image-size", str(image_size), "--limit", str(n), "--val-fraction", "0", "--shard-size",
           str(shard_size), "--workers", str(workers)] + (["--root", root] if root else [])
    env = dict(os.environ)
    env["PYTHONPATH"] = str(_common.ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    t = time.perf_counter()
    p = subprocess.run(cmd, cwd=_common.ROOT, env=env, capture_output=True, text=True)
    if p.returncode != 0:
        tail = (p.stderr or p.stdout).strip().splitlines()[-3:]
        raise RuntimeError(f"make_shards exited {p.returncode}: {' / '.join(tail)}")
    return time.perf_counter() - t


def _iqr(xs: list[float]) -> float:
    if len(xs) < 2:
        return 0.0
    q = statistics.quantiles(xs, n=4, method="inclusive")
    return q[2] - q[0]


def _sync(x) -> None:
    if getattr(x, "is_cuda", False):
        import torch

        torch.cuda.synchronize()


def measure(loader, epoch: int, warmup: int, batches: int) -> tuple[float, float, int]:
    """(images/s over ``batches`` batches after ``warmup``, seconds to the first batch, images
    timed) of one fresh ``iter(loader)`` at ``epoch``; the iterator is closed afterwards."""
    loader.set_epoch(epoch)
    t0 = time.perf_counter()
    it = iter(loader)
    first = None
    start = t0 if warmup == 0 else None
    images = 0
    i = -1
    try:
        for i, b in enumerate(it):
            if first is None:
                _sync(b["image"])
                first = time.perf_counter() - t0
            if i < warmup:
                if i == warmup - 1:
                    _sync(b["image"])
                    start = time.perf_counter()
                continue
            images += int(b["image"].shape[0])
            if i == warmup + batches - 1:
                _sync(b["image"])
                break
        end = time.perf_counter()
    finally:
        close = getattr(it, "close", None)
        if close is not None:
            close()
        del it
        gc.collect()
    if i < warmup + batches - 1:
        raise RuntimeError(f"the epoch ended after {i + 1} batches, before warmup {warmup} + {batches} timed "
                           "batches: use more samples or fewer --batches / --warmup / a smaller --batch-size")
    return images / (end - start), first, images


def index_builds(shards: list[str], trusted: bool, workers: int) -> list[IndexRow]:
    """(a): the trusted build (when ``trusted``) then the validating one."""
    from msclip_fast.data.index import build_index, build_shard_index

    rows = []
    if trusted:
        t = time.perf_counter()
        infos = [build_shard_index(s, trusted=True) for s in shards]
        sec = time.perf_counter() - t
        n = sum(i["samples"] for i in infos)
        skipped: dict = {}
        for i in infos:
            for k, v in i["counts"]["skipped"].items():
                skipped[k] = skipped.get(k, 0) + v
        rows.append(IndexRow("trusted", "ok", sec, len(shards), n, len(shards) / sec, n / sec, 1,
                             sum(i["good"] for i in infos), {}, skipped))
    else:
        rows.append(IndexRow("trusted", "not_run", shards=len(shards),
                             reason="--data shards: only make_shards may trust its own shards"))
    t = time.perf_counter()
    s = build_index(shards, workers=workers, force=True, progress=False)
    sec = time.perf_counter() - t
    n = s["good"] + sum(s["fallback"].values()) + sum(s["skipped"].values())
    rows.append(IndexRow("validating", "ok", sec, s["shards"], n, s["shards"] / sec, n / sec,
                         min(workers, s["shards"]), s["good"], s["fallback"], s["skipped"]))
    return rows


def bench_loaders(shards, args, dali_ok: str, dali_reason: str) -> tuple[list[Row], list[str], str | None]:
    """(b): rows per (backend, mode), failures, the DALI decoder device."""
    from msclip_fast.data import build_loader

    modes = [m for m in MODES if m in args.modes]
    backends = [b for b in BACKENDS if b == "torch" or dali_ok]
    loaders, failures, dali_device = {}, [], None
    rows = {(b, m): Row(b, m, "ok", repeats=args.repeats, batches=args.batches, warmup=args.warmup,
                        batch_size=args.batch_size, threads=args.threads,
                        decoder="PIL" if b == "torch" else "dali")
            for b in BACKENDS for m in modes}
    if not dali_ok:
        for m in modes:
            rows[("dali", m)].status, rows[("dali", m)].reason = "not_run", dali_reason
    for b in backends:
        for m in modes:
            try:
                loaders[(b, m)] = build_loader(shards, args.batch_size, train=m == "train", image_size=args.image_size,
                                               backend=b, num_workers=args.threads, seed=args.seed)
                if b == "dali":
                    dali_device = loaders[(b, m)].device
                    rows[(b, m)].decoder = f"dali-{dali_device}"
            except ModuleNotFoundError as e:  # an absent peer (webdataset, ...): not this code's failure
                rows[(b, m)].status, rows[(b, m)].reason = "not_run", f"{type(e).__name__}: {e}"
            except Exception as e:
                rows[(b, m)].status, rows[(b, m)].reason = "failed", f"{type(e).__name__}: {e}"
                failures.append(f"{b} {m}: build_loader: {type(e).__name__}: {e}")
    starts: dict = {k: [] for k in rows}
    for r in range(args.repeats):
        order = backends if r % 2 == 0 else backends[::-1]
        for m in modes:
            for b in order:
                row = rows[(b, m)]
                if row.status != "ok":
                    continue
                try:
                    ips, first, images = measure(loaders[(b, m)], r, args.warmup, args.batches)
                except ModuleNotFoundError as e:
                    row.status, row.reason = "not_run", f"{type(e).__name__}: {e}"
                    continue
                except Exception as e:
                    row.status, row.reason = "failed", f"{type(e).__name__}: {e}"
                    failures.append(f"{b} {m}: {type(e).__name__}: {e}")
                    continue
                row.runs_images_per_s.append(ips)
                row.images_timed = images
                starts[(b, m)].append(first)
                print(f"round {r + 1}/{args.repeats} {m} {b}: {ips:.1f} images/s (first batch {first:.2f} s)",
                      file=sys.stderr, flush=True)
    for k, row in rows.items():
        if row.status == "ok" and row.runs_images_per_s:
            row.images_per_s = statistics.median(row.runs_images_per_s)
            row.iqr_images_per_s = _iqr(row.runs_images_per_s)
            row.startup_s = statistics.median(starts[k])
        elif row.status == "ok":
            row.status = "not_run"
    for m in modes:
        d, t = rows[("dali", m)], rows[("torch", m)]
        if d.status == t.status == "ok" and t.images_per_s:
            d.ratio = d.images_per_s / t.images_per_s
            d.round_ratio_median = statistics.median(a / b for a, b in zip(d.runs_images_per_s, t.runs_images_per_s))
    del loaders
    gc.collect()
    return [rows[(b, m)] for m in modes for b in BACKENDS], failures, dali_device


def _round(x, digits=4):
    return None if x is None else float(f"{x:.{digits}g}")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--data", type=Path, default=None, help="folder of existing shards (recursive)")
    src.add_argument("--make-shards", type=int, default=None, metavar="N",
                     help="write N samples of --source to a temp folder first (removed at the end)")
    p.add_argument("--source", default="openclipart", choices=("openclipart", "digits"),
                   help="make_shards source for --make-shards (default: openclipart)")
    p.add_argument("--openclipart-root", default=None, help=f"openclipart folder (default: {OPENCLIPART_ROOT})")
    p.add_argument("--shard-image-size", type=int, default=256, help="make_shards --image-size (default: 256)")
    p.add_argument("--shard-size", type=int, default=500, help="make_shards --shard-size (default: 500)")
    p.add_argument("--image-size", type=int, default=224, help="loader output side (default: 224)")
    p.add_argument("--threads", type=int, default=None,
                   help="DALI num_threads = torch num_workers = index workers (default: usable cores)")
    p.add_argument("--batch-size", type=int, default=64, help="default: 64")
    p.add_argument("--warmup", type=int, default=3, help="untimed batches per measurement (default: 3)")
    p.add_argument("--batches", type=int, default=20, help="timed batches per measurement (default: 20)")
    p.add_argument("--repeats", type=int, default=5, help="rounds (default: 5)")
    p.add_argument("--modes", default="train,eval", help="comma-separated: train, eval (default: both)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--keep-shards", action="store_true", help="keep the --make-shards temp folder (path printed)")
    p.add_argument("--json", type=Path, default=None, help="write the results here (schema: bench/report.py)")
    return p


def _version(mod: str) -> str | None:
    try:
        m = __import__(mod)
        return getattr(m, "__version__", "?")
    except Exception:
        return None


def main(argv: list[str] | None = None) -> dict:
    """Run the benchmark; returns the JSON document. SystemExit(1) when a measurement failed."""
    parser = build_parser()
    args = parser.parse_args(argv)
    args.threads = args.threads or usable_cores()
    args.modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if not args.modes or any(m not in MODES for m in args.modes):
        parser.error(f"--modes must be a comma-separated subset of {','.join(MODES)}")
    for name in ("threads", "batch_size", "batches", "repeats", "image_size", "shard_image_size", "shard_size"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.warmup < 0 or (args.make_shards is not None and args.make_shards < 1):
        parser.error("--warmup must be >= 0 and --make-shards >= 1")
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    meta = _common.run_meta(device, "bench/bench_data.py", sys.argv[1:] if argv is None else argv)
    t0 = time.time()
    dali_version, dali_reason = dali_status()
    not_run: dict = {}
    failures: list = []
    index_rows: list = []
    tmp = None
    shards: list = []
    make_s = None
    # prerequisites whose absence makes every row not_run (never a failure)
    missing = None
    if not _common.installed("PIL"):
        missing = ("Pillow is not installed (make_shards, the index build and the torch backend's decoder need "
                   "it)")
    elif args.make_shards is not None and args.source == "openclipart" and not os.path.isdir(
            os.path.join(args.openclipart_root or OPENCLIPART_ROOT, "png")):
        missing = (f"no openclipart: {args.openclipart_root or OPENCLIPART_ROOT}/png does not exist (install "
                   "openclipart-png and openclipart-svg: `make openclipart`)")
    elif args.make_shards is not None and args.source == "digits" and not _common.installed("sklearn"):
        missing = "scikit-learn is not installed (the digits source needs it)"
    try:
        if missing is None:
            if args.make_shards is not None:
                tmp = Path(tempfile.mkdtemp(prefix="msclip_bench_data_"))
                try:
                    make_s = make_shards(args.source, args.make_shards, tmp, args.shard_image_size, args.shard_size,
                                         args.threads, args.openclipart_root)
                except RuntimeError as e:
                    missing = str(e)
                shards = find_shards(tmp) if missing is None else []
            else:
                if not args.data.is_dir():
                    parser.error(f"--data {args.data}: not a directory")
                shards = find_shards(args.data)
                if not shards:
                    parser.error(f"--data {args.data}: no .tar shards in it")
        if missing is None:
            try:
                index_rows = index_builds(shards, args.make_shards is not None, args.threads)
            except ModuleNotFoundError as e:
                missing = f"{type(e).__name__}: {e}"
            except Exception as e:
                failures.append(f"index build: {type(e).__name__}: {e}")
                index_rows = [IndexRow("validating", "failed", shards=len(shards), reason=f"{type(e).__name__}: {e}")]
        if missing is None and not failures:
            rows, fails, dali_device = bench_loaders(shards, args, dali_version is not None, dali_reason)
            failures += fails
        else:
            dali_device = None
            why = missing or "the index build failed"
            rows = [Row(b, m, "not_run", decoder="PIL" if b == "torch" else "dali",
                        reason=why if b == "torch" or dali_version else dali_reason)
                    for m in args.modes for b in BACKENDS]
            if missing:
                index_rows = index_rows or [IndexRow(k, "not_run", reason=missing) for k in ("trusted", "validating")]
                not_run["all"] = missing
        if dali_version is None:
            not_run["dali"] = dali_reason
        samples = next((r.samples for r in index_rows if r.kind == "validating" and r.status == "ok"), None)
    finally:
        if tmp is not None:
            if args.keep_shards:
                print(f"shards kept in {tmp}", file=sys.stderr)
            else:
                shutil.rmtree(tmp, ignore_errors=True)
    for r in rows:
        if r.status == "not_run" and r.reason and r.reason not in not_run.values():
            not_run[f"{r.backend}_{r.mode}"] = r.reason
    settings = {
        "source": (f"make_shards --source {args.source} --limit {args.make_shards}" if args.make_shards is not None
                   else f"--data {args.data}"),
        "shards": len(shards), "samples": samples, "shard_image_size": args.shard_image_size,
        "image_size": args.image_size, "threads": args.threads, "batch_size": args.batch_size,
        "warmup": args.warmup, "batches": args.batches, "repeats": args.repeats, "modes": args.modes,
        "seed": args.seed, "dali_version": dali_version, "dali_device": dali_device, "torch_decoder": "PIL",
        "pillow": _version("PIL"), "webdataset": _version("webdataset"),
        "make_shards_s": _round(make_s), "total_s": round(time.time() - t0, 1),
    }
    headline = {}
    by = {(r.backend, r.mode): r for r in rows}
    for m in args.modes:
        d, t = by[("dali", m)], by[("torch", m)]
        if t.status == "ok":
            headline[f"data_torch_images_per_s_{m}"] = _round(t.images_per_s)
        if d.status == "ok":
            headline[f"data_dali_images_per_s_{m}"] = _round(d.images_per_s)
        if d.ratio is not None:
            headline[f"data_dali_vs_torch_images_per_s_{m}"] = _round(d.ratio, 3)
    for ir in index_rows:
        if ir.status == "ok":
            key = "data_index_build_samples_per_s" if ir.kind == "validating" else "data_index_trusted_samples_per_s"
            headline[key] = _round(ir.samples_per_s)

    def clean(d):
        return {k: _common.finite(v) if isinstance(v, float) else
                ([_round(x) for x in v] if k == "runs_images_per_s" else v) for k, v in d.items()}

    extra = {"index": [clean(asdict(r)) for r in index_rows], "not_run": not_run}
    if failures:
        extra.update(status="failed", failures=failures)
    else:
        extra["status"] = "ok"
    doc = _common.payload("data", meta, settings, [clean(asdict(r)) for r in rows], headline, **extra)
    if args.json:
        _common.write_json(args.json, doc)
    import report  # noqa: PLC0415 - report imports _common

    print(report.render_doc(doc, source=str(args.json) if args.json else None))
    if failures:
        raise SystemExit(1)
    return doc


if __name__ == "__main__":
    main()
