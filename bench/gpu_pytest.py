"""The pytest step of ``bench/gpu_check.sh``: run every ``gpu``-marked test, count Triton compiles.

Why not plain ``pytest -m gpu tests``: on the GPU machine (no deepspeed, open_clip, DALI,
webdataset) some test modules cannot be imported, and pytest exits 1 on collection errors even
with ``--continue-on-collection-errors``. So this runs in two phases:

one pytest run collects ``-m gpu`` over ``tests/`` past import errors and runs what it
collected; a module that fails to import is reported, and is an error only if its source holds
gpu tests (``mark.gpu`` or the ``DEVICES`` parameters). The exit status is computed here from
the test outcomes, not taken from pytest (which is 1 whenever any module failed to import).

Compile count: on CUDA, the number of kernels Triton compiled is counted in a fresh
``TRITON_CACHE_DIR`` (one ``*.cubin`` per compile), so the run is cold by construction. In
``--dry-run`` (CPU, ``TRITON_INTERPRET=1``) nothing compiles; a plugin records every kernel
launch and counts distinct specializations the way Triton keys its cache (kernel, constexpr
values, num_warps/num_stages, pointer dtypes and 16-byte alignment, int arguments equal to 1 or
divisible by 16 unless listed in ``do_not_specialize``), which predicts the GPU's count (the
interpreter's own tile constexprs stand in for the GPU's). Both counts go to ``--json``.

    python bench/gpu_pytest.py --json OUT/pytest_gpu.json [--dry-run] [--jobs N] [-- pytest args]
Exit status: 1 when a gpu test failed or errored, a gpu test module failed to import, or no
gpu test passed; pytest's own status when it stopped abnormally (usage or internal error).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


class Collector:
    """pytest plugin: the collected node ids and the modules that failed to import."""

    def __init__(self):
        self.items: list[str] = []
        self.errors: dict[str, str] = {}

    def pytest_collection_finish(self, session):
        self.items = [i.nodeid for i in session.items]

    def pytest_collectreport(self, report):
        if report.failed:
            self.errors[str(report.fspath)] = str(report.longrepr).strip().splitlines()[-1][:300]


class Outcomes:
    """pytest plugin: counts of passed/failed/skipped tests and the skip reasons."""

    def __init__(self):
        self.counts = {"passed": 0, "failed": 0, "skipped": 0, "error": 0}
        self.skips: dict[str, int] = {}

    def pytest_runtest_logreport(self, report):
        if report.when == "call" and report.passed:
            self.counts["passed"] += 1
        elif report.failed:
            self.counts["failed" if report.when == "call" else "error"] += 1
        elif report.skipped:
            self.counts["skipped"] += 1
            reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
            self.skips[reason] = self.skips.get(reason, 0) + 1


class LaunchCounter:
    """Counts distinct Triton specializations of interpreted launches (see the module docstring)."""

    def __init__(self):
        self.keys: set = set()
        self._orig = None

    def install(self) -> None:
        from triton.runtime.interpreter import InterpretedFunction

        counter, orig = self, InterpretedFunction.run
        self._orig = (InterpretedFunction, orig)

        def run(fn_self, *args, grid, warmup, **kwargs):
            counter.record(fn_self, args, kwargs)
            return orig(fn_self, *args, grid=grid, warmup=warmup, **kwargs)

        InterpretedFunction.run = run

    def uninstall(self) -> None:
        if self._orig:
            cls, orig = self._orig
            cls.run = orig

    @staticmethod
    def _spec(value, specialize: bool):
        if hasattr(value, "data_ptr") and hasattr(value, "dtype"):
            return ("ptr", str(value.dtype), value.data_ptr() % 16 == 0)
        if isinstance(value, bool):
            return ("bool", value)
        if isinstance(value, int):
            if not specialize:
                return ("int",)
            return ("int", value == 1, value % 16 == 0)
        if isinstance(value, float):
            return ("float",)
        return (type(value).__name__,)

    def record(self, fn_self, args, kwargs) -> None:
        import inspect

        params = list(inspect.signature(fn_self.fn).parameters.values())
        dns = set(fn_self.kwargs.get("do_not_specialize") or ())
        bound = dict(zip([p.name for p in params], args))
        bound.update({k: v for k, v in kwargs.items() if k in {p.name for p in params}})
        key = [fn_self.fn.__name__, kwargs.get("num_warps", 4), kwargs.get("num_stages", 3)]
        for p in params:
            v = bound.get(p.name, p.default)
            if "constexpr" in str(p.annotation):
                key.append((p.name, v))
            else:
                key.append((p.name, self._spec(v, p.name not in dns)))
        self.keys.add(tuple(key))


def _count_cubins(cache: Path) -> int:
    return sum(1 for _ in cache.rglob("*.cubin")) if cache.is_dir() else 0


def _holds_gpu_tests(path: str) -> bool:
    try:
        text = Path(path).read_text()
    except OSError:
        return True
    return re.search(r"mark\.gpu|\bDEVICES\b", text) is not None


def _finish(result: dict, rc: int, keys, a, where: str = "") -> int:
    """Add the predicted compile count (dry run: distinct launch ``keys``), write ``a.json``,
    print the one-line verdict; returns ``rc``."""
    if a.dry_run:
        result["launch_keys"] = sorted(keys)
        result["compiles_predicted"] = len(keys)
        by_kernel: dict[str, int] = {}
        for k in keys:
            name = k.split("'")[1]
            by_kernel[name] = by_kernel.get(name, 0) + 1
        result["compiles_by_kernel"] = dict(sorted(by_kernel.items()))
    result["rc"] = int(rc)
    a.json.parent.mkdir(parents=True, exist_ok=True)
    a.json.write_text(json.dumps(result, indent=1, sort_keys=True))
    n = result.get("compiles", result.get("compiles_predicted"))
    what = "predicted Triton compiles (interpreter launches)" if a.dry_run else "Triton compiles (cold cache)"
    print(f"gpu tests: {result.get('passed', 0)} passed, {result.get('failed', 0)} failed, "
          f"{result.get('skipped', 0)} skipped{where}; {what}: {n}")
    return int(rc)


def gpu_test_files(tests: Path) -> list[str]:
    """Test files whose source holds gpu tests, relative to the repository root."""
    return [str(f.relative_to(ROOT)) for f in sorted(tests.rglob("test_*.py")) if _holds_gpu_tests(str(f))]


def _shares(files: list[str], jobs: int) -> list[list[str]]:
    """Files dealt to ``jobs`` shares, largest first onto the lightest share (size ~ work)."""
    shares: list[list] = [[0, []] for _ in range(jobs)]
    for f in sorted(files, key=lambda f: -(ROOT / f).stat().st_size):
        s = min(shares, key=lambda x: x[0])
        s[0] += (ROOT / f).stat().st_size
        s[1].append(f)
    return [s[1] for s in shares if s[1]]


def run_shards(a) -> int:
    """Run the shares in parallel subprocesses and merge their JSON (sums of counts, union of
    predicted launch keys; the cubin count over the shared cache covers all of them)."""
    import subprocess

    cache = Path(os.environ.setdefault("TRITON_CACHE_DIR", str(ROOT / "build" / "triton_cache_gpu_check")))
    before = _count_cubins(cache)
    a.json.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    procs = []
    for i, files in enumerate(_shares(a.tests, a.jobs)):
        part = a.json.with_name(f"{a.json.stem}.part{i}.json")
        log = open(a.json.with_name(f"{a.json.stem}.part{i}.log"), "w")
        cmd = [sys.executable, __file__, "--json", str(part), *(["--dry-run"] if a.dry_run else []),
               "--tests", *files, "--", *a.pytest_args]
        print(f"share {i}: {' '.join(files)}", flush=True)
        procs.append((subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT), part, log))
    merged: dict = {"dry_run": a.dry_run, "shares": len(procs), "import_errors": {}, "fatal_import_errors": {},
                    "skip_reasons": {}}
    keys: set = set()
    rc = 0
    for proc, part, log in procs:
        prc = proc.wait()
        log.close()
        sys.stdout.write(Path(log.name).read_text()[-4000:])
        rc = rc or prc
        if not part.exists():
            rc = rc or 1
            continue
        r = json.loads(part.read_text())
        for k in ("collected", "passed", "failed", "skipped", "error"):
            merged[k] = merged.get(k, 0) + r.get(k, 0)
        for k in ("import_errors", "fatal_import_errors"):
            merged[k].update(r.get(k, {}))
        for reason, n in r.get("skip_reasons", {}).items():
            merged["skip_reasons"][reason] = merged["skip_reasons"].get(reason, 0) + n
        keys.update(r.get("launch_keys", []))
    merged["seconds"] = round(time.time() - t0, 1)
    if not a.dry_run:
        merged["compiles"] = _count_cubins(cache) - before
    if merged.get("passed", 0) == 0:
        rc = rc or 1
    return _finish(merged, rc, keys, a, f" in {len(procs)} shares")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", type=Path, required=True, help="write counts, compile count and timings here")
    p.add_argument("--dry-run", action="store_true", help="CPU: gpu tests on CPU tensors through the interpreter")
    p.add_argument("--tests", nargs="+", default=None, help="test files (default: every file under tests/ "
                   "that holds gpu tests)")
    p.add_argument("--jobs", type=int, default=1, help="parallel pytest processes, one share of the files each "
                   "(Triton compiles are CPU-bound and serial within a process)")
    p.add_argument("pytest_args", nargs="*", help="extra pytest arguments (after --)")
    a = p.parse_args(argv)
    os.chdir(ROOT)
    if a.tests is None:
        a.tests = gpu_test_files(ROOT / "tests")
    if a.jobs > 1:
        return run_shards(a)
    import pytest

    if a.dry_run:
        os.environ["MSCLIP_FAST_GPU_DRY_RUN"] = "1"
        os.environ["TRITON_INTERPRET"] = "1"
    else:
        os.environ["MSCLIP_FAST_REQUIRE_GPU"] = "1"  # a gpu test whose needs are missing fails
    cache = Path(os.environ.setdefault("TRITON_CACHE_DIR", str(ROOT / "build" / "triton_cache_gpu_check")))
    before = _count_cubins(cache)
    base = ["-m", "gpu", "-p", "no:cacheprovider", "-q", "-rs"]

    t0 = time.time()
    col, out, counter = Collector(), Outcomes(), LaunchCounter()
    if a.dry_run:
        counter.install()
    try:
        prc = pytest.main([*base, "--continue-on-collection-errors", *a.pytest_args, *a.tests], plugins=[col, out])
    finally:
        counter.uninstall()
    fatal = {f: e for f, e in col.errors.items() if _holds_gpu_tests(f)}
    for f, e in sorted(col.errors.items()):
        print(f"{'ERROR' if f in fatal else 'note'}: not importable here: {os.path.relpath(f, ROOT)}: {e}")
    result = {"collected": len(col.items), "import_errors": col.errors, "fatal_import_errors": fatal,
              "dry_run": a.dry_run, "seconds": round(time.time() - t0, 1), "pytest_rc": int(prc),
              **out.counts, "skip_reasons": out.skips}
    if not a.dry_run:
        result["compiles"] = _count_cubins(cache) - before
    rc = 0
    if int(prc) not in (0, 1, 5):  # interrupted, internal error, usage error
        rc = int(prc)
    elif out.counts["failed"] or out.counts["error"] or fatal:
        rc = 1
    elif out.counts["passed"] == 0:
        print("ERROR: no gpu test passed")
        rc = 1
    return _finish(result, rc, {repr(k) for k in counter.keys}, a)


if __name__ == "__main__":
    sys.exit(main())
