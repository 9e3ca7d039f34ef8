"""Exact accumulation and activation checkpointing: the largest contrastive batch that trains one
step in a fixed memory budget, and what they cost in step time (issue 9).

One optimizer step = :class:`~msclip_fast.training.engine.TorchEngine` +
``train_step(engine, micro_batches, mode, step)`` (msclip_fast/training/step.py), AdamW over the
model's parameter groups, every op on the ``auto`` backend (what ``train.py`` runs; on the CPU the
loss is the C++ extension, O(N) memory). Inputs: random normalized pixels and captions with
realistic lengths (``--text``: a seeded sample of the openclipart training captions, the CLIP
tokenizer, as bench_trim.py; or ``lengths``: random token ids with the ``eot + 1`` lengths of
those same 8,116 captions, whose histogram is embedded below, for machines without openclipart
or open_clip, e.g. the GPU machine); ``text_lengths`` from the CPU tokens.

Configurations, for a contrastive batch of N pairs (one loss over all N):

    plain       K = 1 micro-batch of B = N
    plain_ckpt  the same with ``model.set_grad_checkpointing(True)``
    exact       exact accumulation (GradCache): K = N / B micro-batches of a fixed B (--micro-batch)
    exact_ckpt  the same with checkpointing

(a) Memory. For each configuration the largest N whose step fits ``--budget-mib``: N doubles from
    ``--start-batch`` (exact: 2B) until a step does not fit (or ``--max-batch``, or the time
    limit), then ``--bisect-steps`` bisection trials between the last fit and the first miss, on
    the grid of B. Each trial warms up with a 2-sample step (AdamW state, code pages, allocator),
    then measures one step at N. CPU: every trial runs in a process of its
    own (forked from a server process that imported torch once: a fresh address space without
    ~8 s of ``import torch`` per trial); its peak = the process's peak RSS during the step (VmHWM
    after resetting it through /proc/self/clear_refs just before the step; the process's lifetime
    ru_maxrss is reported too), its "own" memory = that peak minus the RSS just before the step.
    The budget applies to the peak (what a memory limit sees). Without ``--budget-mib`` the budget
    is the peak of the plain step at ``--calibrate-batch`` (so plain fits that N by construction;
    that calibration trial is plain's trial at that N). GPU (``--device cuda``): trials run in one
    process on one model; peak = ``torch.cuda.max_memory_allocated`` during the step, own =
    peak - ``memory_allocated`` before it; budget ``--budget-mib`` (default 40 GiB); a CUDA OOM
    counts as "does not fit". Where a configuration still fits at the cap or the time limit, the
    table says ">=", and a linear fit of its last two measured peaks gives an *extrapolated*
    largest N (labelled as such: not a measurement).
(b) Time, at N = ``--time-batch`` (K = N / B): exact vs independent accumulation (the same K x B
    micro-batches; goal exact / independent <= 1.4), checkpointing vs not (plain and exact), and
    exact vs plain (one batch of N), in one process on one model (same weights), the variants
    alternating round by round (each round in a rotated order); median and IQR of single steps.
    CPU: one extra step per variant under ``FlopCounterMode`` counts its forward + backward FLOPs
    (recomputation included; not the optimizer), so the counted FLOP ratios stand beside the time
    ratios.

Expectation (stated, not measured): exact = independent + one more forward of K - 1 of the K
micro-batches (step.py: micro-batch 0 keeps its first-pass graph), so with backward ~ 2 x forward
the ratio is 1 + (K - 1) / (3K): 1.25 at K = 4, -> 4/3 ~ 1.33 for large K; the optimizer step and
the loss, the same in both, pull it lower. Checkpointing recomputes every transformer block's
forward during backward: at most ~1.33 as well (stems, adapters, pooling keep their activations).

Usage::

    python bench/bench_accum.py --json bench/results/accum-cpu.json            # CPU, msclip-s-tiny
    python bench/bench_accum.py --smoke --json /tmp/accum.json                   # < 30 s check
    python bench/bench_accum.py --device cuda --time-limit 70 --json OUT/bench_accum.json  # gpu_check.sh

The tables are printed; ``--json`` writes the results, which ``python -m bench.report`` turns into
bench/RESULTS.md (schema: bench/report.py).
"""
from __future__ import annotations

import argparse
import gc
import math
import os
import statistics
import sys
import time
from pathlib import Path

# On a shared CPU, OpenMP threads that spin at barriers make a step 5-20x slower whenever another
# process holds a core; passive waiting avoids that (before torch is imported; trial processes
# inherit it). run_meta records it in front of the command.
os.environ.setdefault("OMP_WAIT_POLICY", "passive")

import torch  # noqa: E402

if str(Path(__file__).resolve().parent) not in sys.path:  # find bench/_common.py also when loaded by path
    sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402

CONFIGS = {  # name -> (accumulation mode, micro-batches of --micro-batch (else one of N), checkpointing)
    "plain": ("independent", False, False),
    "plain_ckpt": ("independent", False, True),
    "exact": ("exact", True, False),
    "exact_ckpt": ("exact", True, True),
}
# timed variants: name -> (mode, K x B micro-batches (else one of N), checkpointing)
VARIANTS = {
    "independent": ("independent", True, False),
    "exact": ("exact", True, False),
    "exact_ckpt": ("exact", True, True),
    "plain": ("independent", False, False),
    "plain_ckpt": ("independent", False, True),
}
# eot + 1 of the 8,116 openclipart training captions (make_shards captions, CLIP tokenizer,
# context 77; bench_trim.openclipart_captions): length -> count. Mean 16.9, median 19, p90 24.
OPENCLIPART_LENGTHS = {
    3: 25, 4: 32, 5: 167, 6: 178, 7: 410, 8: 293, 9: 389, 10: 288, 11: 435, 12: 228, 13: 251, 14: 297,
    15: 213, 16: 189, 17: 236, 18: 209, 19: 1789, 20: 603, 21: 539, 22: 184, 23: 187, 24: 341, 25: 187,
    26: 119, 27: 37, 28: 23, 29: 16, 30: 25, 31: 11, 32: 13, 33: 30, 34: 20, 35: 11, 36: 9, 37: 10,
    38: 6, 39: 1, 40: 2, 41: 34, 42: 12, 43: 1, 44: 1, 45: 4, 46: 3, 47: 1, 51: 1, 52: 1, 53: 1, 54: 1,
    55: 4, 59: 1, 62: 3, 68: 1, 72: 34, 73: 6, 77: 4,
}
def expectation(k: int) -> str:
    """The FLOP-free expectation of the time ratios at K micro-batches (a statement, not a measurement)."""
    return (f"exact = independent + one more forward of K - 1 of the K micro-batches (micro-batch 0 keeps its "
            f"first-pass graph): with backward ~ 2x forward, 1 + (K - 1) / (3K) = {1 + (k - 1) / (3 * k):.2f} at "
            f"K = {k} (-> 4/3 ~ 1.33 for large K; the optimizer step and the loss, the same in both, lower it); "
            "checkpointing recomputes each transformer block's forward in backward: at most ~1.33 too. "
            "A FLOP-free expectation, not a measurement.")
MIB = 2 ** 20


# ----------------------------------------------------------------------------- inputs


class TextPool:
    """Caption tokens ``(M, L)`` int64 to sample batches from, with their ``eot + 1`` lengths."""

    def __init__(self, tokens: torch.Tensor, source: str):
        from msclip_fast.modules import text_lengths

        self.tokens, self.source = tokens, source
        self.lengths = text_lengths(tokens)
        x = self.lengths.double()
        self.stats = {"n": int(x.numel()), "mean": round(float(x.mean()), 2), "median": float(x.median()),
                      "p90": float(torch.quantile(x, 0.9)), "max": int(x.max())}

    @classmethod
    def from_lengths(cls, context_length: int, seed: int = 0) -> "TextPool":
        """One row per openclipart caption length (:data:`OPENCLIPART_LENGTHS`): SOT, random ids,
        EOT at ``length - 1``, zero padding (the model's cost depends on the lengths, not the ids)."""
        g = torch.Generator().manual_seed(seed)
        lengths = [min(n, context_length) for n, c in sorted(OPENCLIPART_LENGTHS.items()) for _ in range(c)]
        tokens = torch.zeros(len(lengths), context_length, dtype=torch.int64)
        for i, n in enumerate(lengths):
            tokens[i, 0] = _common.SOT
            tokens[i, 1:n - 1] = torch.randint(1, _common.SOT, (n - 2,), generator=g)
            tokens[i, n - 1] = _common.EOT
        return cls(tokens, "openclipart caption lengths (embedded histogram), random token ids")

    @classmethod
    def from_captions(cls, captions: list[str], context_length: int, source: str) -> "TextPool":
        import msclip_fast as mf

        return cls(mf.get_tokenizer(context_length)(captions), source)

    def sample(self, n: int, seed: int) -> torch.Tensor:
        """``n`` rows: a seeded sample without replacement (with replacement past the pool's size)."""
        g = torch.Generator().manual_seed(seed)
        m = self.tokens.shape[0]
        idx = torch.randperm(m, generator=g)[:n] if n <= m else torch.randint(0, m, (n,), generator=g)
        return self.tokens[idx].clone()


def make_text_pool(args, context_length: int) -> TextPool:
    """The caption pool ``--text`` / ``--captions`` ask for."""
    if args.captions is not None:
        import bench_trim

        return TextPool.from_captions(bench_trim.read_captions(args.captions), context_length,
                                      f"file {args.captions.name}, CLIP tokenizer")
    text = args.text
    if text == "auto":
        text = "openclipart" if _openclipart_ready() else "lengths"
    if text == "openclipart":
        import bench_trim

        return TextPool.from_captions(bench_trim.openclipart_captions(), context_length,
                                      "openclipart training captions (make_shards), CLIP tokenizer")
    return TextPool.from_lengths(context_length)


def _openclipart_ready() -> bool:
    """openclipart installed and the tokenizer (open_clip) importable."""
    return os.path.isdir("/usr/share/openclipart/png") and _common.installed("open_clip")


def make_micro(tokens: torch.Tensor, n: int, b: int, image_size: int, seed: int, image_pool: int | None = None):
    """``n`` samples as ``ceil(n / b)`` micro-batch dicts (image, text, text_lengths), as the loader
    gives them. Pixels: standard normal (normalized-looking), ``n`` distinct images; with
    ``image_pool`` (GPU runs, whose host memory is not what is measured) only that many distinct
    images, each micro-batch a view into them where it fits (no host copy of N images)."""
    from msclip_fast.modules import text_lengths

    g = torch.Generator().manual_seed(seed)
    lengths = text_lengths(tokens)
    if image_pool is None or image_pool >= n:
        images = torch.randn(n, 3, image_size, image_size, generator=g)
        return [{"image": images[i:i + b], "text": tokens[i:i + b], "text_lengths": lengths[i:i + b]}
                for i in range(0, n, b)]
    pool = torch.randn(image_pool, 3, image_size, image_size, generator=g)
    out = []
    for i in range(0, n, b):
        m = min(b, n - i)
        start = i % image_pool
        img = pool[start:start + m] if start + m <= image_pool else pool[(torch.arange(m) + start) % image_pool]
        out.append({"image": img, "text": tokens[i:i + m], "text_lengths": lengths[i:i + m]})
    return out


# ----------------------------------------------------------------------------- engine


def make_engine(model, device, precision: str, k: int, b: int, mode: str, ckpt: bool, optimizer=None,
                scheduler=None):
    """A TorchEngine over ``model`` for K micro-batches of B; a new AdamW (+ schedule) unless given."""
    from msclip_fast.training.config import TrainConfig
    from msclip_fast.training.engine import TorchEngine
    from msclip_fast.training.optim import create_optimizer
    from msclip_fast.training.schedule import create_scheduler

    cfg = TrainConfig(batch_size=b, accum_steps=k, accum_mode=mode, precision=precision, device_type=device.type,
                      grad_checkpointing=ckpt, warmup=1)
    if optimizer is None:
        optimizer = create_optimizer(model, cfg)
        scheduler = create_scheduler(optimizer, cfg.warmup, 10 ** 6)
    return TorchEngine(model, optimizer, scheduler, cfg, device), optimizer, scheduler


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _precision(device) -> str:
    return "bf16" if device.type == "cuda" else "fp32"


def _split(config: str, n: int, b: int) -> tuple[int, int]:
    """(K, B) of a configuration at contrastive batch n."""
    accum = CONFIGS[config][1] if config in CONFIGS else VARIANTS[config][1]
    return (n // b, b) if accum else (1, n)


# ----------------------------------------------------------------------------- CPU trials


def _proc_status(key: str) -> int | None:
    """``key`` (VmRSS, VmHWM) of /proc/self/status in bytes; None where it is not there."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _reset_hwm() -> bool:
    """Reset the process's peak RSS (VmHWM) to its current RSS (Linux >= 4.0); False if not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _malloc_trim() -> None:
    """Give freed heap memory back to the OS (glibc), so the RSS before the step is what is in use."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def cpu_trial(spec: dict) -> dict:
    """One trial in this (fresh) process: build the model, warm up with a 2-sample step, measure
    one step of ``spec["n"]`` samples. Returns the trial's row (without ``fits``)."""
    import resource

    import msclip_fast as mf
    from msclip_fast.training.step import train_step

    torch.manual_seed(spec["seed"])
    device = torch.device("cpu")
    mode, _, ckpt = CONFIGS[spec["config"]]
    k, b = spec["k"], spec["b"]
    model = mf.create_model(spec["preset"])
    model.set_grad_checkpointing(ckpt)
    model.train()
    engine, _, _ = make_engine(model, device, "fp32", k, b, mode, ckpt)
    tokens = spec["tokens"]
    train_step(engine, make_micro(tokens[:2], 2, 2, model.image_size, spec["seed"] + 1), mode, step=1)
    micro = make_micro(tokens, spec["n"], b, model.image_size, spec["seed"])
    gc.collect()
    _malloc_trim()
    before = _proc_status("VmRSS")
    reset = _reset_hwm()
    t0 = time.perf_counter()
    res = train_step(engine, micro, mode, step=2)
    dt = time.perf_counter() - t0
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    hwm = _proc_status("VmHWM") if reset else None
    peak = hwm if hwm is not None else maxrss
    return {"peak_mib": peak / MIB, "before_mib": before / MIB if before is not None else None,
            "step_mib": (peak - before) / MIB if before is not None else None, "maxrss_mib": maxrss / MIB,
            "peak_source": "VmHWM after clear_refs" if hwm is not None else "ru_maxrss (lifetime)",
            "step_s": dt, "loss": _common.finite(res.loss)}


def _child(conn, spec: dict) -> None:
    try:
        conn.send({"ok": True, **cpu_trial(spec)})
    except BaseException as e:  # noqa: BLE001 - the parent records any failure as the trial's error
        conn.send({"ok": False, "error": f"{type(e).__name__}: {e}"[:400]})
    finally:
        conn.close()


class CpuTrials:
    """Runs each trial in a process of its own, forked from a multiprocessing forkserver that
    imported torch and msclip_fast once (a fresh address space per trial)."""

    # what a trial imports (torch._dynamo: AdamW's constructor imports it, ~2 s)
    PRELOAD = ["torch", "torch._dynamo", "torch.utils.checkpoint", "msclip_fast.models", "msclip_fast.modules",
               "msclip_fast.ops", "msclip_fast.losses", "msclip_fast.training.engine", "msclip_fast.training.step",
               "msclip_fast.training.optim", "msclip_fast.training.schedule"]

    def __init__(self, timeout_s: float):
        import multiprocessing as mp

        self.ctx = mp.get_context("forkserver")
        self.ctx.set_forkserver_preload(self.PRELOAD)
        self.timeout_s = timeout_s

    def start(self, wait: bool = True) -> float:
        """Start the server (it imports the preload modules); with ``wait``, until it serves (so
        that its imports do not overlap what is timed next). Returns the seconds waited."""
        from multiprocessing import forkserver

        t0 = time.perf_counter()
        forkserver.ensure_running()
        if wait:
            p = self.ctx.Process(target=_noop)
            p.start()
            p.join()
        return time.perf_counter() - t0

    def run(self, spec: dict) -> dict:
        parent, child = self.ctx.Pipe(duplex=False)
        p = self.ctx.Process(target=_child, args=(child, spec), daemon=True)
        p.start()
        child.close()
        out = None
        try:
            if parent.poll(self.timeout_s):
                out = parent.recv()
        except EOFError:  # the process died before it sent anything
            out = None
        finally:
            parent.close()
        timed_out = out is None and p.is_alive()
        if timed_out:
            p.kill()  # our own trial process, past --trial-timeout
        p.join(30)
        if out is None:
            why = (f"timed out after {self.timeout_s:.0f} s" if timed_out else
                   f"died with exit code {p.exitcode}" + (" (killed: out of memory?)" if p.exitcode == -9 else ""))
            out = {"ok": False, "killed": p.exitcode == -9 and not timed_out, "error": f"trial process {why}"}
        return out


def _noop() -> None:
    pass


# ----------------------------------------------------------------------------- GPU trials


class CudaTrials:
    """Trials in this process on one model (b32 takes seconds to build): peak =
    ``torch.cuda.max_memory_allocated`` during the step."""

    def __init__(self, preset: str, device, seed: int):
        import msclip_fast as mf

        torch.manual_seed(seed)
        self.device = device
        self.model = mf.create_model(preset).to(device)
        self.model.train()
        self.optimizer = self.scheduler = None

    def warm(self, tokens: torch.Tensor, b: int, seed: int) -> None:
        """One step at B (AdamW state, kernels compiled)."""
        from msclip_fast.training.step import train_step

        engine, self.optimizer, self.scheduler = make_engine(self.model, self.device, "bf16", 1, b, "independent",
                                                            False)
        train_step(engine, make_micro(tokens[:b], b, b, self.model.image_size, seed), "independent", step=1)
        _sync(self.device)

    def run(self, spec: dict) -> dict:
        from msclip_fast.training.step import train_step

        mode, _, ckpt = CONFIGS[spec["config"]]
        self.model.set_grad_checkpointing(ckpt)
        engine, _, _ = make_engine(self.model, self.device, "bf16", spec["k"], spec["b"], mode, ckpt,
                                   self.optimizer, self.scheduler)
        micro = make_micro(spec["tokens"], spec["n"], spec["b"], self.model.image_size, spec["seed"],
                           image_pool=4 * spec["b"])
        gc.collect()
        torch.cuda.empty_cache()
        _sync(self.device)
        before = torch.cuda.memory_allocated(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        t0 = time.perf_counter()
        oom = None
        try:
            res = train_step(engine, micro, mode, step=2)
            _sync(self.device)
        except torch.OutOfMemoryError as e:
            oom = str(e).splitlines()[0][:200] if str(e) else "OutOfMemoryError"
        if oom is not None:  # outside the except block: its traceback no longer holds the step's tensors
            self.optimizer.zero_grad(set_to_none=True)
            del micro, engine
            gc.collect()
            torch.cuda.empty_cache()
            return {"ok": False, "oom": True, "error": f"CUDA out of memory: {oom}", "before_mib": before / MIB,
                    "step_s": time.perf_counter() - t0}
        dt = time.perf_counter() - t0
        peak = torch.cuda.max_memory_allocated(self.device)
        reserved = torch.cuda.max_memory_reserved(self.device)
        del micro
        return {"ok": True, "peak_mib": peak / MIB, "before_mib": before / MIB, "step_mib": (peak - before) / MIB,
                "reserved_mib": reserved / MIB, "peak_source": "torch.cuda.max_memory_allocated", "step_s": dt,
                "loss": _common.finite(res.loss)}


# ----------------------------------------------------------------------------- search


def search(config: str, trial, pool: TextPool, args, budget_mib: float, deadline: float,
           known: dict | None = None) -> tuple[list[dict], dict]:
    """Doubling, then bisection; returns (trial rows, the configuration's summary)."""
    accum = CONFIGS[config][1]
    b = args.micro_batch
    rows: list[dict] = []
    known = known or {}
    last_wall = last_n = None
    stopped = None

    def run(n: int) -> dict | None:
        nonlocal last_wall, last_n, stopped
        k, bb = _split(config, n, b)
        if n in known:
            row = dict(known[n])
        else:
            est = last_wall * n / last_n if last_wall else 0.0
            if time.perf_counter() + est > deadline:
                stopped = "time limit"
                return None
            spec = {"preset": args.preset, "config": config, "n": n, "k": k, "b": bb, "seed": args.seed,
                    "tokens": pool.sample(n, args.seed)}
            t0 = time.perf_counter()
            out = trial.run(spec)
            wall = time.perf_counter() - t0
            last_wall, last_n = wall, n
            row = {"config": config, "n": n, "micro_batch": bb, "accum_steps": k, "peak_mib": out.get("peak_mib"),
                   "step_mib": out.get("step_mib"), "before_mib": out.get("before_mib"),
                   "maxrss_mib": out.get("maxrss_mib"), "reserved_mib": out.get("reserved_mib"),
                   "step_s": out.get("step_s"), "trial_s": wall, "loss": out.get("loss"),
                   "peak_source": out.get("peak_source"), "error": out.get("error"),
                   "out_of_memory": bool(out.get("oom") or out.get("killed"))}
            fits = bool(out.get("ok")) and row["peak_mib"] is not None and row["peak_mib"] <= budget_mib
            row["fits"] = fits
        rows.append(row)
        print(f"  {config:10s} N={n:6d} (K={k} x B={bb}): peak {_fmt(row.get('peak_mib'))} MiB, step's own "
              f"{_fmt(row.get('step_mib'))} MiB, {_fmt(row.get('step_s'), '.2f')} s -> "
              f"{'fits' if row['fits'] else 'does not fit' + (' (' + row['error'] + ')' if row.get('error') else '')}",
              file=sys.stderr, flush=True)
        return row

    # exact at N = B is one micro-batch: the plain computation; its search starts at 2B
    n, last_fit, first_fail = max(args.start_batch, 2 * b) if accum else args.start_batch, None, None
    while True:
        if n > args.max_batch:
            stopped = "max batch"
            break
        row = run(n)
        if row is None:
            break
        if not row["fits"]:
            first_fail = n
            over = row.get("error") is None or row.get("out_of_memory")
            stopped = "over budget" if over else "error"
            break
        last_fit = n
        n *= 2
    # bisection between the last fit and the first miss, on the grid of B (K x B for exact)
    lo, hi = last_fit, first_fail
    for _ in range(args.bisect_steps if stopped == "over budget" and lo else 0):
        mid = (lo + hi) // 2 // b * b
        if mid <= lo:
            break
        row = run(mid)
        if row is None:
            stopped = "over budget; bisection cut by the time limit"
            break
        if row["fits"]:
            lo = mid
        elif row.get("error") is None or row.get("out_of_memory"):
            hi = mid
        else:
            break
    fitting = [r for r in rows if r["fits"]]
    largest = max((r["n"] for r in fitting), default=None)
    at = next((r for r in fitting if r["n"] == largest), None)
    capped = stopped in ("max batch", "time limit") and largest is not None
    summary = {"config": config, "micro_batch": b if accum else None, "largest_n": largest,
               "accum_steps_at_largest": (largest // b if accum else 1) if largest else None,
               "peak_mib_at_largest": at["peak_mib"] if at else None,
               "step_mib_at_largest": at["step_mib"] if at else None, "capped": capped, "stopped": stopped,
               "trials": len(rows)}
    summary.update(extrapolate(fitting, budget_mib, b if accum else 1) if capped else
                   {"extrapolated_n": None, "mib_per_sample": None})
    return rows, summary


def extrapolate(fitting: list[dict], budget_mib: float, grid: int) -> dict:
    """Largest N a line through the last two fitting peaks predicts (an extrapolation)."""
    pts = sorted((r["n"], r["peak_mib"]) for r in fitting if r["peak_mib"] is not None)
    if len(pts) < 2:
        return {"extrapolated_n": None, "mib_per_sample": None}
    (n1, p1), (n2, p2) = pts[-2], pts[-1]
    slope = (p2 - p1) / (n2 - n1)
    if slope <= 0:
        return {"extrapolated_n": None, "mib_per_sample": slope}
    n = n2 + (budget_mib - p2) / slope
    return {"extrapolated_n": int(n // grid * grid), "mib_per_sample": slope}


# ----------------------------------------------------------------------------- timing


def _iqr(xs: list[float]) -> float:
    if len(xs) < 2:
        return 0.0
    q = statistics.quantiles(xs, n=4, method="inclusive")
    return q[2] - q[0]


class _NoModuleTracking:
    """Stands in for FlopCounterMode's module tracker: its hooks on a module's inputs make
    ``torch.autograd.grad`` over leaf features (exact accumulation's loss gradient) fail ("A leaf
    node was passed to _will_engine_execute_node ..."); totals need no per-module split."""

    parents = ("Global",)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def count_flops(fn) -> int:
    """FLOPs ``FlopCounterMode`` counts while ``fn()`` runs (matmuls, attention, convolutions)."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False, depth=0)
    counter.mod_tracker = _NoModuleTracking()
    with counter:
        fn()
    return counter.get_total_flops()


def timing(args, device, pool: TextPool) -> list[dict]:
    """(b): every variant of :data:`VARIANTS` at N = --time-batch, alternating; one row per variant."""
    import msclip_fast as mf
    from msclip_fast.training.step import train_step

    n, b = args.time_batch, args.micro_batch
    precision = _precision(device)
    torch.manual_seed(args.seed)
    model = mf.create_model(args.preset).to(device)
    model.train()
    tokens = pool.sample(n, args.seed + 7)
    micro = make_micro(tokens, n, b, model.image_size, args.seed + 7,
                       image_pool=4 * b if device.type == "cuda" else None)
    whole = [{"image": torch.cat([m["image"] for m in micro]), "text": tokens,
              "text_lengths": torch.cat([m["text_lengths"] for m in micro])}]
    engine_kb, opt, sched = make_engine(model, device, precision, n // b, b, "exact", False)
    engine_1, _, _ = make_engine(model, device, precision, 1, n, "exact", False, opt, sched)
    step_no = [0]

    def run(name: str) -> float:
        mode, accum, ckpt = VARIANTS[name]
        model.set_grad_checkpointing(ckpt)
        step_no[0] += 1
        _sync(device)
        t0 = time.perf_counter()
        train_step(engine_kb if accum else engine_1, micro if accum else whole, mode, step=step_no[0])
        _sync(device)
        return (time.perf_counter() - t0) * 1e3

    names = [v for v in VARIANTS if v in args.variants]
    flops = {}
    if args.flops:
        for name in names:  # also the first warmup step of each variant
            flops[name] = count_flops(lambda: run(name))
    for _ in range(args.warmup):
        for name in names:
            run(name)
    times = {name: [] for name in names}
    cpu0, t_start = time.process_time(), time.perf_counter()
    for r in range(args.repeats):
        order = names[r % len(names):] + names[:r % len(names)]
        for name in order:
            times[name].append(run(name))
    wall = time.perf_counter() - t_start
    cpu_share = ((time.process_time() - cpu0) / wall / torch.get_num_threads()
                 if wall and device.type == "cpu" else None)
    model.set_grad_checkpointing(False)
    rows = []
    for name in names:
        mode, accum, ckpt = VARIANTS[name]
        k, bb = (n // b, b) if accum else (1, n)
        rows.append({"variant": name, "mode": mode, "n": n, "accum_steps": k, "micro_batch": bb, "ckpt": ckpt,
                     "median_ms": statistics.median(times[name]), "iqr_ms": _iqr(times[name]),
                     "repeats": len(times[name]), "times_ms": times[name],
                     "gflop": flops[name] / 1e9 if name in flops else None, "cpu_share": cpu_share})
        print(f"  time {name:11s} N={n} (K={k} x B={bb}{', ckpt' if ckpt else ''}): "
              f"{rows[-1]['median_ms']:.0f} ms (IQR {rows[-1]['iqr_ms']:.0f})"
              + (f", {rows[-1]['gflop']:.1f} GFLOP" if rows[-1]["gflop"] else ""), file=sys.stderr, flush=True)
    del model, engine_kb, engine_1, opt, sched, micro, whole
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return rows


def time_ratios(rows: list[dict]) -> dict:
    """name -> {num, den (variants), time_ratio (of the medians), round ratios (the two variants'
    steps of the same round: load that drifts between rounds cancels) median / min / max,
    flop_ratio (counted)}."""
    by = {r["variant"]: r for r in rows}
    out = {}
    pairs = {"exact_vs_independent": ("exact", "independent"), "plain_ckpt_vs_plain": ("plain_ckpt", "plain"),
             "exact_ckpt_vs_exact": ("exact_ckpt", "exact"), "exact_vs_plain": ("exact", "plain")}
    for key, (a, b) in pairs.items():
        if a in by and b in by and by[b]["median_ms"]:
            fa, fb = by[a].get("gflop"), by[b].get("gflop")
            per_round = [x / y for x, y in zip(by[a]["times_ms"], by[b]["times_ms"]) if y]
            out[key] = {"num": a, "den": b, "time_ratio": by[a]["median_ms"] / by[b]["median_ms"],
                        "round_ratio_median": statistics.median(per_round) if per_round else None,
                        "round_ratio_min": min(per_round, default=None),
                        "round_ratio_max": max(per_round, default=None),
                        "flop_ratio": fa / fb if fa and fb else None}
    return out


# ----------------------------------------------------------------------------- CLI


def _fmt(x, spec: str = ".0f") -> str:
    return "–" if x is None else format(x, spec)


DEFAULTS = {  # device -> defaults of the size flags (None: calibrated / not set)
    "cpu": {"preset": "msclip-s-tiny", "micro_batch": 32, "max_batch": 4096, "time_batch": 128,
            "calibrate_batch": 128, "budget_mib": None, "time_limit": 900.0, "repeats": 7, "warmup": 0, "flops": True,
            "bisect_steps": 2, "jobs": 1},
    "cuda": {"preset": "msclip-s-b32", "micro_batch": 128, "max_batch": 65536, "time_batch": 512,
             "calibrate_batch": None, "budget_mib": 40 * 1024.0, "time_limit": 70.0, "repeats": 3, "warmup": 1,
             "flops": False, "bisect_steps": 2, "jobs": 1},
    "smoke": {"preset": "msclip-s-tiny", "micro_batch": 4, "start_batch": 16, "max_batch": 32, "time_batch": 8,
              "calibrate_batch": 16, "bisect_steps": 0, "budget_mib": None, "time_limit": 60.0, "repeats": 1,
              "warmup": 0, "flops": False, "jobs": 2},
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--smoke", action="store_true",
                   help="tiny sizes, one timed round (a check that everything runs, < 30 s on the CPU)")
    p.add_argument("--preset", default=None, help="model preset (default: msclip-s-tiny on cpu, msclip-s-b32 on cuda)")
    p.add_argument("--micro-batch", type=int, default=None, help="B of the exact configurations (cpu 32, cuda 128)")
    p.add_argument("--start-batch", type=int, default=None, help="first N of the search (default: B)")
    p.add_argument("--max-batch", type=int, default=None, help="largest N tried (cpu 4096, cuda 65536)")
    p.add_argument("--budget-mib", type=float, default=None,
                   help="memory budget of one step (MiB); cpu default: the peak RSS of the plain step at "
                        "--calibrate-batch; cuda default: 40960 (40 GiB)")
    p.add_argument("--calibrate-batch", type=int, default=None, help="N of the calibrating plain step (cpu 128)")
    p.add_argument("--time-batch", type=int, default=None, help="N of the timed steps (cpu 128, cuda 512)")
    p.add_argument("--repeats", type=int, default=None, help="timed rounds (default 3)")
    p.add_argument("--warmup", type=int, default=None, help="untimed rounds before them (cpu 0: the FLOP-counting "
                                                             "round warms up; cuda 1)")
    p.add_argument("--no-flops", dest="flops", action="store_false", default=None,
                   help="skip the FLOP-counting round (cuda: skipped by default)")
    p.add_argument("--configs", default=",".join(CONFIGS), help=f"memory configurations (default: {','.join(CONFIGS)})")
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"timed variants (default: {','.join(VARIANTS)})")
    p.add_argument("--no-timing", action="store_true", help="skip (b)")
    p.add_argument("--bisect-steps", type=int, default=None,
                   help="bisection trials between the last fit and the first miss, on the grid of B "
                        "(default 2; --smoke 0)")
    p.add_argument("--time-limit", type=float, default=None,
                   help="seconds for the whole run (cpu 900, cuda 70): the search stops at it and reports what it "
                        "reached; each configuration gets an equal share of what the timing left")
    p.add_argument("--trial-timeout", type=float, default=600.0, help="CPU: seconds before a trial is killed")
    p.add_argument("--jobs", type=int, default=None,
                   help="CPU: configurations searched side by side, each trial still in its own process (peak "
                        "RSS is per process; step times then share the cores). Default 1; --smoke 2")
    p.add_argument("--text", choices=("auto", "openclipart", "lengths"), default="auto",
                   help="captions: openclipart (CLIP tokenizer), lengths (random ids with the openclipart caption "
                        "lengths), auto (openclipart where installed with open_clip, else lengths; --smoke: lengths)")
    p.add_argument("--captions", type=Path, default=None, help="caption file, one per line (CLIP tokenizer)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, default=None, help="write the results here (schema: bench/report.py)")
    return p


def resolve(args) -> argparse.Namespace:
    d = DEFAULTS["smoke" if args.smoke else args.device]
    for k, v in d.items():
        if getattr(args, k, None) is None:
            setattr(args, k, v)
    if args.smoke and args.text == "auto":
        args.text = "lengths"
    if args.start_batch is None:
        args.start_batch = args.micro_batch
    args.configs = [c.strip() for c in args.configs.split(",") if c.strip()]
    args.variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    bad = [c for c in args.configs if c not in CONFIGS] + [v for v in args.variants if v not in VARIANTS]
    if bad or not args.configs:
        raise ValueError(f"--configs must name {list(CONFIGS)} and --variants {list(VARIANTS)}, got {bad or 'none'}")
    b = args.micro_batch
    for name in ("micro_batch", "start_batch", "max_batch", "time_batch", "repeats"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.jobs < 1 or args.device == "cuda" and args.jobs != 1:
        raise ValueError(f"--jobs must be >= 1 (and 1 with --device cuda), got {args.jobs}")
    if args.warmup < 0 or args.bisect_steps < 0:
        raise ValueError(f"--warmup and --bisect-steps must be >= 0, got {args.warmup}, {args.bisect_steps}")
    for name in ("start_batch", "time_batch") + (("calibrate_batch",) if args.calibrate_batch else ()):
        if getattr(args, name) % b:
            raise ValueError(f"--{name.replace('_', '-')} ({getattr(args, name)}) must be a multiple of "
                             f"--micro-batch ({b})")
    if args.budget_mib is None and not args.calibrate_batch:
        raise ValueError("give --budget-mib or --calibrate-batch")
    return args


def main(argv: list[str] | None = None) -> dict:
    """Run the benchmark; returns the results document."""
    t_start = time.perf_counter()
    args = resolve(build_parser().parse_args(argv))
    import msclip_fast as mf

    if args.preset not in mf.list_models():
        raise ValueError(f"--preset must be one of {mf.list_models()}, got {args.preset!r}")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("bench_accum: --device cuda but torch sees no CUDA device")
    device = torch.device("cuda", torch.cuda.current_device()) if args.device == "cuda" else torch.device("cpu")
    meta = _common.run_meta(args.device, "bench/bench_accum.py", sys.argv[1:] if argv is None else argv)
    deadline = t_start + args.time_limit
    from msclip_fast.models import get_model_config

    context = get_model_config(args.preset).text.context_length
    pool = make_text_pool(args, context)
    print(f"bench_accum: {args.preset} on {args.device}, B={args.micro_batch}; text: {pool.source} "
          f"(eot+1 mean {pool.stats['mean']:.1f}, median {pool.stats['median']:.0f})", file=sys.stderr, flush=True)

    trial = CpuTrials(args.trial_timeout) if device.type == "cpu" else None
    # --smoke: the server's imports may overlap the (then meaningless) timing
    server_s = trial.start(wait=not args.smoke) if trial else None

    # (b) time
    time_rows = [] if args.no_timing else timing(args, device, pool)
    ratios = time_ratios(time_rows)

    # (a) memory
    if device.type == "cuda":
        trial = CudaTrials(args.preset, device, args.seed)
        trial.warm(pool.sample(args.micro_batch, args.seed + 3), args.micro_batch, args.seed + 3)
    known: dict[str, dict] = {}
    budget, budget_source = args.budget_mib, "--budget-mib"
    calib_row = None
    if budget is None:
        n = args.calibrate_batch
        spec = {"preset": args.preset, "config": "plain", "n": n, "k": 1, "b": n, "seed": args.seed,
                "tokens": pool.sample(n, args.seed)}
        t0 = time.perf_counter()
        out = trial.run(spec)
        if not out.get("ok"):
            raise RuntimeError(f"the calibrating plain step at N={n} failed: {out.get('error')}")
        budget = out["peak_mib"]
        budget_source = f"peak of the plain step at N={n} (calibration trial)"
        calib_row = {"config": "plain", "n": n, "micro_batch": n, "accum_steps": 1, "peak_mib": out["peak_mib"],
                     "step_mib": out.get("step_mib"), "before_mib": out.get("before_mib"),
                     "maxrss_mib": out.get("maxrss_mib"), "reserved_mib": None, "step_s": out.get("step_s"),
                     "trial_s": time.perf_counter() - t0, "loss": out.get("loss"),
                     "peak_source": out.get("peak_source"), "error": None, "out_of_memory": False, "fits": True,
                     "calibration": True}
        known["plain"] = {n: calib_row}
        print(f"  budget {budget:.0f} MiB = {budget_source}", file=sys.stderr, flush=True)
    rows, largest = [], []
    if args.jobs > 1:  # the configurations' searches side by side (trial processes, CPU only)
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(args.jobs) as ex:
            done = list(ex.map(lambda c: search(c, trial, pool, args, budget, deadline, known.get(c)), args.configs))
    else:  # one after the other, each with an equal share of the time left
        done = []
        for i, config in enumerate(args.configs):
            share = time.perf_counter() + max(deadline - time.perf_counter(), 0) / (len(args.configs) - i)
            done.append(search(config, trial, pool, args, budget, share, known.get(config)))
    for r, s in done:
        rows += r
        largest.append(s)
    plain = next((s["largest_n"] for s in largest if s["config"] == "plain"), None)
    for s in largest:
        s["vs_plain"] = s["largest_n"] / plain if plain and s["largest_n"] else None
    if calib_row and "plain" not in args.configs:
        rows.insert(0, calib_row)

    settings = {"preset": args.preset, "device": args.device, "precision": _precision(device),
                "backend": os.environ.get("MSCLIP_FAST_BACKEND") or "auto", "micro_batch": args.micro_batch,
                "start_batch": args.start_batch, "max_batch": args.max_batch, "bisect_steps": args.bisect_steps,
                "jobs": args.jobs, "budget_mib": budget, "budget_source": budget_source,
                "calibrate_batch": args.calibrate_batch if budget_source != "--budget-mib" else None,
                "time_batch": args.time_batch, "repeats": args.repeats, "warmup": args.warmup,
                "flops": bool(args.flops), "configs": args.configs, "variants": args.variants,
                "time_limit_s": args.time_limit, "smoke": args.smoke, "text": pool.source, "text_lengths": pool.stats,
                "memory": ("peak RSS of a process of its own per trial (VmHWM reset before the step), forked from a "
                           "server that imported torch" if device.type == "cpu"
                           else "torch.cuda.max_memory_allocated during the step, trials in one process"),
                "server_start_s": round(server_s, 1) if server_s is not None else None,
                "expectation": expectation(args.time_batch // args.micro_batch),
                "total_s": round(time.perf_counter() - t_start, 1)}
    headline = {}
    for s in largest:
        if s["largest_n"]:
            headline[f"accum_largest_{s['config']}"] = s["largest_n"]
        if s["config"] != "plain" and s["vs_plain"]:
            headline[f"accum_batch_{s['config']}_vs_plain"] = round(s["vs_plain"], 3)
    for key, r in ratios.items():
        headline[f"accum_time_{key}"] = round(r["time_ratio"], 3)
    doc = _common.payload("accum", meta, settings, [_clean(r) for r in rows], headline,
                          largest=[_clean(s) for s in largest], timing=[_clean(r) for r in time_rows],
                          ratios={k: _clean(v) for k, v in ratios.items()})
    if args.json:
        _common.write_json(args.json, doc)
    import report  # noqa: PLC0415 - report imports _common

    print(report.render_doc(doc, source=str(args.json) if args.json else None))
    return doc


def _clean(d: dict) -> dict:
    return {k: _common.finite(v) if isinstance(v, float) else v for k, v in d.items()}


if __name__ == "__main__":
    main()
