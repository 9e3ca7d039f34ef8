"""Smoke test of bench/bench_ops.py on the CPU: tiny shapes, every op, JSON written."""
import importlib.util
import json
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "bench" / "bench_ops.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_ops", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(mod)
    yield mod
    sys.modules.pop(spec.name, None)


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
