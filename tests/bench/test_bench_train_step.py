"""Smoke test of bench/bench_train_step.py: one tiny preset, one timed step, nothing written."""
import importlib.util
import os
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "bench" / "bench_train_step.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_train_step", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(mod)
    yield mod
    sys.modules.pop(spec.name, None)


def test_one_tiny_preset_without_writing(bench, tmp_path, capsys):
    out = tmp_path / "RESULTS.md"
    before = os.environ.get("MSCLIP_FAST_BACKEND")
    rows = bench.main(["--presets", "clip-tiny", "--batch-size", "4", "--warmup", "0",
                       "--repeats", "1", "--min-run-time", "0", "--out", str(out), "--no-write"])
    assert not out.exists()
    assert os.environ.get("MSCLIP_FAST_BACKEND") == before  # restored after the run
    (row,) = rows
    assert row.preset == "clip-tiny" and row.batch == 4 and row.timed_steps == 1
    assert row.samples_per_s > 0 and row.median_ms > 0
    assert row.gflop_per_sample > 0
    text = capsys.readouterr().out
    assert "| clip-tiny |" in text and bench.BEGIN in text and bench.END in text


def test_results_section_replaced_in_place(bench, tmp_path):
    out = tmp_path / "RESULTS.md"
    out.write_text("# Benchmark results\n\n## other bench\nkeep me\n")
    bench.write_results(out, f"{bench.BEGIN}\nfirst\n{bench.END}\n")
    bench.write_results(out, f"{bench.BEGIN}\nsecond\n{bench.END}\n")
    text = out.read_text()
    assert "keep me" in text and "second" in text and "first" not in text
    assert text.count(bench.BEGIN) == 1


def test_bad_arguments(bench):
    with pytest.raises(ValueError, match="presets"):
        bench.select_presets("no-such-model")
    with pytest.raises(ValueError, match="batch-size"):
        bench.main(["--presets", "clip-tiny", "--batch-size", "0", "--no-write"])


def test_time_budget_projection(bench):
    assert bench.estimate_seconds("clip-b32", {}) == 0.0
    assert bench.estimate_seconds("clip-b32", {"tiny": 10.0}) == 50.0
    assert bench.estimate_seconds("msclip-s-b16", {"tiny": 10.0, "b32": 40.0}) == 120.0
    assert bench.estimate_seconds("msclip-tiny", {"tiny": 3.0}) == 3.0
    full = bench.select_presets("full")
    assert full.index("clip-b32") < full.index("clip-b16")  # cheapest first
