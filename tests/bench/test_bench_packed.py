"""Smoke test of bench/bench_packed.py: one preset, one timed step per mode, nothing written;
and its RESULTS.md section is replaced in place without touching other sections."""
import os

BENCH_SCRIPT = "bench_packed"  # the `bench` fixture (conftest.py) loads bench/bench_packed.py


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


def test_section_replaced_in_place(check_section_replaced):
    check_section_replaced("# Benchmark results\n\n<!-- other:begin -->\nkeep me\n<!-- other:end -->\n")
