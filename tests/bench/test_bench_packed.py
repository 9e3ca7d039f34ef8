"""Smoke test of bench/bench_packed.py: one preset, trimmed and padded text, one timed step
per mode, JSON written."""
import json
import os

BENCH_SCRIPT = "bench_packed"  # the `bench` fixture (conftest.py) loads bench/bench_packed.py


def test_one_preset_writes_json(bench, tmp_path, capsys):
    out = tmp_path / "packed.json"
    before = os.environ.get("MSCLIP_FAST_BACKEND")
    rows = bench.main(["--presets", "msclip-tiny", "--batch-size", "2", "--warmup", "0", "--repeats", "1",
                       "--text", "synthetic", "--json", str(out)])
    assert os.environ.get("MSCLIP_FAST_BACKEND") == before
    assert [(r.preset, r.trim) for r in rows] == [("msclip-tiny", True), ("msclip-tiny", False)]
    for row in rows:
        assert row.batch == 2 and row.repeats == 1
        assert row.packed_ms > 0 and row.per_tower_ms > 0 and row.ratio > 0
        assert row.loss_diff < 1e-4  # same weights, same batch: same loss
    trimmed, padded = rows
    assert padded.text_rows == 2 * 77 and trimmed.text_rows < padded.text_rows
    assert padded.tokens_packed - trimmed.tokens_packed == padded.text_rows - trimmed.text_rows
    doc = json.loads(out.read_text())
    assert doc["schema"] == 1 and doc["benchmark"] == "packed" and doc["meta"]["device"] == "cpu"
    assert doc["settings"]["text"] == "synthetic" and doc["settings"]["trims"] == [True, False]
    assert [r["packed_ms"] for r in doc["rows"]] == [r.packed_ms for r in rows]
    assert doc["headline"] == {"packed_vs_per_tower_msclip-tiny": round(trimmed.ratio, 3),
                               "packed_vs_per_tower_msclip-tiny_padded": round(padded.ratio, 3)}
    printed = capsys.readouterr().out
    assert "Packed vs per-tower (CPU, msclip-tiny)" in printed and "| msclip-tiny | yes | 2 |" in printed
    assert "| msclip-tiny | no | 2 | 154 |" in printed


def test_trim_selection(bench):
    rows = bench.main(["--presets", "msclip-tiny", "--batch-size", "1", "--warmup", "0", "--repeats", "1",
                       "--text", "synthetic", "--trim", "off"])
    assert [r.trim for r in rows] == [False]
