"""The pieces of bench/gpu_check.sh that decide pass/fail: toolchain checks of the build step, the
gpu-test runner's import-error policy and compile counting, and the summary. (The whole script
runs in CI as ``make gpu-check-dry-run``.)"""
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "bench"))

import gpu_build  # noqa: E402
import gpu_pytest  # noqa: E402
import gpu_summary  # noqa: E402


def test_cuda_major_mismatch_is_a_clear_error():
    gpu_build.check_versions("13.0", "13.2")  # same major: fine
    with pytest.raises(gpu_build.BuildError, match=r"nvcc is CUDA 12\.8 but torch was built with CUDA 13\.0"):
        gpu_build.check_versions("13.0", "12.8")
    with pytest.raises(gpu_build.BuildError, match="CPU-only build"):
        gpu_build.check_versions(None, "13.0")


def test_missing_toolkit_headers_are_named(tmp_path):
    (tmp_path / "include").mkdir()
    with pytest.raises(gpu_build.BuildError, match="cuda_runtime.h not found"):
        gpu_build.header_env(tmp_path)


def test_build_errors_exit_3_with_one_line(monkeypatch, capsys):
    def fail(dry_run, out):
        raise gpu_build.BuildError("nvcc not found (CUDA_HOME, /usr/local/cuda/bin, PATH): install it")

    monkeypatch.setattr(gpu_build, "build", fail)
    assert gpu_build.main([]) == 3
    err = capsys.readouterr().err
    assert err.startswith("BUILD ERROR: nvcc not found") and "Traceback" not in err


def test_gpu_test_files_are_found_by_marker(tmp_path):
    a, b, c = tmp_path / "test_a.py", tmp_path / "test_b.py", tmp_path / "test_c.py"
    a.write_text("import pytest\n@pytest.mark.gpu\ndef test_x(): pass\n")
    b.write_text("from _triton_optest import DEVICES\n")
    c.write_text("env = {'CUDA_VISIBLE_DEVICES': ''}\n")  # not a gpu test
    assert [gpu_pytest._holds_gpu_tests(str(p)) for p in (a, b, c)] == [True, True, False]
    files = gpu_pytest.gpu_test_files(ROOT / "tests")
    assert "tests/ops/test_triton_attention.py" in files
    assert "tests/training/test_triton_training.py" not in files
    shares = gpu_pytest._shares(files, 3)
    assert sorted(f for s in shares for f in s) == sorted(files) and len(shares) == 3


def test_launch_keys_follow_tritons_specialization():
    spec = gpu_pytest.LaunchCounter._spec
    assert spec(1, True) != spec(7, True) != spec(32, True)
    assert spec(7, True) == spec(9, True) and spec(32, True) == spec(48, True)
    assert spec(1, False) == spec(7, False) == spec(32, False)  # do_not_specialize


def _out(tmp_path, status, pytest_json, budget_ok=True):
    (tmp_path / "status.txt").write_text(status)
    (tmp_path / "pytest_gpu.json").write_text(json.dumps(pytest_json))
    (tmp_path / "bench_ops.json").write_text(json.dumps({"headline": {"attention_fwd_bwd_vs_sdpa_B32": 1.25}}))
    siglip = {"headline": {"siglip_fused_vs_reference_time_N32768": 3.5}}
    (tmp_path / "bench_siglip.json").write_text(json.dumps(siglip))
    return tmp_path


STEPS_OK = "\n".join(f"{s} rc=0 {i}s limit=100s" for i, s in
                     enumerate(("env", "build", "pytest_gpu", "bench_ops", "bench_loss", "bench_siglip",
                                "bench_accum"))) + \
    "\ntotal 10s; failed=0\n"


def test_summary_ok_and_markdown(tmp_path):
    out = _out(tmp_path, STEPS_OK, {"passed": 5, "failed": 0, "skipped": 0, "compiles": 42})
    assert gpu_summary.main([str(out), "--total-s", "10"]) == 0
    s = json.loads((out / "summary.json").read_text())
    assert s["ok"] and [x["step"] for x in s["steps"]] == ["env", "build", "pytest_gpu", "bench_ops", "bench_loss",
                                                           "bench_siglip", "bench_accum"]
    assert s["headline"] == {"ops.attention_fwd_bwd_vs_sdpa_B32": 1.25,
                             "siglip.siglip_fused_vs_reference_time_N32768": 3.5}
    assert s["tests"]["compiles"] == 42
    md = (out / "summary.md").read_text()
    assert "OK" in md.splitlines()[0] and "42 Triton compiles (cold cache)" in md


def test_summary_fails_on_a_failed_or_missing_step_and_on_the_compile_budget(tmp_path):
    bad = STEPS_OK.replace("pytest_gpu rc=0", "pytest_gpu rc=124").replace("bench_loss rc=0 4s limit=100s\n", "") \
        .replace("bench_siglip rc=0 5s limit=100s\n", "")
    out = _out(tmp_path, bad, {"passed": 5, "compiles_predicted": 10 ** 6})
    assert gpu_summary.main([str(out), "--dry-run"]) == 1
    problems = json.loads((out / "summary.json").read_text())["problems"]
    assert any("pytest_gpu failed (rc=124, time limit)" in p for p in problems)
    assert any("bench_loss did not run" in p for p in problems)
    assert any("bench_siglip did not run" in p for p in problems)
    assert any("> budget" in p for p in problems)


def test_gpu_check_runs_the_siglip_benchmark():
    """Its own step in both modes (tiny sizes on the CPU; bf16 and a small budget on the GPU, run
    before bench_accum, which takes the time that is left)."""
    text = (ROOT / "bench" / "gpu_check.sh").read_text()
    dry, gpu = text.split("\nelse\n  run_step bench_ops")
    dry = dry.split("if [[ $DRY == 1 ]]; then\n  run_step bench_ops")[1]
    assert 'run_step bench_siglip 120 "$PY" bench/bench_loss.py --loss siglip --device cpu --sizes 256,512' in dry
    line = gpu[gpu.index("run_step bench_siglip"):].split("--json")[0]
    assert "--loss siglip --device cuda --dtype bf16 --sizes 8192,32768" in line and "--timeout 60" in line
    assert int(line.split()[2]) <= 120 and gpu.index("run_step bench_siglip") < gpu.index("run_step bench_accum")
    assert '"$OUT/bench_siglip.json"' in dry and '"$OUT/bench_siglip.json"' in gpu
