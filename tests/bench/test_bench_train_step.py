"""Smoke test of bench/bench_train_step.py: one tiny preset, one timed step, JSON written."""
import json
import os

import pytest

BENCH_SCRIPT = "bench_train_step"  # the `bench` fixture (conftest.py) loads bench/bench_train_step.py


def test_one_tiny_preset_writes_json(bench, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("MSCLIP_FAST_BACKEND", raising=False)
    out = tmp_path / "train_step.json"
    before = os.environ.get("MSCLIP_FAST_BACKEND")
    rows = bench.main(["--presets", "clip-tiny", "--batch-size", "4", "--warmup", "0",
                       "--repeats", "1", "--min-run-time", "0", "--json", str(out)])
    assert os.environ.get("MSCLIP_FAST_BACKEND") == before  # restored after the run
    (row,) = rows
    assert row.preset == "clip-tiny" and row.batch == 4 and row.timed_steps == 1
    assert row.samples_per_s > 0 and row.median_ms > 0
    assert row.gflop_per_sample > 0
    doc = json.loads(out.read_text())
    assert doc["schema"] == 1 and doc["benchmark"] == "train_step" and doc["meta"]["device"] == "cpu"
    assert doc["rows"][0]["samples_per_s"] == row.samples_per_s and doc["settings"]["backend"] == "reference"
    assert "MSCLIP_FAST_BACKEND" not in doc["meta"]["command"]  # pinned by the script, not by the caller
    assert doc["headline"] == {"train_step_samples_per_s_clip-tiny": round(row.samples_per_s, 3)}
    assert "| clip-tiny |" in capsys.readouterr().out


def test_bad_arguments(bench):
    with pytest.raises(ValueError, match="presets"):
        bench.select_presets("no-such-model")
    with pytest.raises(ValueError, match="batch-size"):
        bench.main(["--presets", "clip-tiny", "--batch-size", "0"])


def test_time_budget_projection(bench):
    assert bench.estimate_seconds("clip-b32", {}) == 0.0
    assert bench.estimate_seconds("clip-b32", {"tiny": 10.0}) == 50.0
    assert bench.estimate_seconds("msclip-s-b16", {"tiny": 10.0, "b32": 40.0}) == 120.0
    assert bench.estimate_seconds("msclip-tiny", {"tiny": 3.0}) == 3.0
    full = bench.select_presets("full")
    assert full.index("clip-b32") < full.index("clip-b16")  # cheapest first
