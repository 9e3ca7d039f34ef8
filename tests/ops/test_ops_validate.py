"""The op layer validates inputs in ONE place (issue 7): each op's ``validate`` step runs once per
call, before backend selection; the public ``*_ref`` functions run the same step; backends'
``supports`` hold only their own limits, under one naming scheme
(``<backend>_available`` / ``<backend>_supports`` / ``<backend>_auto_skip``)."""
import pytest
import torch

from msclip_fast import ops
from msclip_fast.modules import MultiheadSelfAttention
from msclip_fast.ops import (
    attention_triton,
    bias_act_triton,
    contrastive_fused,
    contrastive_triton,
    ffn_triton,
    layer_norm_triton,
    sigmoid_fused,
    sigmoid_triton,
)


def _valid_args():
    """Valid CPU inputs per op: (args, kwargs)."""
    q = torch.randn(10, 2, 8)
    cu = torch.tensor([0, 4, 10], dtype=torch.int32)
    x = torch.randn(5, 8)
    return {
        "attention": ((q, q, q), dict(cu_seqlens=cu, causal=torch.tensor([False, True]), max_seqlen=6)),
        "modality_layer_norm": ((x, torch.ones(2, 8), torch.zeros(2, 8), torch.tensor([0, 1, 1, 0, 1])),
                                dict(residual=torch.randn(5, 8))),
        "bias_act": ((x, torch.randn(8)), dict(act="gelu")),
        "ffn": ((x, torch.randn(16, 8), torch.randn(16), torch.randn(4, 16), None), dict(act="quick_gelu")),
        "contrastive_loss": ((x, torch.randn(5, 8), torch.tensor(10.0)), {}),
        "sigmoid_loss": ((x, torch.randn(3, 8), torch.tensor(10.0), torch.tensor(-10.0)), dict(negative_only=True)),
    }


PUBLIC = {"attention": ops.attention, "modality_layer_norm": ops.modality_layer_norm, "bias_act": ops.bias_act,
          "ffn": ops.ffn, "contrastive_loss": ops.contrastive_loss, "sigmoid_loss": ops.sigmoid_loss}
REFS = {"attention": ops.attention_ref, "modality_layer_norm": ops.modality_layer_norm_ref,
        "bias_act": ops.bias_act_ref, "ffn": ops.ffn_ref, "contrastive_loss": ops.contrastive_loss_ref,
        "sigmoid_loss": ops.sigmoid_loss_ref}


@pytest.mark.parametrize("name", sorted(PUBLIC))
def test_validate_runs_once_per_call_before_selection(name, monkeypatch):
    op = ops.OPS[name]
    assert callable(op.validate)
    args, kwargs = _valid_args()[name]
    calls = []
    real = op.validate
    monkeypatch.setattr(op, "validate", lambda *a, **k: (calls.append(1), real(*a, **k))[1])
    out_op = PUBLIC[name](*args, backend="reference", **kwargs)
    assert len(calls) == 1  # the reference backend does not validate again
    # the public reference function validates by itself (it is called directly) with the same step
    out_ref = REFS[name](*args, **kwargs)
    assert len(calls) == 1  # (it calls the module's function, not the op attribute)
    for a, b in zip(out_op if isinstance(out_op, tuple) else (out_op,), out_ref if isinstance(out_ref, tuple) else (out_ref,)):
        torch.testing.assert_close(a, b)


BAD = [
    # (op, args, kwargs, explicit backend that cannot run these CPU inputs, message of the validation)
    ("attention", lambda: (torch.randn(2, 3, 5, 8), torch.randn(2, 3, 4, 8), torch.randn(2, 3, 5, 8)), {},
     "xformers", "one shape"),
    ("modality_layer_norm", lambda: (torch.randn(4, 8), torch.ones(2, 8), torch.zeros(2, 8), 5), {},
     "triton", "modality_ids=5"),
    ("bias_act", lambda: (torch.randn(3, 4), None), {"act": "relu6"}, "triton", "act must be one of"),
    ("ffn", lambda: (torch.randn(3, 4), torch.randn(8, 5), None, torch.randn(4, 8), None), {}, "triton",
     r"fc_weight must be \(N, 4\)"),
    ("contrastive_loss", lambda: (torch.randn(3, 4), torch.randn(3, 5), torch.tensor(1.0)), {}, "cuda", "share D"),
    ("sigmoid_loss", lambda: (torch.randn(3, 4), torch.randn(2, 4), torch.tensor(1.0), None), {}, "cpu",
     "one row count"),
]


@pytest.mark.parametrize("name,make,kwargs,backend,msg", BAD, ids=[b[0] for b in BAD])
def test_invalid_inputs_fail_validation_whatever_the_backend(name, make, kwargs, backend, msg):
    args = make()
    for b in ("auto", "reference", backend):
        with pytest.raises(ValueError, match=msg):
            PUBLIC[name](*args, backend=b, **kwargs)
    with pytest.raises(ValueError, match=msg):
        ops.OPS[name].select(backend, *args, **kwargs)
    with pytest.raises(ValueError, match=msg):
        REFS[name](*args, **kwargs)


def test_validation_reads_nothing_back_from_the_device():
    """On the meta device any value read raises: each op's validate step passes on meta inputs
    (the value checks run for CPU tensors only)."""
    m = torch.device("meta")
    q = torch.empty(10, 2, 8, device=m)
    ops.OPS["attention"].validate(q, q, q, cu_seqlens=torch.empty(3, dtype=torch.int32, device=m),
                                  causal=torch.empty(2, dtype=torch.bool, device=m), max_seqlen=6)
    x = torch.empty(5, 8, device=m)
    ops.OPS["modality_layer_norm"].validate(x, torch.empty(2, 8, device=m), torch.empty(2, 8, device=m),
                                            torch.empty(5, dtype=torch.int8, device=m), residual=x)
    ops.OPS["bias_act"].validate(x, torch.empty(8, device=m))
    ops.OPS["ffn"].validate(x, torch.empty(16, 8, device=m), None, torch.empty(4, 16, device=m), None)
    ops.OPS["contrastive_loss"].validate(x, x, torch.empty((), device=m))
    ops.OPS["sigmoid_loss"].validate(x, x[:3], torch.empty((), device=m), torch.empty(1, device=m), True)


def test_one_naming_scheme_for_backend_checks():
    for name, mod in (("attention", attention_triton), ("modality_layer_norm", layer_norm_triton),
                      ("bias_act", bias_act_triton), ("ffn", ffn_triton), ("contrastive_loss", contrastive_triton),
                      ("sigmoid_loss", sigmoid_triton)):
        be = ops.OPS[name].backends["triton"]
        assert be.supports is mod.triton_supports and be.available is mod.triton_available, name
        assert be.auto_skip is mod.triton_auto_skip, name
    xf = ops.OPS["attention"].backends["xformers"]
    assert (xf.supports, xf.available, xf.auto_skip) == (
        attention_triton.xformers_supports, attention_triton.xformers_available, attention_triton.xformers_auto_skip)
    for b in ("cpu", "cuda"):
        be = ops.OPS["contrastive_loss"].backends[b]
        assert be.supports is getattr(contrastive_fused, f"{b}_supports")
        assert be.available is getattr(contrastive_fused, f"{b}_available")
        be = ops.OPS["sigmoid_loss"].backends[b]
        assert be.supports is getattr(sigmoid_fused, f"{b}_supports")
        assert be.available is getattr(sigmoid_fused, f"{b}_available")


def test_backend_supports_hold_only_backend_limits():
    x = torch.randn(4, 8)
    # mixed dtypes are valid LayerNorm inputs: the Triton backend states no dtype limit for them
    reasons = layer_norm_triton.triton_supports(x.bfloat16(), torch.ones(2, 8), torch.zeros(2, 8), 0, residual=x)
    assert not [r for r in reasons if "dtype" in r], reasons
    # the extension's limits: devices and dtypes, no shape re-checks
    assert contrastive_fused.cpu_supports(x, x, torch.tensor(1.0)) == []
    assert contrastive_fused.cpu_supports(x.double(), x, torch.tensor(1.0)) == [
        "img dtype torch.float64 not supported (float32/float16/bfloat16)",
        "img dtype torch.float64 differs from txt dtype torch.float32",
    ]


@pytest.mark.parametrize(
    "kwargs,msg",
    [
        (dict(max_seqlen=torch.tensor(6)), "max_seqlen must be a host int"),
        (dict(max_seqlen=True), "max_seqlen must be a host int"),
        (dict(max_seqlen=6.0), "max_seqlen must be a host int"),
        (dict(max_seqlen=-1), "max_seqlen must be >= 0, got -1"),
        (dict(max_seqlen=5), r"max_seqlen=5 is less than the longest sequence in cu_seqlens \(6\)"),
        (dict(cu_seqlens=torch.tensor([0.0, 4.0, 10.0])), "cu_seqlens must be an integer tensor"),
    ],
)
def test_max_seqlen_and_cu_seqlens_checks(kwargs, msg):
    q = torch.randn(10, 2, 8)
    kw = {"cu_seqlens": torch.tensor([0, 4, 10], dtype=torch.int32), **kwargs}
    for backend in ("auto", "reference"):
        with pytest.raises(ValueError, match=msg):
            ops.attention(q, q, q, backend=backend, **kw)


def test_max_seqlen_needs_the_varlen_layout():
    q = torch.randn(1, 2, 5, 8)
    with pytest.raises(ValueError, match="max_seqlen=5 is for the varlen layout"):
        ops.attention(q, q, q, max_seqlen=5)
    attn = MultiheadSelfAttention(16, 2)
    with pytest.raises(ValueError, match="max_seqlen=5 is for the packed layout"):
        attn(torch.randn(1, 5, 16), max_seqlen=5)
    # packed: a larger max_seqlen than needed is allowed (it only sizes the kernel grid)
    x = torch.randn(9, 16, dtype=torch.float64)
    attn = attn.double()
    cu = torch.tensor([0, 5, 9], dtype=torch.int32)
    torch.testing.assert_close(attn(x, cu_seqlens=cu, max_seqlen=64), attn(x, cu_seqlens=cu))


def test_layer_norm_rejects_non_float_x_and_residual():
    w = torch.ones(2, 8)
    with pytest.raises(ValueError, match="x must be a floating tensor, got dtype torch.int64"):
        ops.modality_layer_norm(torch.ones(3, 8, dtype=torch.long), w, w, 0)
    with pytest.raises(ValueError, match="residual must be a floating tensor, got dtype torch.int32"):
        ops.modality_layer_norm(torch.randn(3, 8), w, w, 0, residual=torch.ones(3, 8, dtype=torch.int32))
    with pytest.raises(ValueError, match=r"residual shape \(3, 7\) must equal x shape \(3, 8\)"):
        ops.modality_layer_norm_ref(torch.randn(3, 8), w, w, 0, residual=torch.randn(3, 7))
