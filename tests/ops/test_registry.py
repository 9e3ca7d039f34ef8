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
