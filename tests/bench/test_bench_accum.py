"""bench/bench_accum.py: the --smoke run (a real measurement, in trial processes of their own,
without the packages the GPU machine lacks) writes a document the report renders, in which exact
accumulation trains at least the plain step's largest batch; the search, the extrapolation, the
caption lengths and the inputs on their own."""
import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
BENCH_SCRIPT = "bench_accum"  # the `bench` fixture (conftest.py) loads bench/bench_accum.py
sys.path.insert(0, str(ROOT / "bench"))


def test_smoke_run(without_gpu_machine_packages, tmp_path):
    """One ``--smoke`` run as gpu_check.sh's dry run starts it (a script, fresh interpreter), with
    open_clip, PIL, matplotlib, ... unimportable."""
    out = tmp_path / "accum.json"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(without_gpu_machine_packages), str(ROOT)]))
    env.pop("OMP_WAIT_POLICY", None)  # the script sets its own default
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "bench/bench_accum.py", "--smoke", "--json", str(out)],
                          capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    wall = time.perf_counter() - t0
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    doc, stdout = json.loads(out.read_text()), proc.stdout
    assert doc["schema"] == 1 and doc["benchmark"] == "accum" and doc["meta"]["device"] == "cpu"
    assert doc["meta"]["env"].get("OMP_WAIT_POLICY") == "passive"
    cmd = doc["meta"]["command"]
    assert cmd.startswith("OMP_WAIT_POLICY=passive ") and "python bench/bench_accum.py --smoke --json" in cmd
    s = doc["settings"]
    assert s["smoke"] and s["preset"] == "msclip-s-tiny" and s["precision"] == "fp32" and s["micro_batch"] == 4
    assert s["jobs"] == 2 and s["bisect_steps"] == 0
    assert s["text"].startswith("openclipart caption lengths") and s["text_lengths"]["median"] == 19
    assert s["budget_source"].startswith("peak of the plain step at N=16") and s["budget_mib"] > 0
    assert "= 1.17 at K = 2" in s["expectation"] and "not a measurement" in s["expectation"]

    # memory: every trial measured in its own process, the budget is the calibration's peak
    rows = doc["rows"]
    assert {r["config"] for r in rows} == {"plain", "plain_ckpt", "exact", "exact_ckpt"}
    for r in rows:
        assert r["error"] is None, r
        assert r["peak_mib"] > r["before_mib"] > 100 and r["step_mib"] == pytest.approx(r["peak_mib"] - r["before_mib"])
        assert r["maxrss_mib"] >= r["peak_mib"] - 1 and r["peak_source"] == "VmHWM after clear_refs"
        assert r["fits"] == (r["peak_mib"] <= s["budget_mib"])
        assert r["accum_steps"] * r["micro_batch"] == r["n"] and r["step_s"] > 0 and r["loss"] > 0
        assert r["accum_steps"] == (r["n"] // 4 if r["config"].startswith("exact") else 1)
    (calib,) = [r for r in rows if r.get("calibration")]
    assert calib["config"] == "plain" and calib["n"] == 16 and calib["peak_mib"] == s["budget_mib"]

    largest = {x["config"]: x for x in doc["largest"]}
    assert list(largest) == ["plain", "plain_ckpt", "exact", "exact_ckpt"]
    plain, exact = largest["plain"]["largest_n"], largest["exact"]["largest_n"]
    assert plain >= 16 and exact is not None and exact >= plain  # measured, not assumed
    for x in largest.values():
        fit = [r["n"] for r in rows if r["config"] == x["config"] and r["fits"]]
        assert x["largest_n"] == (max(fit) if fit else None)
        assert x["stopped"] in ("over budget", "max batch", "time limit")
        assert x["capped"] == (x["stopped"] in ("max batch", "time limit") and bool(fit))
    assert largest["exact"]["vs_plain"] == exact / plain

    # time: five variants alternating at N=8; ratios from their medians
    timing = {t["variant"]: t for t in doc["timing"]}
    assert list(timing) == ["independent", "exact", "exact_ckpt", "plain", "plain_ckpt"]
    assert all(t["n"] == 8 and t["median_ms"] > 0 and t["repeats"] == 1 for t in timing.values())
    assert (timing["exact"]["accum_steps"], timing["exact"]["micro_batch"]) == (2, 4)
    assert (timing["plain"]["accum_steps"], timing["plain"]["micro_batch"]) == (1, 8)
    r = doc["ratios"]["exact_vs_independent"]
    assert r["time_ratio"] == pytest.approx(timing["exact"]["median_ms"] / timing["independent"]["median_ms"])
    assert r["round_ratio_median"] == pytest.approx(r["time_ratio"])  # one round: the same steps
    assert timing["exact"]["times_ms"] == [timing["exact"]["median_ms"]]
    assert set(doc["ratios"]) == {"exact_vs_independent", "plain_ckpt_vs_plain", "exact_ckpt_vs_exact",
                                  "exact_vs_plain"}
    h = doc["headline"]
    assert h["accum_largest_plain"] == plain and h["accum_largest_exact"] == exact
    assert h["accum_time_exact_vs_independent"] == round(r["time_ratio"], 3)

    # printed as the report renders it; the report reads the file and draws its chart
    assert "### Exact accumulation and activation checkpointing (CPU, msclip-s-tiny, fp32, smoke)" in stdout
    assert "| plain (K=1, B=N) | " in stdout and "| exact / independent |" in stdout
    import report

    results = tmp_path / "results"
    results.mkdir()
    (results / "accum-cpu-smoke.json").write_text(out.read_text())
    assert [d["benchmark"] for _, d in report.load(results)] == ["accum"]
    md = report.render_doc(doc, source="results/accum-cpu-smoke.json")
    assert "calibration (sets the budget)" in md and "Expectation (not a measurement)" in md
    if report._plt() is not None:
        assert report.draw_chart(doc, tmp_path / "accum.png")
        assert (tmp_path / "accum.png").read_bytes()[:4] == b"\x89PNG"
    print(f"smoke run: {wall:.1f} s wall (settings.total_s {s['total_s']})")


class FakeTrials:
    """Peak = 500 MiB + per_sample x N (+ extra for exact), no processes."""

    def __init__(self, per_sample, exact_per_sample=0.1):
        self.per_sample, self.exact_per_sample, self.specs = per_sample, exact_per_sample, []

    def run(self, spec):
        self.specs.append(spec)
        active = spec["b"] * self.per_sample + spec["n"] * (self.exact_per_sample if spec["k"] > 1 else 0)
        return {"ok": True, "peak_mib": 500.0 + active, "before_mib": 500.0, "step_mib": active, "step_s": 0.01}


def _args(**kw):
    a = dict(micro_batch=32, start_batch=32, max_batch=4096, bisect_steps=2, preset="msclip-s-tiny", seed=0)
    a.update(kw)
    return argparse.Namespace(**a)


def test_search_doubles_then_bisects(bench):
    pool = bench.TextPool.from_lengths(77)
    far = time.perf_counter() + 100
    # plain: 6 MiB/sample, budget = the peak at 128 -> 32, 64, 128 fit; 256, then 192 and 160 do not
    budget = 500 + 6 * 128
    rows, s = bench.search("plain", FakeTrials(6.0), pool, _args(), budget, far)
    assert [r["n"] for r in rows] == [32, 64, 128, 256, 192, 160] and [r["fits"] for r in rows] == [1, 1, 1, 0, 0, 0]
    assert s["largest_n"] == 128 and s["stopped"] == "over budget" and not s["capped"]
    assert s["extrapolated_n"] is None
    # a known (calibration) row is used instead of a trial
    trial = FakeTrials(6.0)
    known = {128: {"config": "plain", "n": 128, "fits": True, "peak_mib": budget, "step_mib": 768.0}}
    rows, s = bench.search("plain", trial, pool, _args(), budget, far, known)
    assert [sp["n"] for sp in trial.specs] == [32, 64, 256, 192, 160] and s["largest_n"] == 128
    # a budget between: the bisection finds it on the grid of B
    rows, s = bench.search("plain", FakeTrials(6.0), pool, _args(), 500 + 6 * 170, far)
    assert [r["n"] for r in rows] == [32, 64, 128, 256, 192, 160] and s["largest_n"] == 160
    rows, s = bench.search("plain", FakeTrials(6.0), pool, _args(bisect_steps=0), 500 + 6 * 170, far)
    assert [r["n"] for r in rows] == [32, 64, 128, 256] and s["largest_n"] == 128
    # exact: starts at 2B, K = N / B, fits up to the cap; the extrapolation says where the budget ends
    trial = FakeTrials(6.0, exact_per_sample=0.5)
    rows, s = bench.search("exact", trial, pool, _args(max_batch=1024), budget, far)
    assert [r["n"] for r in rows] == [64, 128, 256, 512, 1024] and all(r["fits"] for r in rows)
    assert [sp["k"] for sp in trial.specs] == [2, 4, 8, 16, 32] and {sp["b"] for sp in trial.specs} == {32}
    assert all(sp["tokens"].shape == (sp["n"], 77) for sp in trial.specs)
    assert s["largest_n"] == 1024 and s["capped"] and s["stopped"] == "max batch"
    assert s["mib_per_sample"] == pytest.approx(0.5)
    assert s["extrapolated_n"] == (1024 + int((budget - (500 + 192 + 512)) / 0.5)) // 32 * 32
    # the bisection of an exact configuration stays on the K x B grid
    trial = FakeTrials(6.0, exact_per_sample=3.0)
    rows, s = bench.search("exact", trial, pool, _args(), budget, far)
    assert [r["n"] for r in rows] == [64, 128, 256, 192, 224] and s["largest_n"] == 192
    assert [sp["k"] for sp in trial.specs] == [2, 4, 8, 6, 7]


def test_search_stops_at_the_time_limit(bench):
    pool = bench.TextPool.from_lengths(77)
    rows, s = bench.search("exact", FakeTrials(6.0), pool, _args(), 10 ** 6, time.perf_counter() - 1)
    assert rows == [] and s["largest_n"] is None and s["stopped"] == "time limit" and not s["capped"]


def test_failed_trial_is_an_error_not_a_budget(bench):
    class Broken(FakeTrials):
        def run(self, spec):
            return {"ok": False, "error": "RuntimeError: boom"} if spec["n"] > 32 else super().run(spec)

    rows, s = bench.search("plain", Broken(1.0), bench.TextPool.from_lengths(77), _args(), 10 ** 6,
                           time.perf_counter() + 100)
    assert s["largest_n"] == 32 and s["stopped"] == "error" and rows[-1]["error"] == "RuntimeError: boom"


def test_caption_lengths_are_the_openclipart_corpus(bench):
    pool = bench.TextPool.from_lengths(77)
    assert pool.stats == {"n": 8116, "mean": 16.92, "median": 19.0, "p90": 24.0, "max": 77}
    t = pool.tokens
    assert (t[:, 0] == 49406).all() and (t.argmax(1) + 1 == pool.lengths).all()
    a, b = pool.sample(64, seed=3), pool.sample(64, seed=3)
    assert torch.equal(a, b) and pool.sample(9000, seed=0).shape == (9000, 77)


def test_micro_batches(bench):
    tokens = bench.TextPool.from_lengths(77).sample(20, 0)
    micro = bench.make_micro(tokens, 20, 8, 16, seed=0)
    assert [m["image"].shape for m in micro] == [(8, 3, 16, 16), (8, 3, 16, 16), (4, 3, 16, 16)]
    assert torch.equal(torch.cat([m["text"] for m in micro]), tokens)
    assert torch.equal(torch.cat([m["text_lengths"] for m in micro]), tokens.argmax(1) + 1)
    # a pool of distinct images (GPU runs): micro-batches are views, no copy of N images
    micro = bench.make_micro(tokens, 20, 4, 16, seed=0, image_pool=8)
    assert micro[0]["image"].data_ptr() == micro[2]["image"].data_ptr()
    assert not torch.equal(micro[0]["image"], micro[1]["image"])


def test_bad_arguments(bench):
    with pytest.raises(ValueError, match="multiple of --micro-batch"):
        bench.main(["--micro-batch", "32", "--time-batch", "48"])
    with pytest.raises(ValueError, match="--configs"):
        bench.main(["--configs", "plain,nope"])
    with pytest.raises(ValueError, match="--preset"):
        bench.main(["--preset", "no-such-model", "--smoke"])


def test_gpu_summary_reports_bench_accum(tmp_path):
    import gpu_summary

    steps = "\n".join(f"{s} rc=0 1s limit=100s" for s in
                      ("env", "build", "pytest_gpu", "bench_ops", "bench_loss", "bench_siglip", "bench_accum")) + "\n"
    (tmp_path / "status.txt").write_text(steps)
    (tmp_path / "pytest_gpu.json").write_text(json.dumps({"passed": 1, "failed": 0, "skipped": 0, "compiles": 3}))
    (tmp_path / "bench_accum.json").write_text(json.dumps({
        "settings": {"budget_mib": 40960.0},
        "headline": {"accum_largest_plain": 2048, "accum_time_exact_vs_independent": 1.31},
        "largest": [{"config": "plain", "largest_n": 2048, "capped": False, "stopped": "over budget"},
                    {"config": "exact", "largest_n": 16384, "capped": True, "stopped": "time limit"}]}))
    assert gpu_summary.main([str(tmp_path)]) == 0
    s = json.loads((tmp_path / "summary.json").read_text())
    assert s["ok"] and s["headline"] == {"accum.accum_largest_plain": 2048,
                                         "accum.accum_time_exact_vs_independent": 1.31}
    assert s["accum"]["largest"]["exact"] == {"n": 16384, "capped": True, "stopped": "time limit"}
    md = (tmp_path / "summary.md").read_text()
    assert ("largest contrastive batch in 40960 MiB: plain 2048 (over budget); exact >= 16384 (time limit)" in md)
    # a run whose accum step did not run is not OK
    (tmp_path / "status.txt").write_text(steps.replace("bench_accum rc=0 1s limit=100s\n", ""))
    (tmp_path / "bench_accum.json").unlink()
    assert gpu_summary.main([str(tmp_path)]) == 1
    s = json.loads((tmp_path / "summary.json").read_text())
    assert "step bench_accum did not run" in s["problems"] and s["accum"] is None


def test_gpu_check_runs_the_step():
    text = (ROOT / "bench" / "gpu_check.sh").read_text()
    dry, gpu = text.split('run_step bench_ops 150')[0], text.split('run_step bench_ops 150')[1]
    assert 'run_step bench_accum 90 "$PY" bench/bench_accum.py --device cpu --smoke' in dry
    assert 'bench/bench_accum.py --device cuda' in gpu and "--time-limit" in gpu


def test_counted_flops_of_an_exact_step(bench):
    """FLOPs are counted through an exact step too (its loss gradient runs autograd.grad over leaf
    features, which FlopCounterMode's module tracker rejects): independent + the cached forward of
    K - 1 micro-batches (micro-batch 0 keeps its graph; K if the library recomputed all)."""
    import msclip_fast as mf
    from msclip_fast.training.step import train_step

    torch.manual_seed(0)
    model = mf.create_model("msclip-s-tiny")
    model.train()
    micro = bench.make_micro(bench.TextPool.from_lengths(77).sample(6, 0), 6, 2, model.image_size, seed=0)
    flops, threads = {}, torch.get_num_threads()
    torch.set_num_threads(1)  # this process's OpenMP may spin (OMP_WAIT_POLICY unset) on a busy machine
    try:
        for mode in ("independent", "exact"):
            engine, _, _ = bench.make_engine(model, torch.device("cpu"), "fp32", 3, 2, mode, False)
            flops[mode] = bench.count_flops(lambda: train_step(engine, micro, mode, step=1))
        with torch.no_grad():
            fwd = [bench.count_flops(lambda: engine.forward(b)) for b in micro]
    finally:
        torch.set_num_threads(threads)
    assert flops["exact"] > flops["independent"] > 0
    extra = flops["exact"] - flops["independent"]
    # (plus the cached loss's few matmuls over the N x N logits)
    assert any(extra == pytest.approx(sum(fwd[i:]), rel=1e-4) for i in (0, 1)), (extra, fwd)
