"""Helpers shared by the training-step bench scripts (bench_train_step.py, bench_packed.py).

- :func:`machine`, :func:`git_commit`, :func:`run_info_lines`: the "Machine / Command / Date /
  Commit" lines every RESULTS.md section starts with.
- :func:`markers`, :func:`replace_section`: each benchmark owns one section of RESULTS.md
  between ``<!-- NAME:begin -->`` / ``<!-- NAME:end -->`` and replaces only that one.
- :func:`reference_backend`: pin every op to the plain-PyTorch oracle for the run.
- :func:`synthetic_batch`, :func:`make_train_step`: the inputs and the fp32 step they time.

The scripts import this file as ``_common`` (they put ``bench/`` on ``sys.path`` first, so it
also works when a test loads a script by path).
"""
from __future__ import annotations

import contextlib
import datetime as _dt
import os
import platform
import subprocess
from pathlib import Path
from typing import Callable, Iterator

import torch

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "bench" / "RESULTS.md"
SOT, EOT = 49406, 49407  # CLIP BPE start / end of text token ids


def cpu_name() -> str:
    """The CPU's model name from /proc/cpuinfo (``platform.processor()`` elsewhere)."""
    cpu = platform.processor() or "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return cpu


def machine(report_gpu: bool = True) -> str:
    """One line: CPU, usable cores, torch threads, GPU (``report_gpu`` and CUDA available, else
    "no GPU used"), Python and torch versions."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    gpu = torch.cuda.get_device_name(0) if report_gpu and torch.cuda.is_available() else "no GPU used"
    return (f"{cpu_name()}, {cores} usable cores ({os.cpu_count()} logical), torch threads "
            f"{torch.get_num_threads()}; {gpu}; Python {platform.python_version()}, torch {torch.__version__}")


def git_commit() -> str:
    """Short HEAD hash of the checkout, flagged when the tree has uncommitted changes."""
    def git(*args):
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=20)

    try:
        head = git("rev-parse", "--short", "HEAD")
        if head.returncode != 0:
            return "none (repository has no commits yet)"
        dirty = git("status", "--porcelain").stdout.strip()
        return head.stdout.strip() + (" (with uncommitted changes)" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown (git unavailable)"


def run_info_lines(command: str, report_gpu: bool = True) -> list[str]:
    """The ``- Machine/Command/Date/Commit`` markdown bullet lines of a results section."""
    return [
        f"- Machine: {machine(report_gpu)}",
        f"- Command: `{command}`",
        f"- Date: {_dt.datetime.now().astimezone().strftime('%Y-%m-%d %H:%M %Z')}",
        f"- Commit: {git_commit()}",
    ]


def markers(name: str) -> tuple[str, str]:
    """(begin, end) HTML-comment markers of benchmark ``name``'s section in RESULTS.md."""
    return f"<!-- {name}:begin -->", f"<!-- {name}:end -->"


def replace_section(path: Path, section: str, name: str) -> None:
    """Replace benchmark ``name``'s marked section of ``path`` with ``section`` (which carries
    the :func:`markers` itself), or append it when absent; other sections are left alone.
    Written to a per-benchmark temp file then ``os.replace``d, so a reader never sees a
    half-written file and two benchmarks finishing together do not share a temp file."""
    begin, end = markers(name)
    old = path.read_text(encoding="utf-8") if path.exists() else "# Benchmark results\n\n"
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
