"""Benchmark of the contrastive loss: time and peak memory of forward+backward.

Compares, in one run and on the same inputs (N x D fp32, L2-normalized, scale 100):
  fused      msclip_fast.ops.contrastive_loss(backend="cpu" or "cuda"): the _C extension
  triton     msclip_fast.ops.contrastive_loss(backend="triton"): kernels/contrastive.py (CUDA only;
             dropped with --device cpu, where it would run in the interpreter)
  reference  msclip_fast.ops.contrastive_loss_ref (materializes the N x N logits)
  open_clip  open_clip.loss.ClipLoss (when installed)
Each (implementation, N) runs in a fresh subprocess so its peak memory is its own: peak RSS over
the process's RSS just before the call (CPU; Linux VmHWM reset through /proc/self/clear_refs), or
torch.cuda.max_memory_allocated over the inputs (CUDA). Sizes whose naive N x N buffers would not
fit in --max-mem-gib are skipped for the materializing implementations.

    python bench/bench_loss.py --sizes 4096,8192,16384,32768 [--device cpu] [--write bench/RESULTS.md]

Writes (or replaces) only the "## Contrastive loss" section of RESULTS.md.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SECTION = "## Contrastive loss"

_CHILD = r"""
import json, sys, time, torch
import torch.nn.functional as F
impl, n, d, device, repeats = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], int(sys.argv[5])
from msclip_fast import ops

def status(key):
    for line in open('/proc/self/status'):
        if line.startswith(key):
            return int(line.split()[1]) * 1024

if impl == 'fused':
    fn = lambda a, b, s: ops.contrastive_loss(a, b, s, backend='cuda' if device == 'cuda' else 'cpu')
elif impl == 'triton':
    fn = lambda a, b, s: ops.contrastive_loss(a, b, s, backend='triton')
elif impl == 'reference':
    fn = ops.contrastive_loss_ref
else:
    from open_clip.loss import ClipLoss
    loss_mod = ClipLoss()
    fn = lambda a, b, s: loss_mod(a, b, s)

def step(a, b, s):
    a = a.detach().requires_grad_(); b = b.detach().requires_grad_(); s = s.detach().requires_grad_()
    fn(a, b, s).backward()
    return a.grad, b.grad

g = torch.Generator().manual_seed(0)
img = F.normalize(torch.randn(n, d, generator=g), dim=-1).to(device)
txt = F.normalize(torch.randn(n, d, generator=g), dim=-1).to(device)
scale = torch.tensor(100.0, device=device)
step(img[:256], txt[:256], scale)  # warm-up: BLAS/OpenMP/CUDA context
sync = torch.cuda.synchronize if device == 'cuda' else (lambda: None)
times = []
for r in range(repeats):
    if device == 'cuda':
        torch.cuda.reset_peak_memory_stats(); base = torch.cuda.memory_allocated()
    else:
        base = status('VmRSS:'); open('/proc/self/clear_refs', 'w').write('5')
    sync(); t = time.perf_counter()
    gi, gt = step(img, txt, scale)
    sync(); times.append(time.perf_counter() - t)
    peak = (torch.cuda.max_memory_allocated() if device == 'cuda' else status('VmHWM:')) - base
    del gi, gt
print(json.dumps({'time_s': min(times), 'peak_mib': peak / 2**20}))
"""


def run_one(impl, n, d, device, repeats, timeout):
    env = dict(os.environ, OMP_WAIT_POLICY=os.environ.get("OMP_WAIT_POLICY", "passive"))
    try:
        out = subprocess.run([sys.executable, "-c", _CHILD, impl, str(n), str(d), device, str(repeats)],
                             capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)
    except subprocess.TimeoutExpired:
        return {"skipped": f"timeout {timeout}s"}
    if out.returncode != 0:
        return {"skipped": "failed: " + (out.stderr.strip().splitlines() or ["?"])[-1][:120]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def naive_bytes(n):
    # logits, two softmax outputs / their gradients: about four N x N fp32 buffers at the peak
    return 4 * 4 * n * n


def mem_available_gib():
    try:
        for line in open("/proc/meminfo"):
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return 8.0


def machine(device):
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name"))
    except (OSError, StopIteration):
        pass
    desc = (f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__} ({torch.get_num_threads()} threads),"
            f" load average {os.getloadavg()[0]:.1f} at the start (other jobs share the cores)")
    if device == "cuda":
        desc = f"{torch.cuda.get_device_name()} / " + desc
    return desc


def commit():
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain"], capture_output=True, text=True, cwd=ROOT).stdout.strip()
        return sha + (" (+ uncommitted changes)" if dirty else "")
    except OSError:
        return "unknown"


def write_section(path: Path, text: str):
    old = path.read_text() if path.exists() else "# Benchmark results\n"
    pattern = re.compile(rf"^{re.escape(SECTION)}\n.*?(?=^## |\Z)", re.S | re.M)
    if pattern.search(old):
        new = pattern.sub(lambda _: text, old)
    else:
        new = old.rstrip("\n") + "\n\n" + text
    path.write_text(new)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", default="4096,8192,16384,32768,65536")
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--impls", default="fused,triton,reference,open_clip")
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--max-mem-gib", type=float, default=None, help="skip naive sizes above this (default 80%% of MemAvailable)")
    p.add_argument("--timeout", type=int, default=900, help="seconds per (implementation, N)")
    p.add_argument("--write", default=None, help="RESULTS.md to update (its Contrastive loss section)")
    args = p.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",")]
    impls = args.impls.split(",")
    if args.device != "cuda" and "triton" in impls:
        impls.remove("triton")  # the CPU would run it in the Triton interpreter: not a benchmark
    if "open_clip" in impls:
        try:
            import open_clip.loss  # noqa: F401
        except ImportError:
            impls.remove("open_clip")
    limit = args.max_mem_gib or 0.8 * mem_available_gib()
    rows = []
    for n in sizes:
        res = {}
        for impl in impls:
            if impl not in ("fused", "triton") and naive_bytes(n) > limit * 2**30:
                res[impl] = {"skipped": f"needs ~{naive_bytes(n) / 2**30:.0f} GiB > {limit:.0f} GiB"}
            else:
                res[impl] = run_one(impl, n, args.dim, args.device, args.repeats, args.timeout)
            print(n, impl, res[impl], flush=True)
        rows.append((n, res))

    def cell(r, key, fmt):
        return fmt.format(r[key]) if key in r else "skip"

    lines = [SECTION, "",
             f"- machine: {machine(args.device)}",
             f"- command: `python bench/bench_loss.py {' '.join(argv if argv is not None else sys.argv[1:])}`",
             f"- date: {datetime.datetime.now().isoformat(timespec='minutes')}",
             f"- commit: {commit()}",
             f"- fwd+bwd of the symmetric InfoNCE loss, D={args.dim}, fp32, scale 100, device {args.device};"
             " time = best of --repeats; memory = peak over the process's footprint before the call"
             " (includes the N x D gradients: 2 x N x D x 4 bytes)", "",
             "| N | fused s | fused MiB | reference s | reference MiB | open_clip s | open_clip MiB | ref/fused time | open_clip/fused time |",
             "|---|---|---|---|---|---|---|---|---|"]
    has_triton = "triton" in impls
    if has_triton:  # extra columns only where the Triton backend was measured (CUDA)
        lines[-2] = lines[-2][:-1] + " triton s | triton MiB | open_clip/triton time |"
        lines[-1] = lines[-1] + "---|---|---|"
    for n, res in rows:
        f, r, o = res.get("fused", {}), res.get("reference", {}), res.get("open_clip", {})
        ratio = lambda x, y=f: f"{x['time_s'] / y['time_s']:.2f}x" if "time_s" in x and "time_s" in y else "-"  # noqa: E731
        line = (f"| {n} | {cell(f, 'time_s', '{:.2f}')} | {cell(f, 'peak_mib', '{:.0f}')} | "
                f"{cell(r, 'time_s', '{:.2f}')} | {cell(r, 'peak_mib', '{:.0f}')} | "
                f"{cell(o, 'time_s', '{:.2f}')} | {cell(o, 'peak_mib', '{:.0f}')} | {ratio(r)} | {ratio(o)} |")
        if has_triton:
            t = res.get("triton", {})
            line += f" {cell(t, 'time_s', '{:.2f}')} | {cell(t, 'peak_mib', '{:.0f}')} | {ratio(o, t)} |"
        lines.append(line)
    skips = [f"{n} {k}: {v['skipped']}" for n, res in rows for k, v in res.items() if "skipped" in v]
    if skips:
        lines += ["", "Skipped: " + "; ".join(skips) + "."]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.write:
        write_section(Path(args.write), text)


if __name__ == "__main__":
    main()
