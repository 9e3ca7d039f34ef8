"""Turn the benchmark JSON into bench/RESULTS.md tables and PNG charts.

    python -m bench.report [--results-dir bench/results] [--write bench/RESULTS.md] [--charts bench/charts]

Reads every ``*.json`` in ``--results-dir`` (default bench/results/, where the committed results
live; each file is one run of one benchmark, named ``<benchmark>-<device>[-<variant>].json``),
and renders one section per file: what was measured, machine / command / date / commit, the
chart, the table, what was not run and why, what failed. Files whose ``meta.device`` is
``"cuda"`` go under "GPU results", all others under "CPU results": CPU and GPU numbers never
share a table or a chart. Without ``--write`` the markdown goes to stdout. ``--write`` replaces
only the ``<!-- bench_report:begin/end -->`` region of the file (appended when absent); every
other part (e.g. the ``kernel_report`` section) is kept as it is. Charts (matplotlib, Agg) are
written to ``--charts`` (default: ``charts/`` beside ``--write``; none when printing) as
``<json stem>.png`` and embedded with paths relative to the markdown file. Without matplotlib
the tables are still written and the report says that the charts were not drawn. A file that
is not valid JSON or does not follow the schema stops the report with exit status 2 and a
message naming the file and the problem.

To re-measure and regenerate (CPU, a few minutes each on 2 cores)::

    python bench/bench_loss.py --sizes 4096,8192,16384 --json bench/results/loss-cpu-fp32.json
    python bench/bench_loss.py --loss siglip --sizes 4096,8192,16384,32768 --json bench/results/siglip-cpu-fp32.json
    python bench/bench_ops.py --device cpu --smoke --json bench/results/ops-cpu-smoke.json
    python bench/bench_train_step.py --json bench/results/train_step-cpu.json
    python bench/bench_packed.py --repeats 5 --json bench/results/packed-cpu.json
    python bench/bench_trim.py --json bench/results/trim-cpu.json
    python bench/bench_accum.py --json bench/results/accum-cpu.json
    python bench/bench_data.py --make-shards 2000 --json bench/results/data-cpu.json
    python -m bench.report --write bench/RESULTS.md --charts bench/charts

JSON schema (version 1)
-----------------------
Every bench script's ``--json`` writes one object::

    schema      1
    benchmark   "loss" | "siglip" | "ops" | "train_step" | "packed" | "trim" | "accum" | "data"
    meta        where/when/how (bench/_common.py run_meta):
                  machine   {cpu, cores (usable), logical_cpus, torch_threads, gpu (name | null),
                             gpu_count, cuda, python, platform, load_avg and load_avg_end
                             [1, 5, 15 min] at start and end}
                  env       {name: value} of the set variables that change a measurement
                            (OMP_WAIT_POLICY, OMP_NUM_THREADS, TRITON_INTERPRET, ...)
                  command   "[VAR=value ...] python bench/<script>.py <args>"
                  date_utc  "YYYY-MM-DDTHH:MM:SSZ"
                  commit    short git hash (else $MSCLIP_FAST_COMMIT) | null;
                  dirty     bool | null (uncommitted changes to tracked files)
                  torch, triton (version | null), device ("cpu" | "cuda")
    settings    the benchmark's parameters (below)
    rows        list of result objects (below)
    headline    {name: number}: a few ratios for summaries (bench/gpu_check.sh reads them)
    status      "ok" | "failed" (loss, siglip, ops, data);  failures: [str] naming implementation and error

``loss`` (bench_loss.py): settings {sizes, dim, dtype, scale, repeats, check_n, timeout_s,
max_mem_gib, impls, specs, peer_versions, total_s}; rows {impl, n, status "ok" | "not_run" |
"failed", time_s, peak_mib, reason, [stderr_tail]}; checks [{impl, n, status, tol, loss_rel_err,
grad_img_rel_err, grad_txt_rel_err, grad_scale_rel_err, max_rel_err, loss, ref_loss, reason,
[stderr_tail]}];
not_run {impl: reason}. Headline ``loss_<fused|triton>_vs_<open_clip|reference>_time_N<n>`` =
peer time / ours and ``..._mem_N<n>`` = peer peak MiB / ours at the largest N both ran (> 1:
ours better); ``loss_<impl>_max_rel_err``.

``siglip`` (bench_loss.py --loss siglip, the sigmoid loss): as ``loss``, with settings {loss
"siglip", sizes, dim, dtype, scale, bias, repeats, check_n, timeout_s, max_mem_gib, impls, specs,
peer_versions, child_env, total_s, naive_buffers {peer: N x N fp32 buffers assumed at its peak}};
rows add beyond_grads_mib (peak_mib less the image and text gradients, 2 x N x D elements);
checks add grad_bias_rel_err. Headline ``siglip_<ours>_vs_<peer>_time_N<n>``, ``..._mem_N<n>``,
``siglip_<ours>_vs_<peer>_time_min`` (smallest time ratio over every N both ran),
``siglip_<ours>_beyond_grads_mib_N<n>`` (ours' largest N), ``siglip_<impl>_max_rel_err``.

``ops`` (bench_ops.py): settings {dtype, smoke, ops, modes, backend (of ours), interpreter,
batch_scale, min_run_time, total_s}; rows {op, case, tag, impl, mode "fwd" | "fwd+bwd", ms,
tflops, gbps, ratio (= this impl's time / ours), peak_mib (CUDA), error, extra}; the first impl
of each case is "ours"; a peer that cannot run has ms null and its error. Tags: B32 (image
attention, 50 tokens), B16 (197), L257, text77 (causal, 77), packed (images + texts in one
varlen call), packed_residual (LayerNorm), quick_gelu / gelu (bias_act), quick_gelu (ffn).
Headline ``<op>_fwd_bwd_vs_<sdpa|torch>_<tag>`` = fastest peer's fwd+bwd time / ours (> 1: ours
faster), e.g. ``attention_fwd_bwd_vs_sdpa_B32``; CUDA adds ``ffn_fwd_bwd_peak_mem_vs_torch``.
No headline from the Triton interpreter (settings.interpreter true).

``train_step`` (bench_train_step.py): settings {presets, batch_size, full_batch_size, warmup,
repeats, full_repeats, min_run_time, backend, dtype, peak_tflops, skipped, total_s}; rows
{preset, params_m, batch, image_size, median_ms, iqr_ms, timed_steps, samples_per_s,
gflop_per_sample, gflops_achieved, mfu, cpu_share, loss}. Headline
``train_step_samples_per_s_<preset>``.

``packed`` (bench_packed.py): settings {presets, batch_size, warmup, repeats, trims, text,
[corpus_lengths], backend, dtype, total_s}; rows {preset, trim (text trimmed at EOT), batch,
text_rows, tokens_packed, packed_ms, packed_iqr_ms, per_tower_ms, per_tower_iqr_ms, repeats, ratio
(= per-tower / packed), loss_diff}. Headline ``packed_vs_per_tower_<preset>`` (trimmed) and
``packed_vs_per_tower_<preset>_padded``.

``trim`` (bench_trim.py): settings {presets, batch_size, full_batch_size, warmup, repeats, seed,
backend, dtype, captions, corpus_lengths {n, mean, median, p90, p99, max, cut_at_context},
total_s}; rows {preset, params_m, batch, packed, len_mean, len_median, len_p90, len_max,
text_rows_trimmed, text_rows_padded, gflop_trimmed, gflop_padded, flop_ratio (= padded /
trimmed), text_gflop_trimmed, text_gflop_padded, image_gflop, trimmed_ms, trimmed_iqr_ms,
padded_ms, padded_iqr_ms, time_ratio (= padded / trimmed), repeats, trimmed_fwd_ms,
trimmed_bwd_ms, trimmed_opt_ms, padded_fwd_ms, padded_bwd_ms, padded_opt_ms, text_trimmed_ms,
text_padded_ms, text_time_ratio, image_ms, cpu_share, loss_diff, note}. Headline
``trim_flop_ratio_<preset>``, ``trim_step_speedup_<preset>``.

``accum`` (bench_accum.py): settings {preset, device, precision, backend, micro_batch, start_batch,
max_batch, bisect_steps, jobs, budget_mib, budget_source, calibrate_batch, time_batch, repeats, warmup, flops, configs,
variants, time_limit_s, smoke, text, text_lengths, memory, server_start_s, expectation, total_s};
rows = the memory trials {config ("plain" | "plain_ckpt" | "exact" | "exact_ckpt"), n, micro_batch,
accum_steps, fits, peak_mib, step_mib (= peak - before), before_mib, maxrss_mib (CPU: lifetime),
reserved_mib (CUDA), step_s, trial_s, loss, peak_source, error, out_of_memory, [calibration]};
largest [{config, micro_batch, largest_n, accum_steps_at_largest, peak_mib_at_largest,
step_mib_at_largest, capped (still fitting at --max-batch or the time limit), stopped,
trials, extrapolated_n, mib_per_sample, vs_plain}]; timing [{variant ("independent" | "exact" |
"exact_ckpt" | "plain" | "plain_ckpt"), mode, n, accum_steps, micro_batch, ckpt, median_ms,
iqr_ms, repeats, times_ms (one per round), gflop, cpu_share}]; ratios {exact_vs_independent |
plain_ckpt_vs_plain | exact_ckpt_vs_exact | exact_vs_plain: {num, den, time_ratio (of the medians),
round_ratio_median, round_ratio_min, round_ratio_max (the two variants' steps of one round),
flop_ratio}}. Headline
``accum_largest_<config>``, ``accum_batch_<config>_vs_plain``, ``accum_time_<ratio>``.

``data`` (bench_data.py, the input pipeline): settings {source, shards, samples, shard_image_size,
image_size, threads (DALI num_threads = torch num_workers = index workers), batch_size, warmup,
batches, repeats, modes, seed, dali_version (null: not importable), dali_device ("cpu" | "mixed" |
null), torch_decoder, pillow, webdataset, make_shards_s, total_s}; rows {backend "torch" | "dali",
mode "train" | "eval", status "ok" | "not_run" | "failed", images_per_s (median over the rounds),
iqr_images_per_s, ratio (dali rows: dali / torch of the medians, > 1: DALI faster),
round_ratio_median (of the same-round ratios), startup_s (median time to the first batch),
repeats, batches, warmup, batch_size, threads, images_timed, runs_images_per_s (one per round),
decoder ("PIL" | "dali-cpu" | "dali-mixed"), reason}; index [{kind "trusted" (make_shards' header-only
build) | "validating" (build_index force=True: every image decoded once), status, seconds, shards,
samples, shards_per_s, samples_per_s, workers, good, fallback {reason: n}, skipped {reason: n},
reason}]; not_run {name: reason} ("dali", "all", "<backend>_<mode>"). Headline
``data_dali_vs_torch_images_per_s_<mode>``, ``data_<torch|dali>_images_per_s_<mode>``,
``data_index_build_samples_per_s`` (validating), ``data_index_trusted_samples_per_s``.

Numbers are null where not measured (JSON has no NaN).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

if str(Path(__file__).resolve().parent) not in sys.path:  # bench/_common.py (no torch import)
    sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402

ROOT = _common.ROOT
SCHEMA = _common.SCHEMA
NAME = "bench_report"
BEGIN, END = _common.markers(NAME)
ORDER = ("loss", "siglip", "ops", "train_step", "packed", "trim", "accum", "data")
TITLES = {"loss": "Contrastive loss", "siglip": "Sigmoid (SigLIP) loss", "ops": "Ops vs PyTorch",
          "train_step": "Train step throughput", "packed": "Packed vs per-tower",
          "trim": "Text trimmed at EOT vs padded",
          "accum": "Exact accumulation and activation checkpointing",
          "data": "Input pipeline: DALI vs torch DataLoader"}
_ROW_KEYS = {
    "loss": ("impl", "n", "status"),
    "siglip": ("impl", "n", "status"),
    "ops": ("op", "case", "impl", "mode", "ms"),
    "train_step": ("preset", "batch", "median_ms", "samples_per_s"),
    "packed": ("preset", "batch", "packed_ms", "per_tower_ms", "ratio"),
    "trim": ("preset", "batch", "gflop_trimmed", "gflop_padded", "flop_ratio", "trimmed_ms", "padded_ms",
             "time_ratio"),
    "accum": ("config", "n", "fits", "peak_mib"),
    "data": ("backend", "mode", "status"),
}
_META_KEYS = ("machine", "command", "date_utc", "commit", "device")


class ReportError(Exception):
    """A results file that cannot be reported (message names the file and the problem)."""


# ----------------------------------------------------------------------------- loading


def validate(doc, source: str = "<doc>") -> dict:
    """Check ``doc`` against the schema above; returns it, or raises ReportError."""
    def fail(msg):
        raise ReportError(f"{source}: {msg}")

    if not isinstance(doc, dict):
        fail(f"expected a JSON object, got {type(doc).__name__}")
    if doc.get("schema") != SCHEMA:
        fail(f"'schema' must be {SCHEMA}, got {doc.get('schema')!r} (written by an older or foreign script?)")
    bench = doc.get("benchmark")
    if bench not in ORDER:
        fail(f"'benchmark' must be one of {list(ORDER)}, got {bench!r}")
    meta = doc.get("meta")
    if not isinstance(meta, dict):
        fail("missing object 'meta'")
    for k in _META_KEYS:
        if k not in meta:
            fail(f"missing 'meta.{k}'")
    if meta["device"] not in ("cpu", "cuda"):
        fail(f"'meta.device' must be 'cpu' or 'cuda', got {meta['device']!r}")
    if not isinstance(meta["machine"], dict):
        fail("'meta.machine' must be an object")
    rows = doc.get("rows")
    if not isinstance(rows, list):
        fail("missing list 'rows'")
    for i, r in enumerate(rows):
        if not isinstance(r, dict):
            fail(f"rows[{i}] is not an object")
        missing = [k for k in _ROW_KEYS[bench] if k not in r]
        if missing:
            fail(f"rows[{i}] lacks {missing} (a {bench} row needs {list(_ROW_KEYS[bench])})")
    for k in ("settings", "headline"):
        if not isinstance(doc.get(k, {}), dict):
            fail(f"'{k}' must be an object")
    return doc


def load(results_dir: Path) -> list[tuple[Path, dict]]:
    """Every ``*.json`` in ``results_dir``, validated, sorted by (benchmark order, file name)."""
    results_dir = Path(results_dir)
    if not results_dir.is_dir():
        raise ReportError(f"{results_dir}: not a directory (--results-dir)")
    out = []
    for path in sorted(results_dir.glob("*.json")):
        try:
            doc = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise ReportError(f"{path}: not valid JSON (line {e.lineno}, column {e.colno}: {e.msg})") from None
        except (OSError, UnicodeDecodeError) as e:
            raise ReportError(f"{path}: cannot be read ({e})") from None
        if isinstance(doc, dict) and "schema" not in doc and doc.get("report") == "kernel_report":
            print(f"bench.report: {path}: skipped (kernel report JSON; `python -m bench.kernel_report --write` "
                  "renders it)", file=sys.stderr)
            continue
        out.append((path, validate(doc, str(path))))
    out.sort(key=lambda pd: (ORDER.index(pd[1]["benchmark"]), pd[0].name))
    return out


# ----------------------------------------------------------------------------- markdown


def _f(x, spec: str, none: str = "–") -> str:
    return none if x is None else format(x, spec)


def _table(header: list[str], rows: list[list[str]], align: str | None = None) -> list[str]:
    align = align or ("---|" + "---:|" * (len(header) - 1))
    return ["| " + " | ".join(header) + " |", "|" + align] + ["| " + " | ".join(r) + " |" for r in rows]


def meta_lines(doc: dict) -> list[str]:
    """The Machine / Command / Date / Commit / Versions bullets of one run."""
    m = doc["meta"]
    mach = m["machine"]
    load = mach.get("load_avg")
    parts = [f"{mach.get('cpu', '?')}, {mach.get('cores', '?')} usable cores ({mach.get('logical_cpus', '?')} logical),"
             f" torch threads {mach.get('torch_threads', '?')}"]
    if mach.get("gpu"):
        parts.append(f"GPU {mach['gpu']}" + (f" x{mach['gpu_count']}" if (mach.get("gpu_count") or 1) > 1 else "")
                     + (f", CUDA {mach['cuda']}" if mach.get("cuda") else ""))
    else:
        parts.append("no GPU")
    if load:
        end = mach.get("load_avg_end")
        parts.append("load average (1/5/15 min) " + " / ".join(f"{x:.1f}" for x in load) + " at the start"
                     + (", " + " / ".join(f"{x:.1f}" for x in end) + " at the end" if end else "")
                     + f" on {mach.get('logical_cpus', '?')} logical CPUs")
    commit = m.get("commit") or "unknown"
    if m.get("dirty"):
        commit += " (with uncommitted changes)"
    elif m.get("dirty") is None and m.get("commit"):
        commit += " (clean state unknown)"
    return [
        f"- Machine: {'; '.join(parts)}",
        f"- Command: `{m['command']}`",
        f"- Date: {m['date_utc'].replace('T', ' ').replace('Z', ' UTC')}",
        f"- Commit: {commit}",
        f"- Versions: Python {mach.get('python', '?')}, torch {m.get('torch', '?')}, triton {m.get('triton') or 'not installed'};"
        f" device {m['device']}",
    ]


def _headline_lines(doc: dict) -> list[str]:
    h = doc.get("headline") or {}
    if not h:
        return []
    return ["", "Headline: " + ", ".join(f"`{k}` = {v:g}" if isinstance(v, (int, float)) else f"`{k}` = {v}"
                                         for k, v in h.items())]


def _failure_lines(doc: dict) -> list[str]:
    fails = doc.get("failures") or []
    if not fails:
        return []
    return ["", "**FAILED** (the script exited non-zero): " + "; ".join(fails) + "."]


def _loss_body(doc: dict) -> list[str]:
    s = doc.get("settings", {})
    rows = doc["rows"]
    impls = s.get("impls") or list(dict.fromkeys(r["impl"] for r in rows))
    measured = [i for i in impls if any(r["impl"] == i and r["status"] == "ok" for r in rows)]
    by = {(r["impl"], r["n"]): r for r in rows}
    sizes = sorted({r["n"] for r in rows})
    ours = [i for i in measured if i in ("fused", "triton")]
    peers = [i for i in measured if i not in ("fused", "triton")]
    sig = doc["benchmark"] == "siglip"
    if sig:
        what = (f"the sigmoid (SigLIP) loss -Σ_ij log σ(z_ij (scale · img_i · txt_j + bias)) / N (z = +1 on the "
                f"diagonal, -1 elsewhere), N x D features with D={s.get('dim', '?')}, {s.get('dtype', '?')}, scale "
                f"{s.get('scale', 10):g}, bias {_f(s.get('bias'), 'g', 'none')}")
        mem = ("; `beyond grads` = peak less those gradients: what the loss itself holds (goal for the fused "
               "loss: <= 64 MiB at N=32768)")
        peer = "SigLipLoss"
    else:
        what = (f"the symmetric InfoNCE loss, N x D features with D={s.get('dim', '?')}, "
                f"{s.get('dtype', '?')}, scale {s.get('scale', 100):g}")
        mem, peer = "", "ClipLoss"
    lines = [
        f"Forward + backward of {what}, device {doc['meta']['device']}; each "
        "(implementation, N) in a fresh process; time = best of "
        f"{s.get('repeats', 1)} call(s); memory = peak over the process's footprint just before the call "
        f"(it includes the N x D gradients, 2 x N x D x bytes per element{mem}). `fused` is the C++/CUDA "
        "extension, `triton` the Triton kernels (both O(N) memory), `reference` plain PyTorch and "
        f"`open_clip` open_clip's {peer} (both materialize the N x N logits). Ratios > 1: ours is "
        "faster / smaller.",
        "",
    ]
    header = ["N"]
    for i in measured:
        header += [f"{i} s", f"{i} MiB"] + ([f"{i} beyond grads MiB"] if sig and i in ours else [])
    ratio_cols = [(p, o) for o in ours for p in peers]
    for p, o in ratio_cols:
        header += [f"{p}/{o} time", f"{p}/{o} memory"]

    def cell(i, n, key, spec):
        r = by.get((i, n))
        if r is None:
            return "–"
        if r["status"] == "ok":
            return _f(r[key], spec)
        return "FAIL" if r["status"] == "failed" else "not run"

    body = []
    for n in sizes:
        line = [str(n)]
        for i in measured:
            line += [cell(i, n, "time_s", ".3g"), cell(i, n, "peak_mib", ".0f")]
            if sig and i in ours:
                line.append(cell(i, n, "beyond_grads_mib", ".1f"))
        for p, o in ratio_cols:
            a, b = by.get((o, n)), by.get((p, n))
            ok = a and b and a["status"] == b["status"] == "ok"
            line.append(f"{b['time_s'] / a['time_s']:.2f}x" if ok and a["time_s"] else "–")
            line.append(f"{b['peak_mib'] / a['peak_mib']:.1f}x" if ok and a["peak_mib"] and b["peak_mib"] is not None
                        else "–")
        body.append(line)
    if measured:
        lines += _table(header, body)
    else:
        lines.append("Nothing was measured.")
    checks = doc.get("checks") or []
    if checks:
        lines += ["", f"Correctness check before timing (N={s.get('check_n', '?')}, relative error against the "
                  "float64 reference on the same rounded inputs; bound from DESIGN §7):", ""]
        crow = []
        grads = ("img", "txt", "scale") + (("bias",) if sig else ())
        for c in checks:
            crow.append([c["impl"], c["status"], _f(c.get("loss_rel_err"), ".1e"),
                         *(_f(c.get(f"grad_{g}_rel_err"), ".1e") for g in grads),
                         _f(c.get("tol"), "g"), c.get("reason") or ""])
        lines += _table(["impl", "check", "loss", *(f"d {g}" for g in grads), "bound", "note"], crow,
                        "---|---|---:|" + "---:|" * len(grads) + "---:|---|")
    notes = []
    for i in impls:
        reasons = sorted({(r["reason"] or "") for r in rows if r["impl"] == i and r["status"] == "not_run"})
        ns = [r["n"] for r in rows if r["impl"] == i and r["status"] == "not_run"]
        if ns:
            notes.append(f"{i} at N={','.join(map(str, ns))}: {'; '.join(reasons)}")
    if notes:
        lines += ["", "Not run: " + "; ".join(notes) + "."]
    return lines


def _ops_body(doc: dict) -> list[str]:
    s = doc.get("settings", {})
    dev = doc["meta"]["device"]
    backend = s.get("backend", "?")
    interp = " under TRITON_INTERPRET=1 (the Triton interpreter: its times say nothing about a GPU)" if s.get(
        "interpreter") else ""
    lines = [
        f"Forward and forward+backward time of each op (ours: `backend=\"{backend}\"`{interp}) and its "
        f"PyTorch peers on the same inputs, {s.get('dtype', '?')}, device {dev}"
        + (", tiny `--smoke` shapes (a check that every path runs; CPU numbers say nothing about GPU speed)"
           if s.get("smoke") else ", CLIP shapes (width 768, 12 heads of 64)")
        + ". `x ours` = that implementation's time / ours (> 1: ours is faster). "
        + ("Timing: `triton.testing.do_bench` median." if dev == "cuda"
           else "Timing: median of `torch.utils.benchmark` `blocked_autorange`"
           + (" (one call per measurement for the interpreted Triton path)" if s.get("interpreter") else "") + "."),
        "",
    ]
    body = []
    for r in doc["rows"]:
        body.append([r["op"], r["case"], r["impl"], r["mode"], _f(r.get("ms"), ".3f"), _f(r.get("tflops"), ".3g", ""),
                     _f(r.get("gbps"), ".0f", ""), _f(r.get("ratio"), ".2f", ""), _f(r.get("peak_mib"), ".0f", ""),
                     (r.get("error") or "").replace("|", "/")])
    lines += _table(["op", "case", "impl", "mode", "ms", "TFLOP/s", "GB/s", "x ours", "peak MiB", "note"], body,
                    "---|---|---|---|---:|---:|---:|---:|---:|---|")
    return lines


def _train_step_body(doc: dict) -> list[str]:
    s = doc.get("settings", {})
    lines = [
        "One step = forward + ClipLoss + backward + AdamW step on synthetic inputs, "
        f"{s.get('dtype', 'fp32')}; every op pinned to the `{s.get('backend', 'reference')}` backend. Median and IQR "
        "(`torch.utils.benchmark.Measurement`) over single timed steps after warmup; the FLOP-counting "
        "step is an extra warmup. GFLOP/sample counts forward + backward matmuls and convolutions "
        "(`FlopCounterMode`), not the optimizer. CPU share = process CPU time / (wall time x torch "
        "threads) over the timed steps: well below 1 means other processes held the cores and the "
        "step times are inflated by contention, not by the code.",
        "",
    ]
    body = [[r["preset"], _f(r.get("params_m"), ".2f"), str(r["batch"]), _f(r.get("image_size"), "d"),
             _f(r["median_ms"], ".1f"), _f(r.get("iqr_ms"), ".1f"), _f(r.get("timed_steps"), "d"),
             _f(r["samples_per_s"], ".2f"), _f(r.get("gflop_per_sample"), ".2f"), _f(r.get("gflops_achieved"), ".1f"),
             _f(r.get("mfu"), ".1%"), _f(r.get("cpu_share"), ".2f")] for r in doc["rows"]]
    lines += _table(["preset", "params (M)", "batch", "image px", "step median (ms)", "IQR (ms)", "timed steps",
                     "samples/s", "GFLOP/sample", "achieved GFLOP/s", "MFU", "CPU share"], body)
    if s.get("skipped"):
        lines += ["", f"Not measured (projected past the --time-budget): {', '.join(s['skipped'])}."]
    if any(r.get("mfu") is None for r in doc["rows"]):
        lines += ["", "MFU needs `--peak-tflops` (no single honest peak for a shared CPU)."]
    return lines


def _packed_body(doc: dict) -> list[str]:
    s = doc.get("settings", {})
    lines = [
        f"Training step (forward + ClipLoss + backward + AdamW step, {s.get('dtype', 'fp32')}) of the same model "
        "with `packed=True` (image and text tokens through each shared block in one call: one GEMM per "
        "shared weight, one varlen attention call, one modality-indexed LayerNorm call) and "
        f"`packed=False` (towers one after the other). Every op pinned to the `{s.get('backend', 'reference')}` "
        "backend (the varlen reference attention runs each run of equal-length sequences as one batched "
        "call). Timed steps of the two modes alternate in one process; medians and IQR over the timed "
        "steps; ratio = per-tower / packed (> 1: packed faster). On a shared, loaded machine treat "
        "differences within the IQR as noise.",
        "",
    ]
    if any("trim" in r for r in doc["rows"]):
        text = s.get("text", "synthetic")
        cl = s.get("corpus_lengths") or {}
        lines[0] += (" trim yes: each caption runs its own `eot + 1` tokens (`trim_text=True`, the default; "
                     "ragged text sequences); no: every caption padded to the context length (`trim_text=False`). "
                     + (f"Captions: a seeded sample of the {text}" + (f"; corpus eot+1 mean {cl['mean']:.1f}, median "
                                                                       f"{cl['median']:.0f}, p90 {cl['p90']:.0f}"
                                                                       if cl.get("mean") is not None else "")
                        if text != "synthetic" else "Captions: synthetic (random ids, EOT at a uniform random "
                                                    "position)") + ". text rows = sum of the text lengths run.")
    trim = {True: "yes", False: "no", None: "–"}
    body = [[r["preset"], trim[r.get("trim")], str(r["batch"]), _f(r.get("text_rows"), "d"),
             _f(r.get("tokens_packed"), "d"), _f(r["packed_ms"], ".1f"),
             _f(r.get("packed_iqr_ms"), ".1f"), _f(r["per_tower_ms"], ".1f"), _f(r.get("per_tower_iqr_ms"), ".1f"),
             _f(r.get("repeats"), "d"), _f(r["ratio"], ".2f"), _f(r.get("loss_diff"), ".1e")] for r in doc["rows"]]
    lines += _table(["preset", "trim", "batch", "text rows", "packed rows T", "packed step (ms)", "IQR",
                     "per-tower step (ms)", "IQR", "timed steps", "ratio per-tower/packed", "first-step loss diff"],
                    body, "---|---|" + "---:|" * 10)
    return lines


def _trim_body(doc: dict) -> list[str]:
    s = doc.get("settings", {})
    cl = s.get("corpus_lengths") or {}
    corpus = (f" Corpus: {cl.get('n', '?')} captions, `eot + 1` mean {_f(cl.get('mean'), '.1f')}, median "
              f"{_f(cl.get('median'), '.0f')}, p90 {_f(cl.get('p90'), '.0f')}, p99 {_f(cl.get('p99'), '.0f')}, max "
              f"{_f(cl.get('max'), 'd')} of 77" + (f" ({cl['cut_at_context']:.2%} cut at the context length)"
                                                  if cl.get("cut_at_context") else "") + "." if cl else "")
    lines = [
        "The same model with the text tower trimmed at each caption's EOT (`trim_text=True`, the default: "
        "caption b runs its own `eot + 1` tokens) and padded to the context length (`trim_text=False`), "
        "identical weights, the same batch: random pixels and a seeded sample of the captions from "
        f"{s.get('captions', '?')}, tokenized with the CLIP tokenizer, `text_lengths` from the CPU tokens."
        + corpus + " GFLOP/sample: forward + backward of one training step (`FlopCounterMode`: matmuls, "
        "attention, convolutions; not the optimizer); text and image = `encode_text` / `encode_image` "
        "forward + backward counted alone (text includes the shared blocks' text rows). Step = forward + "
        f"ClipLoss + backward + AdamW step, {s.get('dtype', 'fp32')}, every op on the "
        f"`{s.get('backend', 'reference')}` backend; trimmed and padded steps alternate in one process; "
        "medians (IQR) over the timed steps. Ratios = padded / trimmed (> 1: trimming is cheaper).",
        "",
    ]
    rows = doc["rows"]
    body = [[r["preset"], str(r["batch"]), "yes" if r.get("packed") else "no",
             f"{_f(r.get('len_mean'), '.1f')} / {_f(r.get('len_median'), '.0f')} / {_f(r.get('len_p90'), '.0f')}",
             _f(r["gflop_trimmed"], ".2f"), _f(r["gflop_padded"], ".2f"), _f(r["flop_ratio"], ".2f") + "x",
             _f(r.get("text_gflop_trimmed"), ".2f"), _f(r.get("text_gflop_padded"), ".2f"),
             _f(r.get("image_gflop"), ".2f")] for r in rows]
    lines += _table(["preset", "batch", "packed", "batch eot+1 mean / median / p90", "GFLOP/sample trimmed",
                     "padded", "FLOP ratio", "text GFLOP trimmed", "text padded", "image GFLOP"], body,
                    "---|---:|---|---:|---:|---:|---:|---:|---:|---:|")
    lines.append("")
    body = [[r["preset"], f"{_f(r['trimmed_ms'], '.0f')} ({_f(r.get('trimmed_iqr_ms'), '.0f')})",
             f"{_f(r['padded_ms'], '.0f')} ({_f(r.get('padded_iqr_ms'), '.0f')})", _f(r["time_ratio"], ".2f") + "x",
             f"{_f(r.get('trimmed_fwd_ms'), '.0f')} / {_f(r.get('trimmed_bwd_ms'), '.0f')} / "
             f"{_f(r.get('trimmed_opt_ms'), '.0f')}",
             f"{_f(r.get('padded_fwd_ms'), '.0f')} / {_f(r.get('padded_bwd_ms'), '.0f')} / "
             f"{_f(r.get('padded_opt_ms'), '.0f')}",
             _f(r.get("text_trimmed_ms"), ".0f"), _f(r.get("text_padded_ms"), ".0f"),
             _f(r.get("text_time_ratio"), ".2f") + ("x" if r.get("text_time_ratio") is not None else ""),
             _f(r.get("image_ms"), ".0f"), _f(r.get("repeats"), "d"), _f(r.get("cpu_share"), ".2f"),
             _f(r.get("loss_diff"), ".1e")] for r in rows]
    lines += _table(["preset", "step trimmed ms (IQR)", "step padded ms (IQR)", "time ratio",
                     "trimmed fwd / bwd / AdamW ms", "padded fwd / bwd / AdamW ms", "text tower alone trimmed ms",
                     "padded", "text time ratio", "image tower alone ms", "timed steps", "CPU share",
                     "first-step loss diff"], body)
    notes = [f"- {r['preset']}: {r['note']}" for r in rows if r.get("note")]
    if notes:
        lines += ["", "Where the time goes (each row's `note`, from its own measurements):", ""] + notes
    return lines


_CONFIG_TEXT = {"plain": "plain (K=1, B=N)", "plain_ckpt": "plain + checkpointing", "exact": "exact accumulation",
                "exact_ckpt": "exact + checkpointing"}


def _accum_body(doc: dict) -> list[str]:
    s = doc.get("settings", {})
    gpu = doc["meta"]["device"] == "cuda"
    tl = s.get("text_lengths") or {}
    mem = ("peak = `torch.cuda.max_memory_allocated` during the step (trials in one process on one model), own = "
           "peak - allocated before it; a CUDA OOM counts as not fitting" if gpu else
           "each trial in a process of its own (forked from a server that imported torch once); peak = the "
           "process's peak RSS during the step (VmHWM reset just before it), own = peak - RSS just before the "
           "step (the model, AdamW state, the step's inputs are in the RSS before)")
    lines = [
        f"One optimizer step of {s.get('preset', '?')} ({s.get('precision', '?')}, backend "
        f"`{s.get('backend', 'auto')}`) = `TorchEngine` + `train_step(engine, micro_batches, mode)`, AdamW, "
        f"on random pixels and captions with realistic lengths ({s.get('text', '?')}; `eot + 1` mean "
        f"{_f(tl.get('mean'), '.1f')}, median {_f(tl.get('median'), '.0f')}). Configurations at contrastive batch N: "
        "plain = one micro-batch of N; exact = exact accumulation (feature caching, GradCache), K = N / B "
        f"micro-batches of B = {s.get('micro_batch', '?')}; `_ckpt` = with activation checkpointing. Memory: "
        f"{mem}. Budget {_f(s.get('budget_mib'), '.0f')} MiB ({s.get('budget_source', '?')}), applied to the peak. "
        f"Search: N doubles from {s.get('start_batch', '?')} until a step does not fit, --max-batch "
        f"{s.get('max_batch', '?')} or the time limit ({_f(s.get('time_limit_s'), '.0f')} s for the run), then "
        + (f"up to {s['bisect_steps']} bisection steps between the last fit and the first miss, on the grid of B; "
           if s.get("bisect_steps") else "no bisection; ")
        + "every trial warms up with a 2-sample step first.",
        "",
    ]
    largest = doc.get("largest") or []
    body = []
    for x in largest:
        n = x.get("largest_n")
        cell = "none" if n is None else (">= " if x.get("capped") else "") + str(n)
        k = x.get("accum_steps_at_largest")
        split = "–" if n is None else f"{k} x {n // k if k else n}"
        ext = (f"~{x['extrapolated_n']} ({x['mib_per_sample']:.2f} MiB/sample)" if x.get("extrapolated_n")
               else "–")
        vs = x.get("vs_plain")
        body.append([_CONFIG_TEXT.get(x["config"], x["config"]), cell, split, _f(x.get("peak_mib_at_largest"), ".0f"),
                     _f(x.get("step_mib_at_largest"), ".0f"),
                     "–" if vs is None else (">= " if x.get("capped") else "") + f"{vs:.2f}x",
                     x.get("stopped") or "–", str(x.get("trials", "–")), ext])
    if body:
        lines += _table(["configuration", "largest N that fits", "K x B there", "peak MiB", "step's own MiB",
                         "vs plain", "search stopped by", "trials", "extrapolated largest N (not measured)"],
                        body, "---|---:|---:|---:|---:|---:|---|---:|---:|")
    else:
        lines.append("No memory search ran.")
    lines += ["", "Every trial (peak and own memory in MiB, the step's time in s):", ""]
    body = [[r["config"], str(r["n"]), f"{r.get('accum_steps', '?')} x {r.get('micro_batch', '?')}",
             "yes" if r["fits"] else "no", _f(r.get("peak_mib"), ".0f"), _f(r.get("step_mib"), ".0f"),
             _f(r.get("before_mib"), ".0f"), _f(r.get("step_s"), ".2f"),
             ("calibration (sets the budget)" if r.get("calibration") else "")
             + (r.get("error") or "").replace("|", "/")]
            for r in doc["rows"]]
    lines += _table(["config", "N", "K x B", "fits", "peak", "own", "before", "step s", "note"], body,
                    "---|---:|---:|---|---:|---:|---:|---:|---|")
    timing = doc.get("timing") or []
    if timing:
        lines += ["", f"Step time at N = {timing[0]['n']}: the variants alternate round by round in one process on "
                  "one model (same weights, same samples); median (IQR) of "
                  f"{timing[0].get('repeats', '?')} single steps each"
                  + ("; GFLOP = forward + backward FLOPs counted by `FlopCounterMode` in one extra step "
                     "(recomputation included, not the optimizer)" if any(t.get("gflop") for t in timing) else "")
                  + (f"; CPU share {timing[0]['cpu_share']:.2f} (process CPU time / (wall x threads); well below 1: "
                     "other processes held the cores)" if timing[0].get("cpu_share") is not None else "") + ".", ""]
        body = [[t["variant"], t["mode"], f"{t['accum_steps']} x {t['micro_batch']}", "yes" if t.get("ckpt") else "no",
                 f"{_f(t['median_ms'], '.0f')} ({_f(t.get('iqr_ms'), '.0f')})", _f(t.get("gflop"), ".1f")]
                for t in timing]
        lines += _table(["variant", "accumulation", "K x B", "checkpointing", "step ms (IQR)", "GFLOP"], body,
                        "---|---|---:|---|---:|---:|")
        ratios = doc.get("ratios") or {}
        if ratios:
            lines += [""]
            body = [[f"{r['num']} / {r['den']}", f"{r['time_ratio']:.2f}x" if r.get("time_ratio") else "–",
                     f"{r['round_ratio_median']:.2f}x ({r['round_ratio_min']:.2f}-{r['round_ratio_max']:.2f})"
                     if r.get("round_ratio_median") else "–",
                     f"{r['flop_ratio']:.2f}x" if r.get("flop_ratio") else "–"] for r in ratios.values()]
            lines += _table(["ratio", "step time (of the medians)", "same-round ratios: median (min-max)",
                             "counted FLOPs"], body, "---|---:|---:|---:|")
    if s.get("expectation"):
        lines += ["", f"Expectation (not a measurement): {s['expectation']}"]
    return lines


def _data_body(doc: dict) -> list[str]:
    s = doc.get("settings", {})
    dev = s.get("dali_device")
    lines = [
        f"Images/s of `build_loader` at {s.get('image_size', '?')} px over {s.get('shards', '?')} shards "
        f"({_f(s.get('samples'), 'd', '?')} samples, {s.get('source', '?')}, stored at "
        f"{s.get('shard_image_size', '?')} px), batch {s.get('batch_size', '?')}, the same thread count for both "
        f"backends: {s.get('threads', '?')} (torch: DataLoader `num_workers`, Pillow decoding; DALI "
        + (f"{s['dali_version']}: `num_threads`, decoding on "
           f"{'the GPU (mixed, nvJPEG)' if dev == 'mixed' else 'the CPU' if dev == 'cpu' else '–'}, reading the "
           "shards through the index" if s.get("dali_version") else "(not importable): `num_threads`")
        + "). Train = random-resized-crop, eval = resize + center crop. Each measurement is a "
        f"fresh `iter()`; the first {s.get('warmup', '?')} batches (start-up: `first batch s`) are excluded, then "
        f"{s.get('batches', '?')} batches timed; {s.get('repeats', '?')} rounds, backends alternating within a "
        "round; median (IQR) over the rounds. Ratio = DALI / torch images/s (> 1: DALI faster): of the medians, "
        "and the median of the same-round ratios. Load from other processes on a shared machine hits both alike "
        "but lowers both.",
        "",
    ]
    body = []
    for r in doc["rows"]:
        st = r["status"]
        cell = (lambda k, spec: _f(r.get(k), spec)) if st == "ok" else (lambda k, spec: "FAIL" if st == "failed"
                                                                          else "not run")
        body.append([r["backend"], r["mode"], r.get("decoder") or "–", cell("images_per_s", ".1f"),
                     cell("iqr_images_per_s", ".1f"),
                     f"{r['ratio']:.2f}x" if r.get("ratio") is not None else "–",
                     f"{r['round_ratio_median']:.2f}x" if r.get("round_ratio_median") is not None else "–",
                     cell("startup_s", ".2f"), _f(r.get("repeats"), "d") if st == "ok" else "–"])
    lines += _table(["backend", "mode", "decoder", "images/s (median)", "IQR", "ratio DALI/torch",
                     "same-round ratio", "first batch s", "rounds"], body, "---|---|---|---:|---:|---:|---:|---:|---:|")
    idx = doc.get("index") or []
    ok = [x for x in idx if x.get("status") == "ok"]
    if ok:
        lines += [""]
        for x in ok:
            what = ("trusted (make_shards' own build: tar headers only, one shard after the other)"
                    if x["kind"] == "trusted" else
                    f"validating (`build_index(..., force=True)`, {x.get('workers', '?')} workers: every image "
                    "decoded once)")
            extra = ""
            if x.get("fallback") or x.get("skipped"):
                extra = "; " + ", ".join([f"{n} fallback ({k})" for k, n in (x.get("fallback") or {}).items()]
                                         + [f"{n} skipped ({k})" for k, n in (x.get("skipped") or {}).items()])
            lines.append(f"- Index build, {what}: {_f(x.get('seconds'), '.2f')} s for {x.get('shards')} shards / "
                         f"{x.get('samples')} samples = {_f(x.get('shards_per_s'), '.3g')} shards/s, "
                         f"{_f(x.get('samples_per_s'), '.0f')} samples/s{extra}.")
    if s.get("make_shards_s") is not None:
        lines.append(f"- make_shards itself (not part of any figure): {s['make_shards_s']:.1f} s.")
    notes = [f"{k}: {v}" for k, v in (doc.get("not_run") or {}).items() if k != "all"]
    notes += [f"index {x['kind']}: {x['reason']}" for x in idx if x.get("status") == "not_run" and x.get("reason")
              and not (doc.get("not_run") or {}).get("all")]
    if (doc.get("not_run") or {}).get("all"):
        notes.insert(0, f"everything: {doc['not_run']['all']}")
    if notes:
        lines += ["", "Not run: " + "; ".join(dict.fromkeys(n.replace("|", "/") for n in notes)) + "."]
    return lines


_BODY = {"loss": _loss_body, "siglip": _loss_body, "ops": _ops_body, "train_step": _train_step_body,
         "packed": _packed_body, "trim": _trim_body, "accum": _accum_body, "data": _data_body}


def title(doc: dict) -> str:
    s = doc.get("settings", {})
    dev = "GPU" if doc["meta"]["device"] == "cuda" else "CPU"
    extra = {"loss": s.get("dtype"), "siglip": s.get("dtype"),
             "ops": f"{s.get('dtype', '')}{', smoke' if s.get('smoke') else ''}",
             "train_step": None, "packed": ", ".join(s.get("presets") or []) or None, "trim": None,
             "accum": ", ".join(x for x in (s.get("preset"), s.get("precision"), "smoke" if s.get("smoke") else None)
                                if x) or None,
             "data": f"{s.get('threads', '?')} threads"}[doc["benchmark"]]
    return f"{TITLES[doc['benchmark']]} ({dev}{', ' + extra if extra else ''})"


def render_doc(doc: dict, source: str | None = None, chart: str | None = None, level: int = 3) -> str:
    """Markdown of one results document: heading, run bullets, chart, table, notes."""
    validate(doc, source or "<doc>")
    lines = ["#" * level + " " + title(doc), ""]
    lines += meta_lines(doc)
    if source:
        lines.append(f"- Data: `{source}`")
    lines.append("")
    if chart:
        lines += [f"![{title(doc)}]({chart})", ""]
    lines += _BODY[doc["benchmark"]](doc)
    if doc["benchmark"] in ("loss", "siglip", "ops", "data"):  # the others' headline repeats a table column
        lines += _headline_lines(doc)
    lines += _failure_lines(doc)
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- charts


def _plt():
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _chart_loss(plt, doc: dict, path: Path) -> bool:
    ok = [r for r in doc["rows"] if r["status"] == "ok"]
    if not ok:
        return False
    impls = list(dict.fromkeys(r["impl"] for r in ok))
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for key, ax, label in (("time_s", axes[0], "forward + backward time (s)"),
                           ("peak_mib", axes[1], "peak memory over inputs (MiB)")):
        for i in impls:
            pts = sorted((r["n"], r[key]) for r in ok if r["impl"] == i and r[key] is not None and r[key] > 0)
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=i)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ns = sorted({r["n"] for r in ok})
        ax.set_xticks(ns)
        ax.set_xticklabels([str(n) for n in ns])
        ax.tick_params(axis="x", which="minor", bottom=False, labelbottom=False)
        ax.set_xlabel("N (pairs)")
        ax.set_ylabel(label)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    s = doc.get("settings", {})
    if doc["benchmark"] == "siglip":
        ax = axes[1]
        for i in ("fused", "triton"):  # the 64 MiB goal is about what the loss holds beyond the gradients
            pts = sorted((r["n"], r["beyond_grads_mib"]) for r in ok
                         if r["impl"] == i and (r.get("beyond_grads_mib") or 0) > 0)
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="x", ls="--", label=f"{i} beyond grads")
        ax.axhline(64, color="gray", lw=0.8, ls=":", label="goal: 64 MiB beyond grads")
        ax.legend()
    fig.suptitle(f"{TITLES[doc['benchmark']]}, D={s.get('dim')}, {s.get('dtype')}, {doc['meta']['device']} "
                 f"({doc['meta']['machine'].get('gpu') or doc['meta']['machine'].get('cpu')})", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    return True


def _chart_ops(plt, doc: dict, path: Path) -> bool:
    rows = [r for r in doc["rows"] if r.get("ratio") and r["impl"] not in ("ours", "*")]
    if not rows:
        return False
    modes = [m for m in ("fwd", "fwd+bwd") if any(r["mode"] == m for r in rows)]
    labels = list(dict.fromkeys(f"{r['op']}: {r['case']} | {r['impl']}" for r in rows))
    ratio = {(f"{r['op']}: {r['case']} | {r['impl']}", r["mode"]): r["ratio"] for r in rows}
    fig, ax = plt.subplots(figsize=(10, 0.42 * len(labels) + 1.6))
    h = 0.8 / len(modes)
    for k, mode in enumerate(modes):
        ys, vals = [], []
        for j, lab in enumerate(labels):
            if (lab, mode) in ratio:
                ys.append(len(labels) - 1 - j + (len(modes) / 2 - k - 0.5) * h)
                vals.append(ratio[(lab, mode)])
        # bars grow from 1 (parity) to the ratio, so faster and slower read as right and left
        ax.barh(ys, [v - 1 for v in vals], h, left=1.0, label=mode, color=("tab:blue", "tab:orange")[k % 2])
    ax.set_yticks(range(len(labels)))
    ax.set_yticklabels(labels[::-1], fontsize=8)
    ax.axvline(1.0, color="black", lw=0.8)
    ax.set_xscale("log")
    ax.set_xlabel("peer time / ours (> 1: ours faster; log scale)")
    ax.grid(True, axis="x", which="both", alpha=0.3)
    ax.legend(fontsize=8)
    s = doc.get("settings", {})
    ax.set_title(f"Ops vs PyTorch, {s.get('dtype')}, {doc['meta']['device']}, ours = backend {s.get('backend')}"
                 + (" (Triton interpreter)" if s.get("interpreter") else ""), fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    return True


def _chart_train_step(plt, doc: dict, path: Path) -> bool:
    rows = [r for r in doc["rows"] if r.get("samples_per_s")]
    if not rows:
        return False
    fig, ax = plt.subplots(figsize=(7, 0.32 * len(rows) + 1.6))
    y = list(range(len(rows)))[::-1]
    for yy, r in zip(y, rows):  # a dot plot: tiny and full presets differ ~100x, so log x (bars would mislead)
        tiny = r["preset"].endswith("-tiny")
        ax.plot([r["samples_per_s"]], [yy], "o", color="tab:blue" if tiny else "tab:orange")
        ax.annotate(f"{r['samples_per_s']:.3g}", (r["samples_per_s"], yy), xytext=(6, -3),
                    textcoords="offset points", fontsize=7)
    ax.set_yticks(y)
    ax.set_yticklabels([f"{r['preset']} (batch {r['batch']})" for r in rows], fontsize=8)
    ax.set_xscale("log")
    lo, hi = min(r["samples_per_s"] for r in rows), max(r["samples_per_s"] for r in rows)
    ax.set_xlim(lo / 1.6, hi * 2.2)
    ax.set_xlabel("samples/s (log scale; blue: tiny presets, orange: full size)")
    ax.grid(True, axis="x", which="both", alpha=0.3)
    ax.set_title(f"Train step throughput, {doc['meta']['device']}, backend "
                 f"{doc.get('settings', {}).get('backend', 'reference')}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    return True


def _chart_packed(plt, doc: dict, path: Path) -> bool:
    rows = doc["rows"]
    if not rows:
        return False
    fig, ax = plt.subplots(figsize=(7, 0.7 * len(rows) + 1.8))
    y = list(range(len(rows)))[::-1]
    h = 0.38
    for off, key, label in ((h / 2, "packed", "packed"), (-h / 2, "per_tower", "per-tower")):
        vals = [r[f"{key}_ms"] for r in rows]
        half_iqr = [(r.get(f"{key}_iqr_ms") or 0) / 2 for r in rows]
        ax.barh([v + off for v in y], vals, h, xerr=half_iqr, capsize=3, label=label)
    ax.set_yticks(y)
    trim = {True: ", trimmed", False: ", padded", None: ""}
    ax.set_yticklabels([f"{r['preset']}{trim[r.get('trim')]} (batch {r['batch']})\nratio {r['ratio']:.2f}"
                        for r in rows], fontsize=8)
    ax.set_xlabel("train step median (ms); whiskers: +/- IQR/2")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax.set_title(f"Packed vs per-tower, {doc['meta']['device']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    return True


def _chart_trim(plt, doc: dict, path: Path) -> bool:
    rows = doc["rows"]
    if not rows:
        return False
    # one row of panels per preset (tiny and full-size presets differ ~100x in FLOPs and time)
    fig, axes = plt.subplots(len(rows), 2, figsize=(11, 1.7 * len(rows) + 1.0), squeeze=False)
    kinds = ("trimmed", "padded")
    for i, r in enumerate(rows):
        ax = axes[i][0]
        for yy, k in zip((1, 0), kinds):
            img, txt = r.get("image_gflop") or 0, r.get(f"text_gflop_{k}") or 0
            ax.barh(yy, img, color="tab:blue", label="image tower" if k == "trimmed" else None)
            ax.barh(yy, txt, left=img, color="tab:orange", label="text tower" if k == "trimmed" else None)
            ax.annotate(f"{r[f'gflop_{k}']:.3g}", (img + txt, yy), xytext=(4, -3), textcoords="offset points",
                        fontsize=7)
        ax.set_xlim(0, 1.15 * max(r["gflop_trimmed"], r["gflop_padded"]))
        ax.set_yticks((1, 0))
        ax.set_yticklabels([f"{r['preset']} {k}" for k in kinds], fontsize=8)
        ax.set_title(f"{r['preset']} (batch {r['batch']}): GFLOP/sample fwd+bwd, ratio {r['flop_ratio']:.2f}x",
                     fontsize=9)
        ax.set_ylim(-0.6, 2.1)
        if i == 0:
            ax.legend(fontsize=7, loc="upper right", ncol=2, frameon=False)
        ax = axes[i][1]
        for yy, k in zip((1, 0), kinds):
            left = 0.0
            for ph, color, lab in (("fwd", "tab:green", "forward + loss"), ("bwd", "tab:red", "backward"),
                                   ("opt", "tab:gray", "AdamW step")):
                v = r.get(f"{k}_{ph}_ms") or 0
                ax.barh(yy, v, left=left, color=color, label=lab if k == "trimmed" else None)
                left += v
            ax.annotate(f"{r[f'{k}_ms']:.0f} ms", (left, yy), xytext=(4, -3), textcoords="offset points",
                        fontsize=7)
        ax.set_xlim(0, 1.2 * max(r["trimmed_ms"], r["padded_ms"], 1e-9))
        ax.set_yticks((1, 0))
        ax.set_yticklabels([])
        ax.set_title(f"step time (median of phases), ratio {r['time_ratio']:.2f}x", fontsize=9)
        ax.set_ylim(-0.6, 2.1)
        if i == 0:
            ax.legend(fontsize=7, loc="upper right", ncol=3, frameon=False)
    axes[-1][0].set_xlabel("GFLOP/sample, forward + backward")
    axes[-1][1].set_xlabel("train step (ms)")
    fig.suptitle(f"Text trimmed at EOT vs padded, {doc['meta']['device']}, backend "
                 f"{doc.get('settings', {}).get('backend', 'reference')}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    return True


def _chart_accum(plt, doc: dict, path: Path) -> bool:
    largest = [x for x in doc.get("largest") or [] if x.get("largest_n")]
    timing = doc.get("timing") or []
    if not largest and not timing:
        return False
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.2))
    ax = axes[0]
    y = list(range(len(largest)))[::-1]
    for yy, x in zip(y, largest):
        ax.barh(yy, x["largest_n"], color="tab:blue", hatch="//" if x.get("capped") else None,
                edgecolor="white" if x.get("capped") else None)
        ax.annotate((">= " if x.get("capped") else "") + str(x["largest_n"]), (x["largest_n"], yy), xytext=(4, -3),
                    textcoords="offset points", fontsize=7)
    ax.set_yticks(y)
    ax.set_yticklabels([x["config"] for x in largest], fontsize=8)
    ax.set_xscale("log", base=2)
    if largest:  # bars on a log axis start at its left edge: one doubling below the smallest
        ax.set_xlim(min(x["largest_n"] for x in largest) / 2, 3 * max(x["largest_n"] for x in largest))
    ax.set_xlabel("largest contrastive batch N in the budget (hatched: capped, still fitting)")
    s = doc.get("settings", {})
    ax.set_title(f"{s.get('preset')}, budget {s.get('budget_mib', 0):.0f} MiB", fontsize=9)
    ax = axes[1]
    y = list(range(len(timing)))[::-1]
    for yy, t in zip(y, timing):
        ax.barh(yy, t["median_ms"], xerr=(t.get("iqr_ms") or 0) / 2, capsize=3, color="tab:orange")
        ax.annotate(f"{t['median_ms']:.0f} ms", (t["median_ms"] + (t.get("iqr_ms") or 0) / 2, yy), xytext=(6, -3),
                    textcoords="offset points", fontsize=7)
    ax.set_yticks(y)
    ax.set_yticklabels([f"{t['variant']} ({t['accum_steps']}x{t['micro_batch']})" for t in timing], fontsize=8)
    ax.set_xlabel("step time, median (ms); whiskers +/- IQR/2")
    if timing:
        ax.set_xlim(0, 1.25 * max(t["median_ms"] for t in timing))
        ax.set_title(f"step time at N = {timing[0]['n']}", fontsize=9)
    fig.suptitle(f"Exact accumulation and checkpointing, {doc['meta']['device']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    return True


def _chart_data(plt, doc: dict, path: Path) -> bool:
    rows = [r for r in doc["rows"] if r["status"] == "ok" and r.get("images_per_s")]
    if not rows:
        return False
    modes = list(dict.fromkeys(r["mode"] for r in rows))
    fig, ax = plt.subplots(figsize=(7, 0.9 * len(modes) + 1.6))
    h = 0.38
    for k, (b, color) in enumerate((("torch", "tab:orange"), ("dali", "tab:blue"))):
        pts = [(len(modes) - 1 - j + (h / 2 if k == 0 else -h / 2), r) for j, m in enumerate(modes)
               for r in rows if r["mode"] == m and r["backend"] == b]
        if pts:
            ax.barh([y for y, _ in pts], [r["images_per_s"] for _, r in pts], h,
                    xerr=[(r.get("iqr_images_per_s") or 0) / 2 for _, r in pts], capsize=3, color=color,
                    label=f"{b} ({pts[0][1].get('decoder')})")
            for y, r in pts:
                ax.annotate(f"{r['images_per_s']:.0f}", (r["images_per_s"], y), xytext=(6, -3),
                            textcoords="offset points", fontsize=7)
    ax.set_yticks(range(len(modes)))
    ax.set_yticklabels(modes[::-1])
    ax.set_xlim(0, 1.55 * max(r["images_per_s"] for r in rows))
    ax.set_xlabel("images/s (median over rounds; whiskers +/- IQR/2)")
    ax.legend(fontsize=8, loc="center right")
    s = doc.get("settings", {})
    ax.set_title(f"Input pipeline at {s.get('image_size')} px, {s.get('threads')} threads, {doc['meta']['device']}",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    return True


_CHART = {"loss": _chart_loss, "siglip": _chart_loss, "ops": _chart_ops, "train_step": _chart_train_step,
          "packed": _chart_packed, "trim": _chart_trim, "accum": _chart_accum, "data": _chart_data}


def draw_chart(doc: dict, path: Path) -> bool:
    """Draw ``doc``'s chart to ``path`` (PNG); False when there is nothing to draw. Raises
    ImportError without matplotlib."""
    plt = _plt()
    if plt is None:
        raise ImportError("matplotlib is not importable")
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        return _CHART[doc["benchmark"]](plt, doc, path)
    finally:
        plt.close("all")


# ----------------------------------------------------------------------------- report


def _rel(target: Path, base_dir: Path) -> str:
    return Path(os.path.relpath(target.resolve(), base_dir.resolve())).as_posix()


def build(docs: list[tuple[Path, dict]], charts_dir: Path | None, md_dir: Path) -> tuple[str, list[Path]]:
    """The bench_report region (with markers) and the chart files written."""
    written: list[Path] = []
    chart_note = None
    if charts_dir is not None and _plt() is None:
        chart_note = "Charts were not drawn: matplotlib is not importable in the Python that ran the report."
        charts_dir = None
    sections = {"cpu": [], "cuda": []}
    for path, doc in docs:
        chart = None
        if charts_dir is not None:
            png = Path(charts_dir) / f"{path.stem}.png"
            if draw_chart(doc, png):
                written.append(png)
                chart = _rel(png, md_dir)
        src = _rel(path, md_dir)
        sections[doc["meta"]["device"]].append(render_doc(doc, source=src, chart=chart))
    cmd = "python -m bench.report --write bench/RESULTS.md --charts bench/charts"
    lines = [BEGIN, "",
             f"Generated by `{cmd}` from the JSON files in `bench/results/` (one file per benchmark run; the "
             "schema and the commands that re-measure them are in `bench/report.py`). Every number comes "
             "from the command listed with its table; CPU and GPU results are kept apart.", ""]
    if chart_note:
        lines += [chart_note, ""]
    lines += ["## CPU results", ""]
    lines += sections["cpu"] or ["No CPU results in bench/results/.", ""]
    lines += ["## GPU results", ""]
    lines += sections["cuda"] or ["No GPU results yet: no JSON with `meta.device` = `cuda` in bench/results/ "
                                  "(no benchmark has run on a GPU).", ""]
    text = "\n".join(lines).rstrip("\n") + "\n\n" + END + "\n"
    return text, written


def write_region(path: Path, region: str) -> None:
    """Replace the bench_report region of ``path`` (or append it; create the file with a title
    when absent), leaving everything else, e.g. the kernel_report section, as it is."""
    try:
        _common.replace_section(Path(path), region, NAME)
    except ValueError as e:
        raise ReportError(str(e)) from None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.report", description=__doc__.split("\n\n")[0])
    p.add_argument("--results-dir", type=Path, default=_common.RESULTS_DIR,
                   help="folder of benchmark JSON files (default: bench/results)")
    p.add_argument("--write", type=Path, default=None, help="markdown file whose bench_report region to replace "
                                                            "(default: print to stdout)")
    p.add_argument("--charts", type=Path, default=None,
                   help="folder for the PNG charts (default: charts/ beside --write; none when printing)")
    p.add_argument("--no-charts", action="store_true", help="tables only")
    args = p.parse_args(argv)
    try:
        docs = load(args.results_dir)
        md_dir = (args.write.parent if args.write else Path.cwd())
        charts = None if args.no_charts else (args.charts or (args.write.parent / "charts" if args.write else None))
        region, written = build(docs, charts, md_dir)
        if args.write:
            write_region(args.write, region)
            print(f"wrote {args.write} ({len(docs)} result files, {len(written)} charts"
                  + (f" in {charts}" if written else "") + ")")
        else:
            sys.stdout.write(region)
    except ReportError as e:
        print(f"bench.report: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
