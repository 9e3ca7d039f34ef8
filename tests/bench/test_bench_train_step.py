"""Smoke test of bench/bench_train_step.py: one tiny preset, one timed step, nothing written."""
import os

import pytest

BENCH_SCRIPT = "bench_train_step"  # the `bench` fixture (conftest.py) loads bench/bench_train_step.py


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


def test_results_section_replaced_in_place(check_section_replaced):
    check_section_replaced("# Benchmark results\n\n## other bench\nkeep me\n")


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
