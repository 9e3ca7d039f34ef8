import json
import logging
import os

import pytest
import torch

from msclip_fast import ops


def test_explicit_backend_that_cannot_run_names_reason():
    q = torch.randn(10, 2, 8)
    cu = torch.tensor([0, 4, 10], dtype=torch.int32)
    with pytest.raises(ValueError, match="sdpa.*varlen"):
        ops.attention(q, q, q, cu_seqlens=cu, backend="sdpa")


def test_unknown_backend_rejected():
    x = torch.randn(3, 4)
    with pytest.raises(ValueError, match="nope"):
        ops.bias_act(x, None, backend="nope")


def test_env_override(monkeypatch):
    q = torch.randn(1, 1, 5, 8, dtype=torch.float64)
    monkeypatch.setenv("MSCLIP_FAST_BACKEND", "sdpa")
    assert ops.attention.op.select("auto", q, q, q).name == "sdpa"
    monkeypatch.setenv("MSCLIP_FAST_BACKEND", "reference")
    assert ops.attention.op.select("auto", q, q, q).name == "reference"


def test_backend_status_lists_every_op():
    st = ops.backend_status()
    assert set(st) == {"attention", "modality_layer_norm", "bias_act", "ffn", "contrastive_loss",
                       "sigmoid_loss"}
    assert st["attention"]["reference"] == []


def test_register_before_and_auto_skip():
    from msclip_fast.ops.registry import Backend, Op

    op = Op("toy")
    op.register(Backend("reference", lambda x: "ref"))
    op.register(Backend("triton", lambda x: "fast", auto_skip=lambda x: [] if x == "gpu" else ["cpu input"]),
                before="reference")
    assert list(op.backends) == ["triton", "reference"]
    assert op("gpu") == "fast"  # auto prefers it when it does not skip
    assert op("cpu") == "ref"  # auto passes over it...
    assert op("cpu", backend="triton") == "fast"  # ...but it still runs when named
    with pytest.raises(ValueError, match="before"):
        op.register(Backend("cuda", lambda x: 0), before="nope")


def test_env_override_skips_ops_without_that_backend(monkeypatch):
    x = torch.randn(4, 8)
    monkeypatch.setenv("MSCLIP_FAST_BACKEND", "sdpa")  # only attention has "sdpa"
    assert ops.bias_act.op.select("auto", x, None).name == "reference"
    monkeypatch.setenv("MSCLIP_FAST_BACKEND", "nope")
    with pytest.raises(ValueError, match="MSCLIP_FAST_BACKEND"):
        ops.bias_act(x, None)


# ---------------------------------------------------------------- fallback logging: one line per process


@pytest.fixture
def fresh_fallback_log(monkeypatch):
    """A process that has logged no fallback yet, whose registry holds only the ops a test adds."""
    from msclip_fast.ops import registry

    monkeypatch.setattr(registry, "_summary_logged", False)
    monkeypatch.setattr(registry, "_OPS", [])
    return registry


def _toy_ops():
    from msclip_fast.ops.registry import Backend, Op

    no_cuda = Backend("cuda", lambda x: "cuda", available=lambda: ["no CUDA device"])
    a = Op("toy_a")
    a.register(no_cuda)
    a.register(Backend("cpu", lambda x: "cpu"))
    b = Op("toy_b")
    b.register(Backend("triton", lambda x: "triton", available=lambda: ["triton not importable"],
                       supports=lambda x: [] if x < 100 else ["x too big"]))
    b.register(Backend("reference", lambda x: "ref"))
    c = Op("toy_c")  # its preferred backend runs here, unless the input is too big for it
    c.register(Backend("triton", lambda x: "triton", supports=lambda x: [] if x < 100 else ["x too big"]))
    c.register(Backend("reference", lambda x: "ref"))
    d = Op("toy_d")  # never falls back: not in the summary
    d.register(Backend("reference", lambda x: "ref"))
    return a, b, c, d


def _registry_records(caplog, level):
    return [r.getMessage() for r in caplog.records if r.name == "msclip_fast.ops.registry" and r.levelno == level]


def test_fallbacks_are_one_info_line_per_process(fresh_fallback_log, caplog):
    a, b, c, d = _toy_ops()
    with caplog.at_level(logging.DEBUG, logger="msclip_fast.ops.registry"):
        assert a(1) == "cpu"
        info = _registry_records(caplog, logging.INFO)
        # every op this machine makes fall back, with the backend it takes and why, in one line
        assert info == ["auto backend falls back: toy_a -> 'cpu'; toy_b -> 'reference' "
                        "(cuda: no CUDA device; triton: triton not importable)"]
        assert b(1) == "ref" and a(2) == "cpu" and b(2) == "ref" and c(1) == "triton" and d(1) == "ref"
        assert _registry_records(caplog, logging.INFO) == info  # foreseen: no more INFO lines
        # toy_b's own line at DEBUG, once (toy_a's actual fallback is the summary's own entry)
        assert _registry_records(caplog, logging.DEBUG) == [
            "toy_b: auto backend falls back to 'reference' (triton: triton not importable)"]
        # a fallback the machine did not foresee (these inputs): its own INFO line, once
        assert c(500) == "ref" and c(501) == "ref"
        assert _registry_records(caplog, logging.INFO) == info + [
            "toy_c: auto backend falls back to 'reference' (triton: x too big)"]


def test_fallback_summary_names_reasons_per_op_when_they_differ(fresh_fallback_log, caplog):
    from msclip_fast.ops.registry import Backend, Op

    ops_ = []
    for name, why in (("toy_x", "no kernels for this dtype"), ("toy_y", "no CUDA device"), ("toy_z", "no CUDA device")):
        o = Op(name)
        o.register(Backend("triton", lambda x: 0, available=lambda why=why: [why]))
        o.register(Backend("reference", lambda x: 1))
        ops_.append(o)
    with caplog.at_level(logging.INFO, logger="msclip_fast.ops.registry"):
        assert ops_[1](0) == 1 and ops_[0](0) == 1 and ops_[2](0) == 1
    assert _registry_records(caplog, logging.INFO) == [
        "auto backend falls back: toy_x, toy_y, toy_z -> 'reference' (triton (toy_x): no kernels for this dtype; "
        "triton (toy_y, toy_z): no CUDA device)"]


def test_reset_op_logs_its_fallback_again(fresh_fallback_log, caplog):
    """Clearing an op's ``_warned`` (as tests do to watch one op) makes its next fallback an INFO
    line again, even after the process's summary."""
    a, b, *_ = _toy_ops()
    a(1)
    b._warned = set()
    with caplog.at_level(logging.INFO, logger="msclip_fast.ops.registry"):
        b(1)
    assert _registry_records(caplog, logging.INFO) == [
        "toy_b: auto backend falls back to 'reference' (triton: triton not importable)"]


def test_real_model_logs_one_fallback_line(tmp_path):
    """A fresh process (no TRITON_INTERPRET, as a user runs it) through a model forward, the
    loss and its backward: at most one INFO line from the registry, naming every op that falls
    back on this machine (on a CPU machine: all of them)."""
    import subprocess
    import sys

    script = r'''
import json, logging, torch
records = []
class H(logging.Handler):
    def emit(self, r):
        records.append((r.levelno, r.getMessage()))
lg = logging.getLogger("msclip_fast.ops.registry"); lg.addHandler(H()); lg.setLevel(logging.DEBUG)
import msclip_fast as mf
from msclip_fast.ops import registry
m = mf.create_model("msclip-tiny")
tok = mf.get_tokenizer()
img, txt, s = m(torch.randn(2, 3, 64, 64), tok(["a cat", "a dog"]))
mf.ClipLoss()(img, txt, s).backward()
m(torch.randn(2, 3, 64, 64), tok(["a bird", "a fish"]))
ops = [r() for r in registry._OPS if r() is not None]
print(json.dumps({"records": records, "machine": [o.name for o in ops if o.machine_fallback()]}))
'''
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "MSCLIP_FAST_BACKEND")}
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    info = [m for lv, m in out["records"] if lv == logging.INFO]
    if not out["machine"]:  # a GPU machine with every preferred backend available
        assert all(":" in m for m in info)
        return
    assert len(info) == 1 and info[0].startswith("auto backend falls back: "), info
    for name in out["machine"]:
        assert name in info[0]
    debug = [m for lv, m in out["records"] if lv == logging.DEBUG]
    assert len(debug) == len(set(debug))  # each op's own line at most once
