"""Helpers shared by the bench scripts (bench_loss.py, bench_ops.py, bench_train_step.py,
bench_packed.py) and the report (report.py).

- :func:`run_meta`: the one place that describes a run (machine, command, UTC date, git commit
  and dirty flag, torch/triton versions, device); every script's ``--json`` carries it under
  ``"meta"``. :func:`payload` and :func:`write_json` wrap it into the JSON document that
  ``python -m bench.report`` reads (schema in report.py's docstring).
- :func:`markers`, :func:`replace_section`: a generator owns one section of RESULTS.md
  between ``<!-- NAME:begin -->`` / ``<!-- NAME:end -->`` and replaces only that one (the
  report owns ``bench_report``; the kernel report owns ``kernel_report``).
- :func:`reference_backend`: pin every op to the plain-PyTorch oracle for the run.
- :func:`synthetic_batch`, :func:`make_train_step`: the inputs and the fp32 step they time.

The scripts import this file as ``_common`` (they put ``bench/`` on ``sys.path`` first, so it
also works when a test loads a script by path). torch is imported inside the functions that
need it, so the report can use this module without paying for a torch import.
"""
from __future__ import annotations

import contextlib
import datetime as _dt
import importlib.metadata
import json
import os
import platform
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Callable, Iterator

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "bench" / "RESULTS.md"
RESULTS_DIR = ROOT / "bench" / "results"
CHARTS_DIR = ROOT / "bench" / "charts"
SCHEMA = 1  # version of the JSON document written by every bench script (report.py docstring)
SOT, EOT = 49406, 49407  # CLIP BPE start / end of text token ids


def cpu_name() -> str:
    """The CPU's model name from /proc/cpuinfo (``platform.processor()`` elsewhere)."""
    cpu = platform.processor() or platform.machine() or "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return cpu


def _git(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=20)


def git_state() -> tuple[str | None, bool | None]:
    """(short HEAD hash, whether the tree has uncommitted changes); (None, None) when git or
    the repository is unavailable (e.g. a copied tree without .git). ``MSCLIP_FAST_COMMIT``
    names the commit in that case (a copied tree's caller knows it)."""
    try:
        head = _git("rev-parse", "--short", "HEAD")
        if head.returncode == 0 and head.stdout.strip():
            dirty = _git("status", "--porcelain", "--untracked-files=no")
            return head.stdout.strip(), bool(dirty.stdout.strip()) if dirty.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        pass
    return os.environ.get("MSCLIP_FAST_COMMIT") or None, None


def installed(module: str) -> bool:
    """Whether ``module`` can be found, without importing it (an optional peer)."""
    import importlib.util

    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


# environment variables that change what a benchmark measures; recorded with every run and
# put in front of its command line
ENV_VARS = ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "MKL_NUM_THREADS", "TRITON_INTERPRET", "MSCLIP_FAST_BACKEND",
            "CUDA_VISIBLE_DEVICES", "TORCH_CUDA_ARCH_LIST")


def run_meta(device: str, script: str, argv: list[str] | None = None) -> dict:
    """Everything that says where, when and how a result was measured (the JSON ``"meta"``).

    ``script``: the script's path relative to the repository (``bench/bench_loss.py``);
    ``argv``: its arguments (default ``sys.argv[1:]``). Keys: ``machine`` {cpu, cores (usable),
    logical_cpus, torch_threads, gpu (name or None), gpu_count, cuda (torch's CUDA version),
    python, platform, load_avg [1, 5, 15 min] at the start (payload adds load_avg_end)},
    ``env`` (the set ones of :data:`ENV_VARS`), ``command`` (with those variables in front),
    ``date_utc``
    (ISO 8601, seconds, "Z"), ``commit``, ``dirty``, ``torch``, ``triton``, ``device``."""
    import torch

    argv = sys.argv[1:] if argv is None else list(argv)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    commit, dirty = git_state()
    env = {k: os.environ[k] for k in ENV_VARS if os.environ.get(k)}
    return {
        "machine": {
            "cpu": cpu_name(),
            "cores": cores,
            "logical_cpus": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "gpu": gpu,
            "gpu_count": torch.cuda.device_count() if gpu else 0,
            "cuda": torch.version.cuda,
            "python": platform.python_version(),
            "platform": platform.platform(),
            "load_avg": [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None,
        },
        "env": env,
        "command": " ".join([*(f"{k}={shlex.quote(v)}" for k, v in env.items()), "python", script,
                             *(shlex.quote(a) for a in argv)]),
        "date_utc": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "commit": commit,
        "dirty": dirty,
        "torch": torch.__version__,
        "triton": _version("triton"),
        "device": device,
    }


def payload(benchmark: str, meta: dict, settings: dict, rows: list[dict], headline: dict,
            **extra) -> dict:
    """The JSON document of one benchmark run (schema: report.py's docstring); adds the load
    average at the end to ``meta.machine`` (other processes sharing the cores inflate times)."""
    machine = dict(meta.get("machine", {}))
    if hasattr(os, "getloadavg"):
        machine["load_avg_end"] = [round(x, 2) for x in os.getloadavg()]
    meta = {**meta, "machine": machine}
    return {"schema": SCHEMA, "benchmark": benchmark, "meta": meta, "settings": settings,
            "rows": rows, "headline": headline, **extra}


def write_json(path: Path | str, doc: dict) -> Path:
    """Write ``doc`` to ``path`` (parents created) through a temp file and ``os.replace``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(doc, indent=1, allow_nan=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return path


def finite(x):
    """``x`` as a float, or None when it is None/NaN/inf (JSON has no NaN)."""
    if x is None:
        return None
    x = float(x)
    return x if x == x and abs(x) != float("inf") else None


def publish(benchmark: str, meta: dict, settings: dict, rows: list, headline: dict, json_path) -> dict:
    """End of a benchmark whose rows are dataclasses: the JSON document (floats made finite),
    written to ``json_path`` when given, and its table printed as the report renders it."""
    import dataclasses

    doc = payload(benchmark, meta, settings,
                  [{k: finite(v) if isinstance(v, float) else v for k, v in dataclasses.asdict(r).items()}
                   for r in rows], headline)
    if json_path:
        write_json(json_path, doc)
    import report  # noqa: PLC0415 - report imports this module

    print(report.render_doc(doc, source=str(json_path) if json_path else None))
    return doc


def markers(name: str) -> tuple[str, str]:
    """(begin, end) HTML-comment markers of generator ``name``'s section in RESULTS.md."""
    return f"<!-- {name}:begin -->", f"<!-- {name}:end -->"


def replace_section(path: Path, section: str, name: str) -> None:
    """Replace benchmark ``name``'s marked section of ``path`` with ``section`` (which carries
    the :func:`markers` itself), or append it when absent; other sections are left alone.
    Written to a per-benchmark temp file then ``os.replace``d, so a reader never sees a
    half-written file and two benchmarks finishing together do not share a temp file."""
    begin, end = markers(name)
    old = path.read_text(encoding="utf-8") if path.exists() else "# Benchmark results\n\n"
    if (begin in old) != (end in old) or old.count(begin) > 1:
        raise ValueError(f"{path}: the {begin} / {end} markers are unpaired or repeated; fix the file by hand")
    if begin in old and end in old:
        pre, rest = old.split(begin, 1)
        post = rest.split(end, 1)[1].lstrip("\n")
        new = pre + section + ("\n" + post if post else "")
    else:
        new = old.rstrip("\n") + "\n\n" + section
    tmp = path.with_suffix(f"{path.suffix}.{name}.tmp")
    tmp.write_text(new, encoding="utf-8")
    os.replace(tmp, path)


@contextlib.contextmanager
def reference_backend() -> Iterator[None]:
    """Set MSCLIP_FAST_BACKEND=reference inside the block and restore the caller's value (or
    its absence) after it, so an in-process caller (a smoke test) is not affected."""
    saved = os.environ.get("MSCLIP_FAST_BACKEND")
    os.environ["MSCLIP_FAST_BACKEND"] = "reference"
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop("MSCLIP_FAST_BACKEND", None)
        else:
            os.environ["MSCLIP_FAST_BACKEND"] = saved


def synthetic_batch(batch: int, image_size: int, context_length: int, seed: int = 0):
    """Random normalized-looking pixels (B,3,S,S) float32 and tokens (B,L) int64 with SOT at 0,
    EOT at a random position (the argmax pooling target) and zero padding after it."""
    import torch

    g = torch.Generator().manual_seed(seed)
    images = torch.randn(batch, 3, image_size, image_size, generator=g)
    tokens = torch.zeros(batch, context_length, dtype=torch.int64)
    lengths = torch.randint(3, context_length - 1, (batch,), generator=g)
    for i, n in enumerate(lengths.tolist()):
        tokens[i, 0] = SOT
        tokens[i, 1:n] = torch.randint(1, SOT, (n - 1,), generator=g)
        tokens[i, n] = EOT
    return images, tokens


def make_train_step(model, images, tokens, lr: float, weight_decay: float) -> Callable[[], float]:
    """Closure running one fp32 train step (forward + ClipLoss + backward + AdamW step) of
    ``model`` (put in train mode) on the fixed batch; returns the loss as a float."""
    import torch

    import msclip_fast as mf

    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=weight_decay)
    loss_fn = mf.ClipLoss()
    model.train()

    def step() -> float:
        img, txt, scale = model(images, tokens)
        loss = loss_fn(img, txt, scale)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss.detach())

    return step
