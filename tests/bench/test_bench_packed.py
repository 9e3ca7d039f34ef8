"""Smoke test of bench/bench_packed.py: one preset, one timed step per mode, JSON written."""
import json
import os

BENCH_SCRIPT = "bench_packed"  # the `bench` fixture (conftest.py) loads bench/bench_packed.py


def test_one_preset_writes_json(bench, tmp_path, capsys):
    out = tmp_path / "packed.json"
    before = os.environ.get("MSCLIP_FAST_BACKEND")
    rows = bench.main(["--presets", "msclip-tiny", "--batch-size", "2", "--warmup", "0", "--repeats", "1",
                       "--json", str(out)])
    assert os.environ.get("MSCLIP_FAST_BACKEND") == before
    (row,) = rows
    assert row.preset == "msclip-tiny" and row.batch == 2 and row.repeats == 1
    assert row.packed_ms > 0 and row.per_tower_ms > 0 and row.ratio > 0
    assert row.loss_diff < 1e-4  # same weights, same batch: same loss
    doc = json.loads(out.read_text())
    assert doc["schema"] == 1 and doc["benchmark"] == "packed" and doc["meta"]["device"] == "cpu"
    assert doc["rows"][0]["packed_ms"] == row.packed_ms
    assert doc["headline"] == {"packed_vs_per_tower_msclip-tiny": round(row.ratio, 3)}
    assert "Packed vs per-tower (CPU)" in capsys.readouterr().out
