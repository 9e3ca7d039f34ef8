"""bench/bench_loss.py: the correctness check before timing, loud failures (a backend that
disagrees, raises or times out makes the exit status non-zero after the JSON is written), the
not-run reasons, and the dry-run path on a Python without open_clip & co."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BENCH_DIR = ROOT / "bench"

BENCH_SCRIPT = "bench_loss"  # the `bench` fixture (conftest.py) loads bench/bench_loss.py

FAKES = '''
import time
from msclip_fast.ops import contrastive_loss_ref, sigmoid_loss_ref

def wrong(img, txt, scale):          # 1% off: fails every dtype's bound
    return contrastive_loss_ref(img, txt, scale) * 1.01

def late_boom(img, txt, scale):      # right at the check size, raises at larger N
    if img.shape[0] > 100:
        raise MemoryError("late boom at N=%d" % img.shape[0])
    return contrastive_loss_ref(img, txt, scale)

def hang(img, txt, scale):
    time.sleep(3600)

def siglip_wrong(img, txt, scale, bias):    # 1% off
    return sigmoid_loss_ref(img, txt, scale, bias) * 1.01

def siglip_bias_frozen(img, txt, scale, bias):  # the right loss, but no gradient reaches the bias
    return sigmoid_loss_ref(img, txt, scale, bias.detach())

def siglip_as_clip(img, txt, scale, bias):  # another loss altogether
    return contrastive_loss_ref(img, txt, scale)
'''


@pytest.fixture
def fakes(tmp_path, monkeypatch):
    """fake_losses.py importable by the benchmark's child processes (through PYTHONPATH)."""
    d = tmp_path / "fakes"
    d.mkdir()
    (d / "fake_losses.py").write_text(FAKES)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(d), os.environ.get("PYTHONPATH", "")]))
    return d


def test_disagreeing_or_raising_implementations_fail_loudly(bench, fakes, tmp_path, capsys):
    out = tmp_path / "loss.json"
    rc = bench.main(["--device", "cpu", "--sizes", "64,128", "--check-n", "64", "--timeout", "60",
                     "--impls", "wrong=fake_losses:wrong,fake_losses:late_boom", "--json", str(out)])
    assert rc == 1
    err = capsys.readouterr().err
    assert "FAILED" in err and "wrong check" in err and "late boom at N=128" in err
    doc = json.loads(out.read_text())  # written before exiting
    assert doc["status"] == "failed" and len(doc["failures"]) == 2
    checks = {c["impl"]: c for c in doc["checks"]}
    assert checks["wrong"]["status"] == "failed" and checks["wrong"]["loss_rel_err"] == pytest.approx(0.01, rel=1e-3)
    assert "disagrees with the float64 reference" in checks["wrong"]["reason"]
    assert checks["late_boom"]["status"] == "ok"
    rows = {(r["impl"], r["n"]): r for r in doc["rows"]}
    assert rows[("late_boom", 64)]["status"] == "ok" and rows[("late_boom", 64)]["time_s"] > 0
    assert rows[("late_boom", 128)]["status"] == "failed" and "MemoryError" in rows[("late_boom", 128)]["reason"]
    assert rows[("wrong", 128)]["status"] == "not_run"  # a failed check is not timed


def test_a_hanging_child_is_a_timeout_error(bench, fakes):
    res = bench.run_child("fake_losses:hang", 64, 8, "cpu", "fp32", 1, 0, timeout=1)
    assert "timed out after 1 s" in res["error"]


def test_check_results(bench):
    raised = bench.check_result("boom", "bf16", {"error": "RuntimeError: boom"})
    assert raised["status"] == "failed" and raised["reason"] == "RuntimeError: boom" and raised["tol"] == 1.6e-2
    errs = {"loss_rel_err": 1e-3, "grad_img_rel_err": 1.5e-3, "grad_txt_rel_err": 1e-4, "grad_scale_rel_err": 0.0}
    res = {"check": {"n": 512, "loss": 6.3, "ref_loss": 6.3, **errs}}
    assert bench.check_result("x", "fp16", res)["status"] == "ok"  # fp16 bound 2e-3
    bad = bench.check_result("x", "fp32", res)  # fp32 bound 1e-4
    assert bad["status"] == "failed" and "loss 1.00e-03, grad_img 1.50e-03" in bad["reason"]
    nan = bench.check_result("x", "fp32", {"check": {**res["check"], "grad_txt_rel_err": float("nan")}})
    assert nan["status"] == "failed" and nan["grad_txt_rel_err"] is None  # NaN never passes; JSON has no NaN


def test_dry_run_without_gpu_machine_packages(without_gpu_machine_packages, tmp_path):
    """What gpu_check.sh --dry-run runs, on a Python that cannot import open_clip, PIL, ...:
    unavailable implementations are "not run" with their reason, the rest agree, exit 0."""
    out = tmp_path / "loss.json"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(without_gpu_machine_packages), str(ROOT)]))
    proc = subprocess.run([sys.executable, str(BENCH_DIR / "bench_loss.py"), "--device", "cpu", "--sizes", "64",
                           "--check-n", "64", "--timeout", "60", "--json", str(out)],
                          capture_output=True, text=True, env=env, cwd=ROOT, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    doc = json.loads(out.read_text())
    assert doc["schema"] == 1 and doc["benchmark"] == "loss" and doc["status"] == "ok"
    meta = doc["meta"]
    assert meta["device"] == "cpu" and meta["torch"] and "python bench/bench_loss.py --device cpu" in meta["command"]
    assert meta["date_utc"].endswith("Z") and "cpu" in meta["machine"]
    assert doc["not_run"]["open_clip"] == "open_clip is not installed"
    assert "interpreter" in doc["not_run"]["triton"]
    by = {(r["impl"], r["n"]): r for r in doc["rows"]}
    assert by[("reference", 64)]["status"] == "ok"
    if "fused" not in doc["not_run"]:  # the C++ extension is built here
        assert by[("fused", 64)]["status"] == "ok"
        assert "loss_fused_vs_reference_time_N64" in doc["headline"]
    assert all(c["status"] in ("ok", "not_run") for c in doc["checks"])


def test_bad_arguments(bench):
    with pytest.raises(SystemExit):
        bench.main(["--impls", "nope"])
    with pytest.raises(SystemExit):
        bench.main(["--sizes", "0"])
    assert bench.parse_impls("fused,x=pkg.mod:fn,pkg.mod:other") == [
        ("fused", "fused"), ("x", "pkg.mod:fn"), ("other", "pkg.mod:other")]
    with pytest.raises(ValueError, match="twice"):
        bench.parse_impls("fused,fused")


def test_siglip_check_catches_wrong_implementations(bench, fakes, tmp_path, capsys):
    """--loss siglip compares loss and all four gradients (bias included) with the float64
    sigmoid reference; the JSON is its own benchmark with siglip_ headline keys."""
    out = tmp_path / "siglip.json"
    rc = bench.main(["--loss", "siglip", "--device", "cpu", "--sizes", "64", "--check-n", "64", "--timeout", "60",
                     "--impls", "reference,wrong=fake_losses:siglip_wrong,frozen=fake_losses:siglip_bias_frozen,"
                                "clip=fake_losses:siglip_as_clip", "--json", str(out)])
    assert rc == 1
    assert "wrong check" in capsys.readouterr().err
    doc = json.loads(out.read_text())
    assert doc["benchmark"] == "siglip" and doc["status"] == "failed" and len(doc["failures"]) == 3
    s = doc["settings"]
    assert (s["loss"], s["scale"], s["bias"]) == ("siglip", 10.0, -10.0) and s["naive_buffers"]["open_clip"] >= 5
    checks = {c["impl"]: c for c in doc["checks"]}
    assert checks["reference"]["status"] == "ok" and checks["reference"]["grad_bias_rel_err"] < 1e-6
    assert checks["wrong"]["status"] == "failed" and checks["wrong"]["loss_rel_err"] == pytest.approx(0.01, rel=1e-3)
    frozen = checks["frozen"]
    assert frozen["status"] == "failed" and frozen["loss_rel_err"] < 1e-6 and frozen["grad_bias_rel_err"] is None
    assert "grad_bias inf" in frozen["reason"] and "grad_scale" not in frozen["reason"]
    assert checks["clip"]["status"] == "failed"
    rows = {(r["impl"], r["n"]): r for r in doc["rows"]}
    ref = rows[("reference", 64)]
    assert ref["status"] == "ok" and ref["time_s"] > 0
    assert ref["beyond_grads_mib"] == pytest.approx(ref["peak_mib"] - 2 * 64 * 512 * 4 / 2**20, abs=0.01)
    assert rows[("wrong", 64)]["status"] == "not_run" and rows[("wrong", 64)]["beyond_grads_mib"] is None
    # fp32 vs the float64 oracle: 3e-7 alone, 3e-6 seen with another process loading the cores
    # (BLAS blocking changes); a wrong implementation is >= 1e-3 off
    assert doc["headline"]["siglip_reference_max_rel_err"] < 1e-5 and doc["headline"]["siglip_wrong_max_rel_err"] > 1e-3
    assert all(k.startswith("siglip_") for k in doc["headline"])


def test_siglip_without_gpu_machine_packages(without_gpu_machine_packages, tmp_path):
    """What gpu_check.sh --dry-run runs for siglip: open_clip and triton "not run" with their
    reason, the fused loss measured with its memory beyond the gradients, exit 0."""
    out = tmp_path / "siglip.json"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(without_gpu_machine_packages), str(ROOT)]))
    proc = subprocess.run([sys.executable, str(BENCH_DIR / "bench_loss.py"), "--loss", "siglip", "--device", "cpu",
                           "--sizes", "64", "--check-n", "64", "--timeout", "60", "--json", str(out)],
                          capture_output=True, text=True, env=env, cwd=ROOT, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    doc = json.loads(out.read_text())
    assert doc["schema"] == 1 and doc["benchmark"] == "siglip" and doc["status"] == "ok"
    assert "--loss siglip" in doc["meta"]["command"]
    assert doc["not_run"]["open_clip"] == "open_clip is not installed" and "interpreter" in doc["not_run"]["triton"]
    by = {(r["impl"], r["n"]): r for r in doc["rows"]}
    assert by[("reference", 64)]["status"] == "ok" and by[("open_clip", 64)]["status"] == "not_run"
    if "fused" not in doc["not_run"]:  # the C++ extension is built here
        assert by[("fused", 64)]["status"] == "ok" and by[("fused", 64)]["beyond_grads_mib"] is not None
        h = doc["headline"]
        assert "siglip_fused_vs_reference_time_N64" in h and "siglip_fused_beyond_grads_mib_N64" in h
        assert not any(k.startswith("loss_") for k in h)
    assert all(c["status"] in ("ok", "not_run") for c in doc["checks"])
    assert "### Sigmoid (SigLIP) loss (CPU, fp32)" in proc.stdout and "| d bias |" in proc.stdout


def test_siglip_headline_and_memory_estimate(bench):
    def row(impl, n, t, peak, beyond=None):
        return {"impl": impl, "n": n, "status": "ok", "time_s": t, "peak_mib": peak, "beyond_grads_mib": beyond}

    rows = [row("fused", 4096, 1.0, 40.0, 24.0), row("open_clip", 4096, 1.5, 330.0),
            row("fused", 8192, 2.0, 80.0, 48.0), row("open_clip", 8192, 1.8, 1300.0),
            row("fused", 32768, 30.0, 190.0, 62.0),
            {"impl": "open_clip", "n": 32768, "status": "not_run", "time_s": None, "peak_mib": None}]
    h = bench.headline(rows, [{"impl": "fused", "max_rel_err": 2.4e-7}], "siglip")
    assert h == {"siglip_fused_vs_open_clip_time_N8192": 0.9, "siglip_fused_vs_open_clip_mem_N8192": 16.25,
                 "siglip_fused_vs_open_clip_time_min": 0.9, "siglip_fused_beyond_grads_mib_N32768": 62.0,
                 "siglip_fused_max_rel_err": 2.4e-7}
    assert set(bench.headline(rows, [], "clip")) == {"loss_fused_vs_open_clip_time_N8192",
                                                     "loss_fused_vs_open_clip_mem_N8192"}
    # the materializing peers' N x N buffers: open_clip's SigLipLoss at N=32768 does not fit in 20 GiB
    big, half = bench.naive_bytes(32768, "siglip", "open_clip"), bench.naive_bytes(16384, "siglip", "open_clip")
    assert big > 20 * 2**30 > half
    assert bench.naive_bytes(4096) == 16 * 4096 ** 2  # clip's estimate is unchanged


def test_siglip_backend_still_being_written_is_not_run(bench, monkeypatch):
    from msclip_fast import ops

    op = ops.sigmoid_loss.op
    monkeypatch.setattr(op, "backends", {k: v for k, v in op.backends.items() if k != "triton"})
    assert "no 'triton' backend registered" in bench.unavailable("triton", "cuda", "siglip")
    assert "interpreter" in bench.unavailable("triton", "cpu", "siglip")
    assert bench.unavailable("reference", "cpu", "siglip") is None
