"""Summary of one ``bench/gpu_check.sh`` run: ``OUT/summary.json`` and a readable ``OUT/summary.md``.

Reads what the steps left in OUT: ``status.txt`` (one ``NAME rc=R Ss limit=Ls`` line per step),
``budget.txt``, ``pytest_gpu.json`` (bench/gpu_pytest.py), ``bench_ops.json``, ``bench_loss.json``,
``bench_siglip.json``, ``bench_accum.json`` and ``bench_data.json`` (their ``headline`` numbers,
schema in bench/report.py), ``info.json``.
summary.json::

    {"dry_run": bool, "device": str, "date": ISO-8601 UTC, "commit": str, "total_s": int,
     "ok": bool, "steps": [{"step", "rc", "seconds", "limit_s", "note"}],
     "tests": {"passed", "failed", "skipped", "compiles" | "compiles_predicted", "budget_compiles"},
     "headline": {"ops.<key>": ratio, "loss.<key>": ratio, "siglip.<key>": ratio, "accum.<key>": number},
     "accum": {"budget_mib", "largest": {config: {"n", "capped", "stopped"}}} (when bench_accum ran),
     "data": {"ran", "dali_version", "dali_device", "not_run": {name: reason}, "note"} (bench_data:
             its JSON, or the status line saying why it did not run, e.g. no DALI on this machine),
     "problems": [str]}

Exit status 1 when any step failed, or (dry run) when the predicted compile count exceeds
bench/gpu_budget.json, whose number the GPU run budgets its pytest step from.

    python bench/gpu_summary.py OUT [--dry-run] [--total-s N]
"""
from __future__ import annotations

import argparse
import datetime
import json
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STATUS = re.compile(r"^(\w+) rc=(\d+) (\d+)s limit=(\d+)s(.*)$")


def _load(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def parse_status(text: str) -> list[dict]:
    """The step lines of status.txt (other lines are ignored)."""
    steps = []
    for line in text.splitlines():
        m = STATUS.match(line.strip())
        if m:
            steps.append({"step": m.group(1), "rc": int(m.group(2)), "seconds": int(m.group(3)),
                          "limit_s": int(m.group(4)), "note": m.group(5).strip(" ()")})
    return steps


def summarize(out: Path, dry_run: bool, total_s: int | None) -> dict:
    steps = parse_status((out / "status.txt").read_text() if (out / "status.txt").exists() else "")
    budget = _load(ROOT / "bench" / "gpu_budget.json")
    py = _load(out / "pytest_gpu.json")
    info = _load(out / "info.json")
    problems = [f"step {s['step']} failed (rc={s['rc']}{', time limit' if s['rc'] in (124, 137) else ''}): "
                f"see {s['step']}.log" for s in steps if s["rc"] != 0]
    expected = {"env", "build", "pytest_gpu", "bench_ops", "bench_loss", "bench_siglip", "bench_accum"}
    missing = expected - {s["step"] for s in steps}
    problems += [f"step {m} did not run" for m in sorted(missing)]
    tests = {k: py.get(k) for k in ("passed", "failed", "skipped", "compiles", "compiles_predicted") if k in py}
    tests["budget_compiles"] = budget.get("compiles")
    if dry_run and py.get("compiles_predicted", 0) > budget.get("compiles", 0):
        problems.append(f"predicted {py['compiles_predicted']} Triton compiles > budget {budget.get('compiles')} "
                        "(bench/gpu_budget.json): cut variants or raise the budget and the step limits")
    if py.get("fatal_import_errors"):
        problems += [f"gpu test module not importable: {k}: {v}" for k, v in py["fatal_import_errors"].items()]
    headline = {}
    for name in ("ops", "loss", "siglip", "accum", "data"):
        for k, v in (_load(out / f"bench_{name}.json").get("headline") or {}).items():
            headline[f"{name}.{k}"] = v
    try:
        commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    cuda = info.get("cuda") or {}
    devices = cuda.get("devices") or []
    device = ", ".join(str(d.get("name", d)) if isinstance(d, dict) else str(d) for d in devices) or \
        (f"no GPU ({cuda.get('reason')})" if cuda else "")
    return {
        "dry_run": dry_run,
        "device": device,
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "commit": commit,
        "total_s": total_s,
        "ok": not problems,
        "steps": steps,
        "tests": tests,
        "headline": headline,
        "accum": accum_summary(_load(out / "bench_accum.json")),
        "data": data_summary(_load(out / "bench_data.json"), steps),
        "problems": problems,
    }


def accum_summary(doc: dict) -> dict | None:
    """bench_accum's budget and largest batch per configuration (None when it did not write its JSON)."""
    if not doc.get("largest"):
        return None
    return {"budget_mib": (doc.get("settings") or {}).get("budget_mib"),
            "largest": {x["config"]: {"n": x.get("largest_n"), "capped": x.get("capped"), "stopped": x.get("stopped")}
                        for x in doc["largest"]}}


def data_summary(doc: dict, steps: list[dict]) -> dict | None:
    """bench_data's DALI version / decoder and what it did not run; without its JSON, the status
    line's note (e.g. DALI not importable: the DALI GPU figure needs a machine with DALI)."""
    step = next((x for x in steps if x["step"] == "bench_data"), None)
    if not doc:
        return None if step is None else {"ran": False, "dali_version": None, "dali_device": None, "not_run": {},
                                           "note": step["note"] or "no bench_data.json"}
    st = doc.get("settings") or {}
    nr = doc.get("not_run") or {}
    note = ("the DALI figure needs a machine with DALI: " + nr["dali"]) if "dali" in nr else ""
    return {"ran": True, "dali_version": st.get("dali_version"), "dali_device": st.get("dali_device"),
            "not_run": nr, "note": note}


def to_markdown(s: dict) -> str:
    kind = "DRY RUN on the CPU (interpreter, tiny sizes: no GPU numbers)" if s["dry_run"] else "GPU run"
    lines = [f"# gpu_check summary: {'OK' if s['ok'] else 'FAILED'}", "",
             f"- {kind}", f"- date {s['date']}, commit {s['commit']}, total {s['total_s']} s",
             f"- device: {s['device'] or 'unknown'}", "", "| step | rc | seconds | limit (s) | note |",
             "|---|---:|---:|---:|---|"]
    lines += [f"| {x['step']} | {x['rc']} | {x['seconds']} | {x['limit_s']} | {x['note']} |" for x in s["steps"]]
    t = s["tests"]
    compiles = (f"{t['compiles']} Triton compiles (cold cache)" if "compiles" in t
                else f"{t.get('compiles_predicted')} Triton compiles predicted")
    lines += ["", f"gpu tests: {t.get('passed')} passed, {t.get('failed')} failed, {t.get('skipped')} skipped; "
              f"{compiles} (budget {t.get('budget_compiles')})", ""]
    if s["headline"]:
        lines += ["| headline ratio | value |", "|---|---:|"]
        lines += [f"| {k} | {v:.3g} |" if isinstance(v, (int, float)) else f"| {k} | {v} |"
                  for k, v in sorted(s["headline"].items())]
    else:
        lines.append("no headline ratios (dry run, or the benchmarks did not finish)")
    a = s.get("accum")
    if a:
        budget = f"{a['budget_mib']:.0f} MiB" if isinstance(a.get("budget_mib"), (int, float)) else "?"
        lines += ["", f"bench_accum, largest contrastive batch in {budget}: " + "; ".join(
            f"{c} {'>= ' if x.get('capped') else ''}{x.get('n') if x.get('n') is not None else 'none'}"
            + f" ({x.get('stopped')})" for c, x in a["largest"].items())]
    d = s.get("data")
    if d:
        if not d["ran"]:
            lines += ["", f"bench_data: {d['note']}"]
        else:
            lines += ["", f"bench_data: DALI {d['dali_version'] or 'not importable'}, decoder {d['dali_device'] or '-'}"
                      + "".join(f"; not run: {k}: {v}" for k, v in d["not_run"].items())]
    if s["problems"]:
        lines += ["", "## Problems", *[f"- {p}" for p in s["problems"]]]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out", type=Path)
    p.add_argument("--dry-run", action="store_true")
    p.add_argument("--total-s", type=int, default=None)
    a = p.parse_args(argv)
    s = summarize(a.out, a.dry_run, a.total_s)
    (a.out / "summary.json").write_text(json.dumps(s, indent=1, sort_keys=True))
    md = to_markdown(s)
    (a.out / "summary.md").write_text(md)
    print(md)
    return 0 if s["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
