"""torch.compile of the ops (``msclip_fast::*`` custom ops, :mod:`msclip_fast.ops.custom_ops`) and
of a whole MS-CLIP training step: no graph breaks, same loss and gradients as eager.

CPU, fp32, ``backend="aot_eager"`` (AOTAutograd traces forward and backward, no Inductor
codegen) and tiny sizes: CI time is the binding constraint.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import msclip_fast as mf
from msclip_fast import ops
from msclip_fast.ops._triton import kernels, triton_available

SOT, EOT = 49406, 49407


@pytest.fixture(autouse=True)
def _reset_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _rel(a, b):
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def _tokens(b, ctx):
    g = torch.Generator().manual_seed(0)
    tok = torch.zeros(b, ctx, dtype=torch.int64)
    for i in range(b):
        n = 3 + 4 * i
        tok[i, 0] = SOT
        tok[i, 1:n] = torch.randint(1, 49000, (n - 1,), generator=g)
        tok[i, n] = EOT
    return tok, [n + 1 for n in (3 + 4 * i for i in range(b))]


@pytest.mark.parametrize("packed", [True, False], ids=["packed", "per_tower"])
def test_train_step_fullgraph_matches_eager(packed):
    """forward (msclip-s-tiny) + ClipLoss compiled with fullgraph=True; ``loss.backward()`` then
    runs the AOTAutograd-compiled backward graph. Same loss and gradients as eager; explain()
    reports no graph break."""
    torch.manual_seed(0)
    model = mf.create_model("msclip-s-tiny")
    tokens, lens = _tokens(3, model.context_length)
    images = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    loss_fn = mf.ClipLoss()

    def step(images, tokens):
        img, txt = model.forward_features(images, tokens, packed=packed, text_lengths=lens)
        scale = model.logit_scale.exp()
        return loss_fn(F.normalize(img, dim=-1), F.normalize(txt, dim=-1), scale)

    def run(fn):
        model.zero_grad(set_to_none=True)
        loss = fn(images, tokens)
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    loss_e, grads_e = run(step)
    if packed:  # one explain (it traces again: CI time)
        ex = torch._dynamo.explain(step)(images, tokens)
        assert ex.graph_break_count == 0, [b.reason for b in ex.break_reasons]
        assert ex.graph_count == 1
        torch._dynamo.reset()
    loss_c, grads_c = run(torch.compile(step, backend="aot_eager", fullgraph=True))
    assert _rel(loss_c, loss_e) <= 1e-5
    assert grads_c.keys() == grads_e.keys() and len(grads_e) > 10
    for n in grads_e:
        assert _rel(grads_c[n], grads_e[n]) <= 1e-5, n


def _case(name):
    g = torch.Generator().manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    if name == "attention":
        return ops.attention, (r(2, 2, 5, 8), r(2, 2, 5, 8), r(2, 2, 5, 8)), dict(causal=True)
    if name == "attention_varlen":
        cu = torch.tensor([0, 4, 7, 9], dtype=torch.int32)
        flags = torch.tensor([False, True, True])
        return ops.attention, (r(9, 2, 8), r(9, 2, 8), r(9, 2, 8)), dict(cu_seqlens=cu, causal=flags, max_seqlen=4)
    if name == "layer_norm_ids_residual":
        ids = torch.tensor([0] * 4 + [1] * 3, dtype=torch.int8)
        return (lambda x, w, b, res, **kw: ops.modality_layer_norm(x, w, b, ids, residual=res, **kw),
                (r(7, 16), 1 + r(2, 16), r(2, 16), r(7, 16)), dict(eps=1e-5))
    if name == "layer_norm_int":
        return (lambda x, w, b, **kw: ops.modality_layer_norm(x, w, b, 1, **kw), (r(3, 4, 16), r(2, 16), r(2, 16)),
                {})
    if name == "bias_act":
        return ops.bias_act, (r(6, 12), r(12)), dict(act="gelu")
    if name == "ffn":
        return ops.ffn, (r(5, 8), r(16, 8), r(16), r(8, 16), r(8)), dict(act="quick_gelu")
    if name == "contrastive_loss":
        return ops.contrastive_loss, (F.normalize(r(6, 8), dim=-1), F.normalize(r(6, 8), dim=-1),
                                      torch.tensor(10.0)), {}
    if name == "sigmoid_loss":
        return ops.sigmoid_loss, (r(6, 8), r(6, 8), torch.tensor(10.0), torch.tensor(-2.0)), {}
    raise AssertionError(name)


OP_CASES = ["attention", "attention_varlen", "layer_norm_ids_residual", "layer_norm_int", "bias_act", "ffn",
            "contrastive_loss", "sigmoid_loss"]


def _fwd_bwd(fn, args, kwargs):
    leaves = [a.detach().clone().requires_grad_(True) for a in args]
    out = fn(*leaves, **kwargs)
    outs = out if isinstance(out, tuple) else (out,)
    g = torch.Generator().manual_seed(2)
    loss = sum((o * torch.randn(o.shape, generator=g)).sum() for o in outs)
    loss.backward()
    return [o.detach() for o in outs], [a.grad for a in leaves]


@pytest.mark.parametrize("name", OP_CASES)
def test_op_fullgraph_matches_eager(name):
    """Each op alone (reference backend) compiled with fullgraph: same outputs and gradients."""
    fn, args, kwargs = _case(name)
    kwargs = dict(kwargs, backend="reference")
    out_e, grad_e = _fwd_bwd(fn, args, kwargs)
    compiled = torch.compile(lambda *a: fn(*a, **kwargs), backend="aot_eager", fullgraph=True)
    out_c, grad_c = _fwd_bwd(compiled, args, {})
    for a, b in zip(out_c, out_e):
        assert _rel(a, b) <= 1e-6
    for a, b in zip(grad_c, grad_e):
        assert _rel(a, b) <= 1e-6


def test_fake_impl_validates_at_trace_time():
    """The op's ValueError (shape validation in the fake impl) still names the problem."""
    fn = torch.compile(lambda x, w, b: ops.modality_layer_norm(x, w, b, 0), backend="aot_eager", fullgraph=True)
    with pytest.raises(Exception, match="LayerNorm width"):
        fn(torch.randn(3, 8), torch.ones(2, 16), torch.zeros(2, 16))


def _count_calls(monkeypatch, module_name, fn_names):
    k = kernels(module_name)
    counts = dict.fromkeys(fn_names, 0)
    for n in fn_names:
        orig = getattr(k, n)

        def wrapped(*a, _orig=orig, _n=n, **kw):
            counts[_n] += 1
            return _orig(*a, **kw)

        monkeypatch.setattr(k, n, wrapped)
    return counts


@pytest.mark.skipif(bool(triton_available()), reason="triton unavailable")
def test_triton_backend_runs_inside_compiled_graph(monkeypatch):
    """backend="triton" on CPU tensors (interpreter): the compiled graph launches the Triton
    LayerNorm kernels (forward, and backward through the recompute), same values as eager."""
    counts = _count_calls(monkeypatch, "layer_norm", ["layer_norm_fwd", "layer_norm_bwd"])
    fn, args, kwargs = _case("layer_norm_ids_residual")
    kwargs = dict(kwargs, backend="triton")
    out_e, grad_e = _fwd_bwd(fn, args, kwargs)
    assert counts == {"layer_norm_fwd": 1, "layer_norm_bwd": 1}
    compiled = torch.compile(lambda *a: fn(*a, **kwargs), backend="aot_eager", fullgraph=True)
    out_c, grad_c = _fwd_bwd(compiled, args, {})
    assert counts["layer_norm_fwd"] >= 3 and counts["layer_norm_bwd"] == 2  # fwd + recompute in bwd
    for a, b in zip(out_c + grad_c, out_e + grad_e):
        assert _rel(a, b) <= 1e-6


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_auto_backend_is_triton_in_compiled_graph_on_cuda(monkeypatch):
    counts = _count_calls(monkeypatch, "layer_norm", ["layer_norm_fwd"])
    x = torch.randn(64, 128, device="cuda", requires_grad=True)
    w, b = torch.ones(2, 128, device="cuda"), torch.zeros(2, 128, device="cuda")
    ids = torch.randint(0, 2, (64,), device="cuda", dtype=torch.int8)
    fn = torch.compile(lambda x: ops.modality_layer_norm(x, w, b, ids), backend="aot_eager", fullgraph=True)
    out = fn(x)
    out.sum().backward()
    assert counts["layer_norm_fwd"] >= 1
    ref = ops.modality_layer_norm_ref(x.detach(), w, b, ids)
    assert _rel(out.detach(), ref) <= 1e-5
