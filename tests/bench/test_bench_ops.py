"""Smoke test of bench/bench_ops.py on the CPU: tiny shapes, every op, JSON written."""
import json

import pytest

BENCH_SCRIPT = "bench_ops"  # the `bench` fixture (conftest.py) loads bench/bench_ops.py


def test_cpu_smoke_writes_json(bench, tmp_path):
    out = tmp_path / "ops.json"
    results = bench.main(["--device", "cpu", "--smoke", "--modes", "fwd,fwd+bwd", "--min-run-time", "0",
                          "--json", str(out)])
    data = json.loads(out.read_text())
    assert data["machine"]["device"] == "cpu" and data["smoke"] is True
    ops_seen = {r["op"] for r in data["results"]}
    assert ops_seen == {"attention", "layer_norm", "bias_act", "ffn"}
    ours = [r for r in results if r.impl == "ours"]
    assert ours and all(r.error is None and r.ms > 0 and r.ratio == 1.0 for r in ours)
    packed = [r for r in results if r.case.startswith("packed") and r.op == "attention"]
    assert {r.impl for r in packed} >= {"ours", "sdpa-2calls"}


def test_rejects_unknown_op(bench):
    with pytest.raises(SystemExit):
        bench.main(["--device", "cpu", "--ops", "nope"])
