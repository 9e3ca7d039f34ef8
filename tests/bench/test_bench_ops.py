"""bench/bench_ops.py on the CPU: tiny shapes, every op, the JSON document, the headline, a
failing "ours" makes the exit status non-zero, and it runs without open_clip & co."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BENCH_SCRIPT = "bench_ops"  # the `bench` fixture (conftest.py) loads bench/bench_ops.py


def test_cpu_smoke_writes_json(bench, tmp_path):
    out = tmp_path / "ops.json"
    results, doc = bench.run(["--device", "cpu", "--smoke", "--modes", "fwd,fwd+bwd", "--min-run-time", "0",
                              "--backend", "auto", "--json", str(out)])
    data = json.loads(out.read_text())
    assert data == json.loads(json.dumps(doc))
    assert data["schema"] == 1 and data["benchmark"] == "ops" and data["status"] == "ok"
    assert data["meta"]["device"] == "cpu" and data["settings"]["smoke"] is True
    assert "python bench/bench_ops.py --device cpu --smoke" in data["meta"]["command"]
    assert {r["op"] for r in data["rows"]} == {"attention", "layer_norm", "bias_act", "ffn"}
    ours = [r for r in results if r.impl == "ours"]
    assert ours and all(r.error is None and r.ms > 0 and r.ratio == 1.0 for r in ours)
    packed = [r for r in results if r.case.startswith("packed") and r.op == "attention"]
    assert {r.impl for r in packed} >= {"ours", "sdpa-2calls"}
    h = data["headline"]
    assert {"attention_fwd_bwd_vs_sdpa_B32", "attention_fwd_bwd_vs_sdpa_text77", "attention_fwd_bwd_vs_sdpa_packed",
            "layer_norm_fwd_bwd_vs_torch_packed_residual", "ffn_fwd_bwd_vs_torch_quick_gelu"} <= set(h)
    b32 = [r for r in results if r.tag == "B32" and r.mode == "fwd+bwd"]
    best_sdpa = min(r.ms for r in b32 if r.impl.startswith("sdpa"))
    ours_ms = next(r.ms for r in b32 if r.impl == "ours")
    # headlines are rounded to 3 significant decimals: a slow run's ratio (0.006) is 1% off
    assert h["attention_fwd_bwd_vs_sdpa_B32"] == pytest.approx(best_sdpa / ours_ms, rel=1e-2, abs=5e-4)


def test_failing_ours_exits_nonzero(bench, tmp_path, capsys):
    out = tmp_path / "ops.json"
    rc = bench.main(["--device", "cpu", "--ops", "bias_act", "--modes", "fwd", "--min-run-time", "0",
                     "--backend", "no-such-backend", "--json", str(out)])
    assert rc == 1
    assert "FAILED" in capsys.readouterr().err
    data = json.loads(out.read_text())
    assert data["status"] == "failed" and data["failures"]
    assert all("no-such-backend" in f for f in data["failures"])
    peers = [r for r in data["rows"] if r["impl"] != "ours"]
    assert peers and all(r["ms"] > 0 for r in peers)  # the peers were still measured


def test_runs_without_gpu_machine_packages(without_gpu_machine_packages, tmp_path):
    out = tmp_path / "ops.json"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(without_gpu_machine_packages), str(ROOT)]))
    proc = subprocess.run([sys.executable, "bench/bench_ops.py", "--device", "cpu", "--smoke", "--ops",
                           "attention,bias_act", "--modes", "fwd+bwd", "--min-run-time", "0", "--json", str(out)],
                          capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert json.loads(out.read_text())["status"] == "ok"


def test_rejects_unknown_op(bench):
    with pytest.raises(SystemExit):
        bench.main(["--device", "cpu", "--ops", "nope"])
    with pytest.raises(SystemExit):
        bench.main(["--device", "cpu", "--modes", "bwd"])
