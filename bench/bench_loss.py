"""Benchmark of the contrastive losses: time and peak memory of forward+backward, after a check
that every implementation computes the right thing.

``--loss clip`` (default) times the symmetric InfoNCE loss (CLIP), ``--loss siglip`` the sigmoid
loss of SigLIP (Zhai et al. 2023); the rest of this text describes clip, siglip differs as said
at its end.

Compares, in one run and on the same inputs (N x D features in --dtype, L2-normalized, scale 100):
  fused      msclip_fast.ops.contrastive_loss(backend="cpu" or "cuda"): the _C extension
  triton     msclip_fast.ops.contrastive_loss(backend="triton"): kernels/contrastive.py (CUDA
             only: with --device cpu it would run in the Triton interpreter, which is a
             correctness tool, not something to time)
  reference  msclip_fast.ops.contrastive_loss_ref (plain PyTorch, materializes the N x N logits)
  open_clip  open_clip.loss.ClipLoss (when installed; its loss.py is loaded from its file, so the
             open_clip package's heavy import (torchvision, timm, ...) is not paid per process)
  LABEL=MODULE:FUNCTION   any importable ``fn(img, txt, scale) -> loss`` (another peer, or a test's
             fake implementation)

Correctness first: each implementation runs forward+backward at N = --check-n (512) and its
loss and its img/txt/scale gradients are compared with the float64 reference on the same
(rounded) inputs; relative error ||out - ref|| / ||ref|| must stay within DESIGN §7's bound for
the dtype (fp32 1e-4, fp16 2e-3, bf16 1.6e-2). An implementation that fails the check is not
timed.

Each (implementation, N) runs in a fresh subprocess so its peak memory is its own: peak RSS over
the process's RSS just before the call (CPU; Linux VmHWM reset through /proc/self/clear_refs), or
torch.cuda.max_memory_allocated over the inputs (CUDA). Sizes whose naive N x N buffers would not
fit in --max-mem-gib are not run for the materializing implementations.

Outcome of every (implementation, N): "ok" (measured), "not_run" (cannot run on this machine:
extension not built, open_clip not installed, triton on the CPU, N x N logits do not fit) or
"failed" (raised, crashed, timed out, or disagreed with the reference). The script writes
what it measured (--json, and the table on stdout) and then exits 1 when anything failed,
naming each failing implementation and its error; 0 otherwise.

    python bench/bench_loss.py --sizes 4096,8192,16384 --json bench/results/loss-cpu-fp32.json
    python bench/bench_loss.py --device cuda --dtype bf16 --sizes 8192,32768 --timeout 60 --json out.json
    python bench/bench_loss.py --device cpu --sizes 256,512 --timeout 60 --json /tmp/loss.json   # dry run

--loss siglip: the same implementation names, for ``ops.sigmoid_loss`` (fused: backend "cpu" or
"cuda"; triton: backend "triton"), ``ops.sigmoid_loss_ref`` and open_clip's SigLipLoss;
LABEL=MODULE:FUNCTION is ``fn(img, txt, scale, bias) -> loss``. Scale 10 and bias -10 (SigLIP's
initialization); the check also compares the bias gradient. The JSON's ``benchmark`` is
"siglip", its headline keys start with ``siglip_``, and every row carries ``beyond_grads_mib``:
the peak less the image/text gradients (2 x N x D elements), i.e. what the loss itself holds.

    python bench/bench_loss.py --loss siglip --sizes 4096,8192,16384,32768 --json bench/results/siglip-cpu-fp32.json

``python -m bench.report`` turns the JSON into bench/RESULTS.md (schema: bench/report.py).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import time
from pathlib import Path

if str(Path(__file__).resolve().parent) not in sys.path:  # find bench/_common.py also when loaded by path
    sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402

ROOT = _common.ROOT
BUILTIN = ("fused", "triton", "reference", "open_clip")
OURS = ("fused", "triton")  # fused implementations; the others are peers
PEERS = ("open_clip", "reference")
DTYPES = ("fp32", "bf16", "fp16")
TOLERANCE = {"fp32": 1e-4, "fp16": 2e-3, "bf16": 1.6e-2}  # DESIGN §7, matmul-based ops
SCALE = 100.0
BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}


@dataclasses.dataclass(frozen=True)
class Loss:
    """What ``--loss`` changes: the JSON's benchmark name and headline prefix, and the logits'
    scale and bias (the child's arguments)."""
    benchmark: str
    scale: float
    bias: float | None


LOSSES = {
    "clip": Loss("loss", SCALE, None),
    # SigLIP's initialization (Zhai et al. 2023, section 3.3): scale exp(log 10), bias -10
    "siglip": Loss("siglip", 10.0, -10.0),
}

# One (implementation, N) in a fresh process. argv: spec n d device dtype repeats check_n loss
# scale [bias]
# (check_n 0: no check; n 0: no timing). Prints one JSON line: {"time_s", "peak_mib"} and/or
# {"check": {...}}. Timing runs first (so the check does not raise the memory baseline), the
# check after it; the parent asks for the check before timing any larger size.
_CHILD = r"""
import importlib, importlib.util, json, sys, time
import torch
import torch.nn.functional as F
spec, n, d, device, dtype_name, repeats, check_n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5], int(sys.argv[6]), int(sys.argv[7])
loss_name, params = sys.argv[8], tuple(float(x) for x in sys.argv[9:])
dtype = {'fp32': torch.float32, 'bf16': torch.bfloat16, 'fp16': torch.float16}[dtype_name]
from msclip_fast import ops

def status(key):
    for line in open('/proc/self/status'):
        if line.startswith(key):
            return int(line.split()[1]) * 1024

def load_open_clip_loss():
    # open_clip/loss.py imports only torch; importing it through the package would import
    # torchvision, timm, ... (~4 s per process)
    try:
        path = importlib.util.find_spec('open_clip').submodule_search_locations[0] + '/loss.py'
        s = importlib.util.spec_from_file_location('_open_clip_loss', path)
        mod = importlib.util.module_from_spec(s); s.loader.exec_module(mod)
        return mod
    except Exception:
        return importlib.import_module('open_clip.loss')

backend = 'cuda' if device == 'cuda' else 'cpu'
if loss_name == 'siglip':
    ref_fn, names = ops.sigmoid_loss_ref, ('loss', 'grad_img', 'grad_txt', 'grad_scale', 'grad_bias')
    if spec == 'fused':
        fn = lambda a, b, s, t: ops.sigmoid_loss(a, b, s, t, backend=backend)
    elif spec == 'triton':
        fn = lambda a, b, s, t: ops.sigmoid_loss(a, b, s, t, backend='triton')
    elif spec == 'reference':
        fn = ops.sigmoid_loss_ref
    elif spec == 'open_clip':
        loss_mod = load_open_clip_loss().SigLipLoss()
        fn = lambda a, b, s, t: loss_mod(a, b, s, t)
else:
    ref_fn, names = ops.contrastive_loss_ref, ('loss', 'grad_img', 'grad_txt', 'grad_scale')
    if spec == 'fused':
        fn = lambda a, b, s: ops.contrastive_loss(a, b, s, backend=backend)
    elif spec == 'triton':
        fn = lambda a, b, s: ops.contrastive_loss(a, b, s, backend='triton')
    elif spec == 'reference':
        fn = ops.contrastive_loss_ref
    elif spec == 'open_clip':
        loss_mod = load_open_clip_loss().ClipLoss()
        fn = lambda a, b, s: loss_mod(a, b, s)
if spec not in ('fused', 'triton', 'reference', 'open_clip'):
    module, _, attr = spec.partition(':')
    fn = getattr(importlib.import_module(module), attr)

def features(n, seed):
    g = torch.Generator().manual_seed(seed)
    img = F.normalize(torch.randn(n, d, generator=g), dim=-1).to(dtype)
    txt = F.normalize(torch.randn(n, d, generator=g), dim=-1).to(dtype)
    return img, txt

def scalars(device, dt=torch.float32):
    return [torch.tensor(v, device=device, dtype=dt) for v in params]

def step(a, b, ps, f=None):
    a = a.detach().requires_grad_(); b = b.detach().requires_grad_(); ps = [p.detach().requires_grad_() for p in ps]
    loss = (f or fn)(a, b, *ps)
    loss.backward()
    return (loss.detach(), a.grad, b.grad, *(p.grad for p in ps))

sync = torch.cuda.synchronize if device == 'cuda' else (lambda: None)
out = {}
if n > 0:
    img, txt = (t.to(device) for t in features(n, 0))
    ps = scalars(device)
    # warm-up: BLAS/OpenMP/CUDA context; on CUDA at the full size (kernel compiles, allocator)
    step(img, txt, ps) if device == 'cuda' else step(img[:256], txt[:256], ps)
    times = []
    for r in range(repeats):
        if device == 'cuda':
            torch.cuda.synchronize(); torch.cuda.reset_peak_memory_stats(); base = torch.cuda.memory_allocated()
        else:
            base = status('VmRSS:'); open('/proc/self/clear_refs', 'w').write('5')
        sync(); t = time.perf_counter()
        res = step(img, txt, ps)
        sync(); times.append(time.perf_counter() - t)
        peak = (torch.cuda.max_memory_allocated() if device == 'cuda' else status('VmHWM:')) - base
        del res
    out.update(time_s=min(times), peak_mib=peak / 2**20)
    del img, txt
if check_n > 0:
    img, txt = features(check_n, 1)  # rounded to dtype; the float64 reference sees the same values
    ps = scalars('cpu')
    ref = step(img.double(), txt.double(), [p.double() for p in ps], ref_fn)  # float64
    got = step(img.to(device), txt.to(device), [p.to(device) for p in ps])
    def rel(x, r):
        if x is None:
            return float('inf')
        x = x.detach().double().cpu().reshape(r.shape)
        den = r.norm().item()
        err = (x - r).norm().item()
        return err / den if den > 0 else err
    errs = {k: rel(x, r) for k, x, r in zip(names, got, ref)}
    out['check'] = {'n': check_n, 'loss': got[0].double().item(), 'ref_loss': ref[0].item(),
                    **{k + '_rel_err': v for k, v in errs.items()}}
print(json.dumps(out))
"""


def parse_impls(text: str) -> list[tuple[str, str]]:
    """``fused,reference,bad=pkg.mod:fn`` -> [(label, spec)]: builtin names, or ``LABEL=MODULE:FN``
    / ``MODULE:FN`` (label FN) for an importable ``fn(img, txt, scale) -> loss`` (siglip:
    ``fn(img, txt, scale, bias)``)."""
    out = []
    for item in (s.strip() for s in text.split(",")):
        if not item:
            continue
        label, _, spec = item.rpartition("=") if "=" in item else ("", "", item)
        if spec in BUILTIN:
            label = label or spec
        elif ":" in spec and all(spec.partition(":")[::2]):
            label = label or spec.partition(":")[2]
        else:
            raise ValueError(f"--impls: {item!r} is neither one of {BUILTIN} nor LABEL=MODULE:FUNCTION")
        if label in (lab for lab, _ in out):
            raise ValueError(f"--impls: label {label!r} given twice")
        out.append((label, spec))
    if not out:
        raise ValueError("--impls is empty")
    return out


def unavailable(spec: str, device: str, loss: str = "clip") -> str | None:
    """Why builtin implementation ``spec`` cannot run on this machine (None: it can)."""
    if loss == "siglip":
        return _siglip_unavailable(spec, device)
    if spec == "fused":
        from msclip_fast.ops import contrastive_fused as cf

        reasons = cf.cuda_available() if device == "cuda" else cf.cpu_available()
        return "; ".join(reasons) or None
    if spec == "triton":
        if device != "cuda":
            return "Triton runs CPU tensors only in its interpreter (a correctness tool, not timed)"
        from msclip_fast.ops._triton import triton_available

        return "; ".join(triton_available()) or None
    if spec == "open_clip" and not _common.installed("open_clip"):
        return "open_clip is not installed"
    return None


def _siglip_unavailable(spec: str, device: str) -> str | None:
    if spec in ("fused", "triton"):
        if spec == "triton" and device != "cuda":
            return "Triton runs CPU tensors only in its interpreter (a correctness tool, not timed)"
        from msclip_fast import ops

        name = {"fused": "cuda" if device == "cuda" else "cpu", "triton": "triton"}[spec]
        status = ops.sigmoid_loss.op.status()
        if name not in status:  # a backend still being written is "not run", not a failure of the run
            return f"sigmoid_loss has no {name!r} backend registered (backends: {', '.join(status)})"
        return "; ".join(status[name]) or None
    if spec == "open_clip" and not _common.installed("open_clip"):
        return "open_clip is not installed"
    return None


def child_env() -> dict:
    """Environment of the child processes: OpenMP threads sleep when idle unless the caller
    says otherwise (spinning threads on shared cores slow a CPU run by an order of magnitude)."""
    return {"OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "passive")}


def run_child(spec, n, d, device, dtype, repeats, check_n, timeout, loss: str = "clip") -> dict:
    """Run one child; returns its JSON, or {"error": ...} (raised, crashed, timed out)."""
    env = dict(os.environ, **child_env())
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    params = [LOSSES[loss].scale] + ([] if LOSSES[loss].bias is None else [LOSSES[loss].bias])
    cmd = [sys.executable, "-c", _CHILD, spec, str(n), str(d), device, dtype, str(repeats), str(check_n), loss,
           *map(repr, params)]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout} s (--timeout)"}
    if out.returncode != 0:
        lines = out.stderr.strip().splitlines() or [f"exit status {out.returncode}, no output"]
        err = lines[-1][:300]
        if out.returncode < 0:
            err = f"killed by signal {-out.returncode}; " + err
        return {"error": err, "stderr_tail": "\n".join(lines[-15:])[-3000:]}
    try:
        return json.loads(out.stdout.strip().splitlines()[-1])
    except (IndexError, json.JSONDecodeError):
        return {"error": f"no result line in the child's output: {out.stdout[-200:]!r}"}


# N x N fp32 buffers at the peak of forward+backward of the siglip peers. Measured with this
# script (CPU, fp32, D=512, peak RSS over the inputs / 4 N^2): open_clip's SigLipLoss 5.2 at
# N=4096 and 5.1 at 8192: its forward holds the logits, the +-1 labels, their product and
# logsigmoid's output and CPU buffer at once (building the labels from ones + 2 * eye peaks at 4);
# the backward, with the logits freed, never holds more. The reference 6.0 at both: it also keeps
# the unscaled logits that the scale's gradient needs. Rounded up (a margin for the allocator and
# the N x D terms), so a size that runs fits. Small N reads higher (8.4 at N=2048, where glibc
# serves 16 MiB buffers from its heap rather than mmap), but no small N comes near the limit.
SIGLIP_NAIVE_BUFFERS = {"open_clip": 6, "reference": 7}


def naive_bytes(n: int, loss: str = "clip", spec: str = "reference") -> int:
    if loss == "siglip":
        return SIGLIP_NAIVE_BUFFERS.get(spec, max(SIGLIP_NAIVE_BUFFERS.values())) * 4 * n * n
    # logits, two softmax outputs / their gradients: about four N x N fp32 buffers at the peak
    return 4 * 4 * n * n


def memory_limit_gib(device: str) -> float:
    """80% of the memory the materializing implementations may use: free GPU memory (CUDA) or
    MemAvailable (CPU)."""
    if device == "cuda":
        import torch

        free, _total = torch.cuda.mem_get_info()
        return 0.8 * free / 2**30
    try:
        for line in open("/proc/meminfo"):
            if line.startswith("MemAvailable:"):
                return 0.8 * int(line.split()[1]) / 2**20
    except OSError:
        pass
    return 8.0


def check_result(label: str, dtype: str, res: dict) -> dict:
    """The check row of one implementation from its child's output."""
    tol = TOLERANCE[dtype]
    if "error" in res:
        return {"impl": label, "status": "failed", "tol": tol, "reason": res["error"],
                "stderr_tail": res.get("stderr_tail")}
    c = res["check"]
    errs = {k: c[k] for k in ("loss_rel_err", "grad_img_rel_err", "grad_txt_rel_err", "grad_scale_rel_err")}
    if "grad_bias_rel_err" in c:  # siglip
        errs["grad_bias_rel_err"] = c["grad_bias_rel_err"]
    worst = max(v if v == v else float("inf") for v in errs.values())  # NaN counts as the worst
    row = {"impl": label, "n": c["n"], "tol": tol, **{k: _common.finite(v) for k, v in errs.items()},
           "max_rel_err": _common.finite(worst), "loss": _common.finite(c["loss"]),
           "ref_loss": _common.finite(c["ref_loss"])}
    bad = [f"{k.replace('_rel_err', '')} {v:.2e}" for k, v in errs.items() if not v <= tol]
    if bad:
        row.update(status="failed", reason=f"disagrees with the float64 reference at N={c['n']}: "
                   f"relative error {', '.join(bad)} > {tol:g} ({dtype})")
    else:
        row["status"] = "ok"
    return row


def headline(rows: list[dict], checks: list[dict], loss: str = "clip") -> dict:
    """Ratios at the largest N where both sides were measured: ``loss_<ours>_vs_<peer>_time_N<n>``
    = peer time / ours, ``..._mem_N<n>`` = peer peak MiB / ours (> 1: ours better); plus
    ``loss_<impl>_max_rel_err`` from the check. siglip: the prefix is ``siglip_``, and it adds
    ``siglip_<ours>_vs_<peer>_time_min`` (the smallest time ratio over every N both ran: the goal
    is faster at every N) and ``siglip_<ours>_beyond_grads_mib_N<n>`` at ours' largest N."""
    prefix = LOSSES[loss].benchmark
    ok = {(r["impl"], r["n"]): r for r in rows if r["status"] == "ok"}
    out = {}
    for ours in OURS:
        for peer in PEERS:
            common = sorted(n for (i, n) in ok if i == ours and (peer, n) in ok)
            if not common:
                continue
            n = common[-1]
            a, b = ok[(ours, n)], ok[(peer, n)]
            out[f"{prefix}_{ours}_vs_{peer}_time_N{n}"] = round(b["time_s"] / a["time_s"], 3)
            if a["peak_mib"] and a["peak_mib"] > 0 and b["peak_mib"] is not None:
                out[f"{prefix}_{ours}_vs_{peer}_mem_N{n}"] = round(b["peak_mib"] / a["peak_mib"], 2)
            if loss == "siglip":
                out[f"{prefix}_{ours}_vs_{peer}_time_min"] = round(
                    min(ok[(peer, m)]["time_s"] / ok[(ours, m)]["time_s"] for m in common), 3)
    if loss == "siglip":
        for ours in OURS:
            mine = sorted(n for (i, n) in ok if i == ours and ok[(i, n)].get("beyond_grads_mib") is not None)
            if mine:
                n = mine[-1]
                out[f"{prefix}_{ours}_beyond_grads_mib_N{n}"] = round(ok[(ours, n)]["beyond_grads_mib"], 1)
    for c in checks:
        if c.get("max_rel_err") is not None:
            out[f"{prefix}_{c['impl']}_max_rel_err"] = float(f"{c['max_rel_err']:.3g}")
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--loss", default="clip", choices=sorted(LOSSES),
                   help="clip: symmetric InfoNCE (default); siglip: SigLIP's sigmoid loss")
    p.add_argument("--sizes", default="4096,8192,16384,32768,65536", help="comma-separated N")
    p.add_argument("--dim", type=int, default=512, help="feature width D (default: 512)")
    p.add_argument("--device", default=None, choices=["cpu", "cuda"], help="default: cuda when available")
    p.add_argument("--dtype", default="fp32", choices=DTYPES, help="feature dtype (default: fp32)")
    p.add_argument("--impls", default=",".join(BUILTIN),
                   help=f"comma-separated: {', '.join(BUILTIN)} or LABEL=MODULE:FUNCTION")
    p.add_argument("--repeats", type=int, default=1, help="timed calls per (impl, N); best is kept")
    p.add_argument("--check-n", type=int, default=512, help="N of the correctness check (0: no check)")
    p.add_argument("--max-mem-gib", type=float, default=None,
                   help="do not run materializing implementations whose N x N buffers exceed this "
                        "(default: 80%% of free memory)")
    p.add_argument("--timeout", type=int, default=900, help="seconds per (implementation, N) process")
    p.add_argument("--json", type=Path, default=None, help="write the results here (schema: bench/report.py)")
    return p


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; returns the exit status (1 when an implementation failed)."""
    p = build_parser()
    args = p.parse_args(argv)
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda but CUDA is unavailable")
    try:
        sizes = sorted({int(s) for s in args.sizes.split(",") if s.strip()})
        impls = parse_impls(args.impls)
    except ValueError as e:
        p.error(str(e))
    if not sizes or min(sizes) < 1 or args.dim < 1 or args.repeats < 1 or args.check_n < 0:
        p.error("--sizes, --dim and --repeats must be positive and --check-n >= 0")
    meta = _common.run_meta(device, "bench/bench_loss.py", sys.argv[1:] if argv is None else argv)
    limit = args.max_mem_gib if args.max_mem_gib is not None else memory_limit_gib(device)
    t_start = time.perf_counter()
    loss = LOSSES[args.loss]

    rows, checks, not_run, failures = [], [], {}, []

    def record(label, n, status, res=None, reason=None):
        res = res or {}
        row = {"impl": label, "n": n, "status": status, "time_s": _common.finite(res.get("time_s")),
               "peak_mib": _common.finite(res.get("peak_mib")), "reason": reason}
        if res.get("stderr_tail"):
            row["stderr_tail"] = res["stderr_tail"]
        rows.append(row)
        if status == "failed":
            failures.append(f"{label} N={n}: {reason}")
        print(f"N={n} {label}: {status}" + (f" {row['time_s']:.4g} s {row['peak_mib']:.1f} MiB" if status == "ok" else
                                             f" ({reason})"), flush=True)

    for label, spec in impls:
        why = unavailable(spec, device, args.loss) if spec in BUILTIN else None
        if why:
            not_run[label] = why
            for n in sizes:
                record(label, n, "not_run", reason=why)
            checks.append({"impl": label, "status": "not_run", "tol": TOLERANCE[args.dtype], "reason": why})
            print(f"{label}: not run: {why}", flush=True)
            continue
        materializes = spec not in OURS
        pending = list(sizes)
        if args.check_n:
            timed_n = args.check_n if args.check_n in pending else 0
            if materializes and naive_bytes(args.check_n, args.loss, spec) > limit * 2**30:
                timed_n = 0
            res = run_child(spec, timed_n, args.dim, device, args.dtype, args.repeats, args.check_n, args.timeout,
                            args.loss)
            chk = check_result(label, args.dtype, res)
            checks.append(chk)
            print(f"{label}: check at N={args.check_n}: {chk['status']}"
                  + (f" (max relative error {chk['max_rel_err']:.2e} <= {chk['tol']:g})" if chk["status"] == "ok"
                     else f" ({chk['reason']})"), flush=True)
            if chk["status"] != "ok":
                failures.append(f"{label} check: {chk['reason']}")
                for n in pending:
                    rows.append({"impl": label, "n": n, "status": "not_run", "time_s": None, "peak_mib": None,
                                 "reason": "not timed: failed the correctness check"})
                continue
            if timed_n:
                record(label, timed_n, "ok", res)
                pending.remove(timed_n)
        failed_at = None
        for n in pending:
            if failed_at is not None:
                rows.append({"impl": label, "n": n, "status": "not_run", "time_s": None, "peak_mib": None,
                             "reason": f"not attempted: failed at N={failed_at}"})
                continue
            need = naive_bytes(n, args.loss, spec)
            if materializes and need > limit * 2**30:
                record(label, n, "not_run",
                       reason=f"N x N buffers need ~{need / 2**30:.1f} GiB > {limit:.1f} GiB allowed")
                continue
            res = run_child(spec, n, args.dim, device, args.dtype, args.repeats, 0, args.timeout, args.loss)
            if "error" in res:
                record(label, n, "failed", res, reason=res["error"])
                failed_at = n
            else:
                record(label, n, "ok", res)
    order = {lab: i for i, (lab, _) in enumerate(impls)}
    rows.sort(key=lambda r: (r["n"], order[r["impl"]]))
    if args.loss == "siglip":
        for r in rows:  # the gradients are outputs every implementation must hold; the 64 MiB goal is the rest
            grads_mib = 2 * r["n"] * args.dim * BYTES[args.dtype] / 2**20
            r["beyond_grads_mib"] = None if r["peak_mib"] is None else round(r["peak_mib"] - grads_mib, 2)
    settings = {"sizes": sizes, "dim": args.dim, "dtype": args.dtype, "scale": loss.scale}
    if args.loss != "clip":
        settings = {"loss": args.loss, **settings, "bias": loss.bias}
    settings.update({"repeats": args.repeats,
                     "check_n": args.check_n, "timeout_s": args.timeout, "max_mem_gib": round(limit, 2),
                     "impls": [lab for lab, _ in impls], "specs": {lab: spec for lab, spec in impls},
                     "peer_versions": {"open_clip": _common._version("open_clip_torch")}, "child_env": child_env(),
                     "total_s": round(time.perf_counter() - t_start, 1)})
    if args.loss == "siglip":
        settings["naive_buffers"] = SIGLIP_NAIVE_BUFFERS
    doc = _common.payload(loss.benchmark, meta, settings, rows, headline(rows, checks, args.loss), checks=checks,
                          not_run=not_run, status="failed" if failures else "ok", failures=failures)
    if args.json:
        _common.write_json(args.json, doc)
    import report

    print()
    print(report.render_doc(doc, source=str(args.json) if args.json else None, chart=None))
    if failures:
        print("bench_loss: FAILED: " + "; ".join(failures), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
