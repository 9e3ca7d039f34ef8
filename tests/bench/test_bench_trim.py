"""Smoke test of bench/bench_trim.py: the tiny MS-CLIP-S preset at batch 2, one timed step per
model, fallback captions; the JSON follows the schema and its FLOP ratio is what
FlopCounterMode counts for the same batch."""
import json
import os

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

BENCH_SCRIPT = "bench_trim"  # the `bench` fixture (conftest.py) loads bench/bench_trim.py

CAPTIONS = [
    "Armadillo. animal",
    "AZ-lizard. reptile, animal",
    "2 dead frogs. 2 dead frogs... nothing more. froggies, green, fenland, froggy, fen, ooze, swamp, frog",
    "red apple",
    "Blue bicycle leaning on a wall. transport, bike, vehicle, wheel",
]


def _flops(model, images, tokens, lengths):
    import msclip_fast as mf

    counter = FlopCounterMode(display=False, depth=0)
    with counter:
        img, txt, scale = model(images, tokens, text_lengths=lengths)
        mf.ClipLoss()(img, txt, scale).backward()
    return counter.get_total_flops()


def test_tiny_preset_writes_json(bench, tmp_path, capsys, monkeypatch):
    import msclip_fast as mf

    caps = tmp_path / "captions.txt"
    caps.write_text("\n".join(CAPTIONS) + "\n\n")
    out = tmp_path / "trim.json"
    before = os.environ.get("MSCLIP_FAST_BACKEND")
    rows = bench.main(["--presets", "msclip-s-tiny", "--batch-size", "2", "--warmup", "0", "--repeats", "1",
                       "--captions", str(caps), "--json", str(out)])
    assert os.environ.get("MSCLIP_FAST_BACKEND") == before  # restored after the run
    (row,) = rows
    assert row.preset == "msclip-s-tiny" and row.batch == 2 and row.repeats == 1 and row.packed
    assert row.trimmed_ms > 0 and row.padded_ms > 0 and row.time_ratio > 0 and row.text_time_ratio > 0
    assert row.loss_diff < 1e-4  # same weights, same batch: the same function
    assert row.text_rows_padded == 2 * 77 and 2 <= row.text_rows_trimmed < row.text_rows_padded

    # the FLOP ratio is > 1 and is what FlopCounterMode counts on the same batch
    corpus = bench.Corpus(CAPTIONS, 77, "test")
    assert corpus.stats["n"] == len(CAPTIONS)
    images, tokens, lengths = corpus.batch(2, 64, seed=0)
    assert row.text_rows_trimmed == int(lengths.sum())
    assert row.len_max == int(lengths.max())
    monkeypatch.setenv("MSCLIP_FAST_BACKEND", "reference")  # as the benchmark counts (the loss's FLOPs differ)
    counts = {trim: _flops(mf.create_model("msclip-s-tiny", trim_text=trim), images, tokens, lengths)
              for trim in (True, False)}
    assert counts[False] > counts[True]
    assert row.flop_ratio > 1 and row.flop_ratio == pytest.approx(counts[False] / counts[True], rel=1e-12)
    assert row.gflop_trimmed == pytest.approx(counts[True] / 2 / 1e9, rel=1e-12)
    assert row.gflop_padded == pytest.approx(counts[False] / 2 / 1e9, rel=1e-12)
    # the towers' split adds up to the step (the loss and normalization count ~nothing)
    assert row.image_gflop + row.text_gflop_trimmed == pytest.approx(row.gflop_trimmed, rel=1e-3)
    assert row.image_gflop + row.text_gflop_padded == pytest.approx(row.gflop_padded, rel=1e-3)

    doc = json.loads(out.read_text())
    assert doc["schema"] == 1 and doc["benchmark"] == "trim" and doc["meta"]["device"] == "cpu"
    assert doc["settings"]["backend"] == "reference" and doc["settings"]["captions"] == "file captions.txt"
    assert doc["settings"]["corpus_lengths"]["n"] == len(CAPTIONS)
    assert doc["rows"][0]["flop_ratio"] == row.flop_ratio and doc["rows"][0]["note"] == row.note
    assert "time ratio" in row.note and "AdamW" in row.note
    assert doc["headline"] == {"trim_flop_ratio_msclip-s-tiny": round(row.flop_ratio, 3),
                               "trim_step_speedup_msclip-s-tiny": round(row.time_ratio, 3)}
    printed = capsys.readouterr().out
    assert "Text trimmed at EOT vs padded (CPU)" in printed and "| msclip-s-tiny | 2 | yes |" in printed


def test_missing_openclipart_is_a_clear_error(bench, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        bench.main(["--presets", "msclip-s-tiny", "--openclipart-root", str(tmp_path / "none")])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "no openclipart captions" in err and "--captions FILE" in err


def test_bad_arguments(bench, tmp_path):
    with pytest.raises(ValueError, match="presets"):
        bench.main(["--presets", "no-such-model"])
    with pytest.raises(ValueError, match="batch-size"):
        bench.main(["--presets", "msclip-s-tiny", "--batch-size", "0"])
    empty = tmp_path / "empty.txt"
    empty.write_text("\n \n")
    with pytest.raises(ValueError, match="no captions"):
        bench.read_captions(empty)


def test_length_stats(bench):
    st = bench.length_stats(torch.tensor([3, 5, 7, 9, 77]))
    assert st["n"] == 5 and st["mean"] == 20.2 and st["median"] == 7 and st["max"] == 77
    assert 9 < st["p90"] < 77
