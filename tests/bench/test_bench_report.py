"""bench/report.py on small fixed results documents: tables and PNG charts are produced, GPU
results land in their own section, the kernel report's section survives, and a bad file stops
the report with a message naming it."""
import copy
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BENCH_SCRIPT = "report"  # the `bench` fixture (conftest.py) loads bench/report.py


def meta(device="cpu"):
    return {"machine": {"cpu": "Test CPU 9000", "cores": 2, "logical_cpus": 2, "torch_threads": 2,
                        "gpu": "NVIDIA H200" if device == "cuda" else None, "gpu_count": 1 if device == "cuda" else 0,
                        "cuda": "13.0", "python": "3.11.7", "platform": "Linux", "load_avg": [0.5, 0.4, 0.3]},
            "command": f"python bench/bench_loss.py --device {device}", "date_utc": "2026-11-30T16:02:00Z",
            "commit": "abc1234", "dirty": False, "torch": "2.14.1", "triton": "3.8.0", "device": device}


def loss_doc(device="cpu"):
    rows = []
    for n, (ft, fm, ot, om) in {4096: (0.60, 17.0, 0.87, 275.0), 8192: (2.08, 33.0, 3.07, 1061.0)}.items():
        rows.append({"impl": "fused", "n": n, "status": "ok", "time_s": ft, "peak_mib": fm, "reason": None})
        rows.append({"impl": "open_clip", "n": n, "status": "ok", "time_s": ot, "peak_mib": om, "reason": None})
        rows.append({"impl": "triton", "n": n, "status": "not_run", "time_s": None, "peak_mib": None,
                     "reason": "no CUDA device"})
    return {"schema": 1, "benchmark": "loss", "meta": meta(device),
            "settings": {"sizes": [4096, 8192], "dim": 512, "dtype": "fp32", "scale": 100.0, "repeats": 1,
                         "check_n": 512, "impls": ["fused", "triton", "open_clip"]},
            "rows": rows,
            "checks": [{"impl": "fused", "n": 512, "status": "ok", "tol": 1e-4, "loss_rel_err": 2e-8,
                        "grad_img_rel_err": 6e-7, "grad_txt_rel_err": 6e-7, "grad_scale_rel_err": 1e-6,
                        "max_rel_err": 1e-6}],
            "headline": {"loss_fused_vs_open_clip_time_N8192": 1.476}, "status": "ok", "failures": []}


def ops_doc(device="cpu"):
    rows = []
    for case, tag in (("image B2 L50", "B32"), ("text B2 L77 causal", "text77")):
        for mode, ours_ms in (("fwd", 1.0), ("fwd+bwd", 3.0)):
            rows.append({"op": "attention", "case": case, "tag": tag, "impl": "ours", "mode": mode, "ms": ours_ms,
                         "ratio": 1.0, "error": None})
            rows.append({"op": "attention", "case": case, "tag": tag, "impl": "sdpa-math", "mode": mode,
                         "ms": ours_ms * 1.5, "ratio": 1.5, "error": None})
    rows.append({"op": "attention", "case": "image B2 L50", "tag": "B32", "impl": "sdpa-cudnn", "mode": "fwd",
                 "ms": None, "ratio": None, "error": "RuntimeError: No available kernel"})
    return {"schema": 1, "benchmark": "ops", "meta": meta(device),
            "settings": {"dtype": "fp32", "smoke": True, "backend": "auto", "interpreter": False},
            "rows": rows, "headline": {"attention_fwd_bwd_vs_sdpa_B32": 1.5}, "status": "ok", "failures": []}


def train_step_doc():
    rows = [{"preset": p, "params_m": 4.21, "batch": 32, "image_size": 64, "median_ms": ms, "iqr_ms": 5.2,
             "timed_steps": 11, "samples_per_s": 32 / ms * 1e3, "gflop_per_sample": 0.45, "gflops_achieved": 76.2,
             "mfu": None, "cpu_share": 1.0, "loss": 3.4} for p, ms in (("clip-tiny", 188.3), ("msclip-tiny", 296.5))]
    return {"schema": 1, "benchmark": "train_step", "meta": meta(), "settings": {"backend": "reference"},
            "rows": rows, "headline": {}}


def packed_doc():
    rows = [{"preset": "msclip-tiny", "batch": 64, "tokens_packed": 9088, "packed_ms": 717.9, "packed_iqr_ms": 141.6,
             "per_tower_ms": 583.5, "per_tower_iqr_ms": 99.2, "repeats": 5, "ratio": 0.81, "loss_diff": 0.0},
            {"preset": "msclip-s-tiny", "trim": True, "batch": 64, "text_rows": 1088, "tokens_packed": 5184,
             "packed_ms": 401.2, "packed_iqr_ms": 10.0, "per_tower_ms": 420.5, "per_tower_iqr_ms": 12.0, "repeats": 5,
             "ratio": 1.05, "loss_diff": 0.0},
            {"preset": "msclip-s-tiny", "trim": False, "batch": 64, "text_rows": 4928, "tokens_packed": 9024,
             "packed_ms": 650.0, "packed_iqr_ms": 10.0, "per_tower_ms": 640.0, "per_tower_iqr_ms": 12.0, "repeats": 5,
             "ratio": 0.98, "loss_diff": 0.0}]
    return {"schema": 1, "benchmark": "packed", "meta": meta(),
            "settings": {"text": "openclipart training captions (make_shards)",
                         "corpus_lengths": {"n": 8116, "mean": 16.9, "median": 19.0, "p90": 24.0}},
            "rows": rows, "headline": {}}


def trim_doc():
    row = {"preset": "msclip-s-b32", "params_m": 151.3, "batch": 8, "packed": True, "len_mean": 16.8, "len_median": 19.0,
           "len_p90": 21.0, "len_max": 21, "text_rows_trimmed": 134, "text_rows_padded": 616,
           "gflop_trimmed": 42.09, "gflop_padded": 73.47, "flop_ratio": 1.745, "text_gflop_trimmed": 8.9,
           "text_gflop_padded": 40.3, "image_gflop": 33.2, "trimmed_ms": 4123.0, "trimmed_iqr_ms": 55.0,
           "padded_ms": 6789.0, "padded_iqr_ms": 80.0, "time_ratio": 1.647, "repeats": 5, "trimmed_fwd_ms": 1500.0,
           "trimmed_bwd_ms": 2100.0, "trimmed_opt_ms": 523.0, "padded_fwd_ms": 2500.0, "padded_bwd_ms": 3766.0,
           "padded_opt_ms": 523.0, "text_trimmed_ms": 800.0, "text_padded_ms": 3400.0, "text_time_ratio": 4.25,
           "image_ms": 2800.0, "cpu_share": 0.97, "loss_diff": 0.0, "note": "FLOP ratio 1.75, time ratio 1.65. Why."}
    return {"schema": 1, "benchmark": "trim", "meta": meta(),
            "settings": {"backend": "reference", "dtype": "fp32", "captions": "openclipart (make_shards captions)",
                         "corpus_lengths": {"n": 8116, "mean": 16.92, "median": 19.0, "p90": 24.0, "p99": 39.0,
                                            "max": 77, "cut_at_context": 0.0005}},
            "rows": [row], "headline": {"trim_flop_ratio_msclip-s-b32": 1.745}}


KERNEL_SECTION = "<!-- kernel_report:begin -->\n## Static kernel report\n| k | regs |\n|---|---:|\n| a | 96 |\n<!-- kernel_report:end -->\n"


@pytest.fixture
def results(tmp_path):
    d = tmp_path / "results"
    d.mkdir()
    docs = {"loss-cpu-fp32": loss_doc(), "ops-cpu-smoke": ops_doc(), "train_step-cpu": train_step_doc(),
            "packed-cpu": packed_doc(), "trim-cpu": trim_doc(), "loss-cuda-bf16": loss_doc("cuda"), "ops-cuda": ops_doc("cuda")}
    docs["loss-cuda-bf16"]["settings"]["dtype"] = "bf16"
    docs["loss-cuda-bf16"]["rows"][0]["time_s"] = 0.0123  # a GPU-only number
    for name, doc in docs.items():
        (d / f"{name}.json").write_text(json.dumps(doc))
    return d


def test_tables_charts_and_gpu_section(bench, results, tmp_path):
    md = tmp_path / "RESULTS.md"
    md.write_text("# Benchmark results\n\nintro kept\n\n" + KERNEL_SECTION)
    assert bench.main(["--results-dir", str(results), "--write", str(md), "--charts", str(tmp_path / "charts")]) == 0
    text = md.read_text()
    assert text.startswith("# Benchmark results\n\nintro kept\n") and KERNEL_SECTION in text
    cpu, gpu = text.split("## GPU results")
    cpu = cpu.split("## CPU results")[1]
    # loss table with its ratios, machine/command/date/commit, check and not-run notes
    assert "| 4096 | 0.6 | 17 | 0.87 | 275 | 1.45x | 16.2x |" in cpu
    assert "- Machine: Test CPU 9000, 2 usable cores" in cpu and "- Commit: abc1234" in cpu
    assert "- Command: `python bench/bench_loss.py --device cpu`" in cpu and "2026-11-30 16:02:00 UTC" in cpu
    assert "Not run: triton at N=4096,8192: no CUDA device" in cpu
    assert "| preset | params (M) |" in cpu and "| clip-tiny | 4.21 | 32 | 64 | 188.3 |" in cpu
    assert "| msclip-tiny | – | 64 | – | 9088 | 717.9 |" in cpu  # a packed row from before trim_text
    assert "| msclip-s-tiny | yes | 64 | 1088 | 5184 | 401.2 |" in cpu and "| msclip-s-tiny | no | 64 | 4928 |" in cpu
    assert "the openclipart training captions (make_shards); corpus eot+1 mean 16.9, median 19, p90 24." in cpu
    # trimmed vs padded: FLOP and time tables, the corpus, the note
    assert "### Text trimmed at EOT vs padded (CPU)" in cpu
    assert "| msclip-s-b32 | 8 | yes | 16.8 / 19 / 21 | 42.09 | 73.47 | 1.75x | 8.90 | 40.30 | 33.20 |" in cpu
    assert "| msclip-s-b32 | 4123 (55) | 6789 (80) | 1.65x | 1500 / 2100 / 523 | 2500 / 3766 / 523 | 800 | 3400 |" in cpu
    assert "Corpus: 8116 captions, `eot + 1` mean 16.9, median 19, p90 24, p99 39, max 77 of 77" in cpu
    assert "- msclip-s-b32: FLOP ratio 1.75, time ratio 1.65. Why." in cpu
    assert "RuntimeError: No available kernel" in cpu
    # GPU documents only in the GPU section, CPU ones only in the CPU section
    assert "0.0123" in gpu and "0.0123" not in cpu
    assert "Contrastive loss (GPU, bf16)" in gpu and "Ops vs PyTorch (GPU" in gpu and "NVIDIA H200" in gpu
    assert "(GPU" not in cpu and "Train step" not in gpu
    charts = sorted(p.name for p in (tmp_path / "charts").iterdir())
    assert charts == ["loss-cpu-fp32.png", "loss-cuda-bf16.png", "ops-cpu-smoke.png", "ops-cuda.png",
                      "packed-cpu.png", "train_step-cpu.png", "trim-cpu.png"]
    for c in charts:
        data = (tmp_path / "charts" / c).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
        assert f"](charts/{c})" in text
    # regenerating replaces the region in place
    assert bench.main(["--results-dir", str(results), "--write", str(md), "--no-charts"]) == 0
    again = md.read_text()
    assert again.count(bench.BEGIN) == 1 and again.count(KERNEL_SECTION) == 1 and "](charts/" not in again


def test_placeholder_without_gpu_results(bench, results, tmp_path, capsys):
    for p in results.glob("*cuda*.json"):
        p.unlink()
    assert bench.main(["--results-dir", str(results), "--no-charts"]) == 0
    out = capsys.readouterr().out
    assert "No GPU results yet" in out.split("## GPU results")[1]


@pytest.mark.parametrize("mutate, message", [
    (lambda d: "{not json", "not valid JSON (line 1"),
    (lambda d: d.pop("meta") and d, "missing object 'meta'"),
    (lambda d: d["meta"].pop("device") and d, "missing 'meta.device'"),
    (lambda d: d.update(schema=7) or d, "'schema' must be 1"),
    (lambda d: d.update(benchmark="nope") or d, "'benchmark' must be one of"),
    (lambda d: d["rows"][0].pop("impl") and d, "rows[0] lacks ['impl']"),
])
def test_bad_file_is_a_clear_error(bench, tmp_path, capsys, mutate, message):
    d = tmp_path / "results"
    d.mkdir()
    doc = mutate(copy.deepcopy(loss_doc()))
    (d / "broken.json").write_text(doc if isinstance(doc, str) else json.dumps(doc))
    assert bench.main(["--results-dir", str(d), "--no-charts"]) == 2
    err = capsys.readouterr().err
    assert "broken.json" in err and message in err


def test_unpaired_marker_is_refused(bench, results, tmp_path, capsys):
    md = tmp_path / "RESULTS.md"
    md.write_text(f"# Benchmark results\n\n{bench.BEGIN}\nhalf a region\n")
    assert bench.main(["--results-dir", str(results), "--write", str(md), "--no-charts"]) == 2
    assert "unpaired" in capsys.readouterr().err and md.read_text().endswith("half a region\n")


def test_module_entry_point(results):
    proc = subprocess.run([sys.executable, "-m", "bench.report", "--results-dir", str(results), "--no-charts"],
                          capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "## CPU results" in proc.stdout and "## GPU results" in proc.stdout


def siglip_doc():
    doc = loss_doc()
    doc["benchmark"] = "siglip"
    doc["meta"]["command"] = "python bench/bench_loss.py --loss siglip --device cpu"
    doc["settings"] = {"loss": "siglip", "sizes": [4096, 8192], "dim": 512, "dtype": "fp32", "scale": 10.0,
                       "bias": -10.0, "repeats": 1, "check_n": 512, "impls": ["fused", "triton", "open_clip"]}
    for r in doc["rows"]:
        r["beyond_grads_mib"] = None if r["peak_mib"] is None else r["peak_mib"] - 2 * r["n"] * 512 * 4 / 2**20
    doc["checks"][0]["grad_bias_rel_err"] = 3e-8
    doc["headline"] = {"siglip_fused_vs_open_clip_time_N8192": 1.476, "siglip_fused_beyond_grads_mib_N8192": 1.0}
    return doc


def test_siglip_gets_its_own_section_and_chart(bench, tmp_path):
    d = tmp_path / "results"
    d.mkdir()
    (d / "loss-cpu-fp32.json").write_text(json.dumps(loss_doc()))
    (d / "siglip-cpu-fp32.json").write_text(json.dumps(siglip_doc()))
    md = tmp_path / "RESULTS.md"
    assert bench.main(["--results-dir", str(d), "--write", str(md), "--charts", str(tmp_path / "charts")]) == 0
    text = md.read_text()
    clip, sig = text.split("### Sigmoid (SigLIP) loss (CPU, fp32)")
    assert "### Contrastive loss (CPU, fp32)" in clip and "symmetric InfoNCE" in clip and "beyond grads" not in clip
    assert "| 4096 | 0.6 | 17 | 0.87 | 275 | 1.45x | 16.2x |" in clip  # clip's table as before
    assert "sigmoid (SigLIP) loss" in sig and "scale 10, bias -10" in sig and "SigLipLoss" in sig
    assert "| N | fused s | fused MiB | fused beyond grads MiB | open_clip s |" in sig
    assert "| 8192 | 2.08 | 33 | 1.0 | 3.07 | 1061 | 1.48x | 32.2x |" in sig
    assert "| impl | check | loss | d img | d txt | d scale | d bias | bound | note |" in sig
    assert "| fused | ok | 2.0e-08 | 6.0e-07 | 6.0e-07 | 1.0e-06 | 3.0e-08 | 0.0001 |  |" in sig
    assert "`siglip_fused_beyond_grads_mib_N8192` = 1" in sig and "](charts/siglip-cpu-fp32.png)" in sig
    assert sorted(p.name for p in (tmp_path / "charts").iterdir()) == ["loss-cpu-fp32.png", "siglip-cpu-fp32.png"]
