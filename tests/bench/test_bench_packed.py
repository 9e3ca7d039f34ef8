"""Smoke test of bench/bench_packed.py: one preset, one timed step per mode, nothing written;
and its RESULTS.md section is replaced in place without touching other sections."""
import importlib.util
import os
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "bench" / "bench_packed.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_packed", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(mod)
    yield mod
    sys.modules.pop(spec.name, None)


def test_one_preset_without_writing(bench, tmp_path, capsys):
    out = tmp_path / "RESULTS.md"
    before = os.environ.get("MSCLIP_FAST_BACKEND")
    rows = bench.main(["--presets", "msclip-tiny", "--batch-size", "2", "--warmup", "0", "--repeats", "1",
                       "--out", str(out), "--no-write"])
    assert not out.exists()
    assert os.environ.get("MSCLIP_FAST_BACKEND") == before
    (row,) = rows
    assert row.preset == "msclip-tiny" and row.batch == 2 and row.repeats == 1
    assert row.packed_ms > 0 and row.per_tower_ms > 0 and row.ratio > 0
    assert row.loss_diff < 1e-4  # same weights, same batch: same loss
    text = capsys.readouterr().out
    assert "## Packed vs per-tower" in text and bench.BEGIN in text and bench.END in text


def test_section_replaced_in_place(bench, tmp_path):
    out = tmp_path / "RESULTS.md"
    out.write_text("# Benchmark results\n\n<!-- other:begin -->\nkeep me\n<!-- other:end -->\n")
    bench.write_results(out, f"{bench.BEGIN}\nfirst\n{bench.END}\n")
    bench.write_results(out, f"{bench.BEGIN}\nsecond\n{bench.END}\n")
    text = out.read_text()
    assert "keep me" in text and "second" in text and "first" not in text
    assert text.count(bench.BEGIN) == 1
