"""The ops as ``torch.library.custom_op``\\ s (namespace ``msclip_fast``) for ``torch.compile``.

Design (issue 11):

- **Routing.** Each public op (:func:`~msclip_fast.ops.attention`, ...) keeps its registry
  dispatch in eager mode, unchanged (no extra dispatcher hop, same speed, same errors), and
  calls the custom op here only when ``torch.compiler.is_compiling()``. Dynamo then records
  one opaque node per op call instead of tracing into the backends, whose host reads
  (``cu_seqlens.tolist()``, ``check_ids_host``, ``_id_runs``, ``.item()``) and autograd
  Functions would break the graph.
- **Real implementation** = the eager op itself (``op(..., backend=backend)``): validation
  with its host checks, backend selection ("auto" is Triton for CUDA tensors, the reference
  for CPU tensors) and the backend run eagerly at graph run time. Eager cost of the routing:
  one ``torch.compiler.is_compiling()`` call per op call (~0.5 µs on the CI CPU, against
  hundreds of µs per op), so eager results and speed are unchanged; routing eager calls
  through the dispatcher too was not chosen (it would add the custom-op hop and change which
  autograd node eager graphs hold, for no benefit). An output that aliases an
  input (custom ops may not return aliases) is cloned.
- **Fake implementation** runs the op's shape/dtype validation at trace time (the host value
  checks are skipped on fake tensors, see :func:`.registry.host_readable`) and returns empty
  outputs of the right shape and dtype, so a bad call still fails with the op's ValueError.
- **Autograd** (``register_autograd``): ``setup_context`` saves the inputs; the backward is a
  second custom op ``<op>_backward``. FIRST VERSION, RECOMPUTE: every backward op re-runs the
  op's forward (same backend) under autograd and takes ``torch.autograd.grad``, so a compiled
  step costs one extra forward of each op (the backends' saved residuals - attention's lse,
  LayerNorm's shift/rstd, the loss LSEs - are not reused yet). The gradients equal eager's
  (same backend kernels, same formulas). A saved-residual version (forward op returning the
  residuals, backward op calling the kernels' ``*_bwd``) is the follow-up.

Argument encoding (schemas take no unions): attention's ``causal`` bool-or-tensor is
``causal_flags: Tensor?`` + ``causal: bool``; modality_layer_norm's int-or-tensor
``modality_ids`` is ``ids: Tensor?`` + ``mod: int``; absent optional outputs/gradients are
``(0,)`` placeholders.
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch
from torch import Tensor

import importlib
# the submodules (``from . import attention`` would give the function the package exports)
_att, _ba, _con, _ln, _sig = (importlib.import_module(f"{__package__}.{m}")
                              for m in ("attention", "bias_act", "contrastive", "layer_norm", "sigmoid"))

_DK = torch._C.DispatchKey


def _grad_mode_guard():
    """Re-enable autograd recording inside a custom op implementation (the dispatcher runs it
    below the Autograd key), for the recompute backward."""
    exc = torch._C._dispatch_tls_local_exclude_set()
    for k in (_DK.AutogradFunctionality, _DK.ADInplaceOrView):
        exc = exc.remove(k)
    return torch._C._ForceDispatchKeyGuard(torch._C._dispatch_tls_local_include_set(), exc)


def _no_alias(out: Tensor, inputs: Sequence) -> Tensor:
    """``out`` made contiguous (the fake impls return contiguous tensors: a compiled graph plans
    its views on those strides) and never aliasing ``inputs``."""
    out = out.contiguous()
    for t in inputs:
        if isinstance(t, Tensor) and t.numel() and out.numel() and (
                out.untyped_storage().data_ptr() == t.untyped_storage().data_ptr()):
            return out.clone()
    return out


def _empty() -> Tensor:
    return torch.empty(0)


def _vjp(fn: Callable, inputs: Sequence, grads: Sequence) -> list[Tensor]:
    """Gradients of ``fn(*inputs)`` w.r.t. every floating tensor of ``inputs`` (a ``(0,)``
    placeholder for None inputs; zeros where a gradient is absent), by recomputation."""
    with _grad_mode_guard(), torch.enable_grad():
        leaves = [t.detach().requires_grad_(True) if isinstance(t, Tensor) and t.is_floating_point() else t
                  for t in inputs]
        out = fn(*leaves)
        outs = out if isinstance(out, (tuple, list)) else (out,)
        pairs = [(o, g) for o, g in zip(outs, grads) if g is not None and isinstance(o, Tensor) and o.requires_grad]
        diff = [t for t in leaves if isinstance(t, Tensor) and t.requires_grad]
        got = torch.autograd.grad([o for o, _ in pairs], diff, [g for _, g in pairs], allow_unused=True) \
            if pairs and diff else [None] * len(diff)
    it = iter(got)
    res = []
    seen = [t for t in (*inputs, *grads) if isinstance(t, Tensor)]
    for t in leaves:
        if isinstance(t, Tensor) and t.requires_grad:
            g = next(it)
            g = t.new_zeros(t.shape) if g is None else _no_alias(g, seen)  # outputs may not alias
            seen.append(g)
            res.append(g)
        else:
            res.append(_empty())
    return res


def _fake_grads(*inputs) -> list[Tensor]:
    return [_like(t) if t is not None else torch.empty(0) for t in inputs]


def _like(t: Tensor, dtype=None) -> Tensor:
    """A contiguous empty tensor shaped like ``t`` (what the real impls return)."""
    return t.new_empty(t.shape, dtype=dtype or t.dtype)


def _opt(g: Tensor, like) -> Optional[Tensor]:
    return None if like is None else g


# ------------------------------------------------------------------------------ attention


def _attention_eager(q, k, v, cu_seqlens, causal_flags, causal, scale, max_seqlen, backend):
    c = causal_flags if causal_flags is not None else causal
    return _att.attention(q, k, v, cu_seqlens=cu_seqlens, causal=c, scale=scale, max_seqlen=max_seqlen,
                          backend=backend)


@torch.library.custom_op("msclip_fast::attention", mutates_args=())
def attention_op(q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Optional[Tensor], causal_flags: Optional[Tensor],
                 causal: bool, scale: Optional[float], max_seqlen: Optional[int], backend: str) -> Tensor:
    return _no_alias(_attention_eager(q, k, v, cu_seqlens, causal_flags, causal, scale, max_seqlen, backend),
                     (q, k, v))


@attention_op.register_fake
def _(q, k, v, cu_seqlens, causal_flags, causal, scale, max_seqlen, backend):
    _att.validate_attention(q, k, v, cu_seqlens, causal_flags if causal_flags is not None else causal, scale,
                            max_seqlen)
    return _like(q)


@torch.library.custom_op("msclip_fast::attention_backward", mutates_args=())
def attention_backward_op(grad: Tensor, q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Optional[Tensor],
                          causal_flags: Optional[Tensor], causal: bool, scale: Optional[float],
                          max_seqlen: Optional[int], backend: str) -> tuple[Tensor, Tensor, Tensor]:
    fn = lambda q, k, v: _attention_eager(q, k, v, cu_seqlens, causal_flags, causal, scale, max_seqlen, backend)  # noqa: E731
    return tuple(_vjp(fn, (q, k, v), (grad,)))


@attention_backward_op.register_fake
def _(grad, q, k, v, *rest):
    return _like(q), _like(k), _like(v)


def _attention_setup(ctx, inputs, output):
    q, k, v, cu, flags, causal, scale, max_seqlen, backend = inputs
    ctx.save_for_backward(q, k, v, cu, flags)
    ctx.args = (causal, scale, max_seqlen, backend)


def _attention_bwd(ctx, grad):
    q, k, v, cu, flags = ctx.saved_tensors
    dq, dk, dv = attention_backward_op(grad, q, k, v, cu, flags, *ctx.args)
    return dq, dk, dv, None, None, None, None, None, None


attention_op.register_autograd(_attention_bwd, setup_context=_attention_setup)


def attention(q, k, v, cu_seqlens=None, causal=False, scale=None, max_seqlen=None, backend="auto"):
    """:func:`msclip_fast.ops.attention` through the custom op (same arguments)."""
    flags = causal if isinstance(causal, Tensor) else None
    return attention_op(q, k, v, cu_seqlens, flags, bool(causal) if flags is None else False,
                        None if scale is None else float(scale), max_seqlen, backend)


# ---------------------------------------------------------------------- modality_layer_norm


def _ln_eager(x, weight, bias, ids, mod, eps, residual, backend):
    out = _ln.modality_layer_norm(x, weight, bias, ids if ids is not None else mod, eps=eps, residual=residual,
                                  backend=backend)
    return out if residual is not None else (out, _empty().to(x.device))


@torch.library.custom_op("msclip_fast::modality_layer_norm", mutates_args=())
def layer_norm_op(x: Tensor, weight: Tensor, bias: Tensor, ids: Optional[Tensor], mod: int, eps: float,
                  residual: Optional[Tensor], backend: str) -> tuple[Tensor, Tensor]:
    out, s = _ln_eager(x, weight, bias, ids, mod, eps, residual, backend)
    ins = (x, weight, bias, residual)
    return _no_alias(out, ins), _no_alias(s, ins)


@layer_norm_op.register_fake
def _(x, weight, bias, ids, mod, eps, residual, backend):
    _ln.validate_modality_layer_norm(x, weight, bias, ids if ids is not None else mod, eps, residual)
    if residual is None:
        return _like(x), x.new_empty(0)
    dt = torch.promote_types(x.dtype, residual.dtype)
    return _like(x, dt), _like(x, dt)


@torch.library.custom_op("msclip_fast::modality_layer_norm_backward", mutates_args=())
def layer_norm_backward_op(grad_out: Tensor, grad_sum: Optional[Tensor], x: Tensor, weight: Tensor, bias: Tensor,
                           ids: Optional[Tensor], mod: int, eps: float, residual: Optional[Tensor],
                           backend: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    def fn(x, weight, bias, residual):
        out, s = _ln_eager(x, weight, bias, ids, mod, eps, residual, backend)
        return (out, s) if residual is not None else (out,)

    return tuple(_vjp(fn, (x, weight, bias, residual), (grad_out, grad_sum)))


@layer_norm_backward_op.register_fake
def _(grad_out, grad_sum, x, weight, bias, ids, mod, eps, residual, backend):
    return tuple(_fake_grads(x, weight, bias, residual))


def _ln_setup(ctx, inputs, output):
    x, weight, bias, ids, mod, eps, residual, backend = inputs
    ctx.save_for_backward(x, weight, bias, ids, residual)
    ctx.args = (mod, eps)
    ctx.backend = backend


def _ln_bwd(ctx, grad_out, grad_sum):
    x, weight, bias, ids, residual = ctx.saved_tensors
    gs = grad_sum if residual is not None else None
    dx, dw, db, dr = layer_norm_backward_op(grad_out, gs, x, weight, bias, ids, *ctx.args, residual, ctx.backend)
    return dx, dw, db, None, None, None, _opt(dr, residual), None


layer_norm_op.register_autograd(_ln_bwd, setup_context=_ln_setup)


def modality_layer_norm(x, weight, bias, modality_ids, eps=1e-12, residual=None, backend="auto"):
    """:func:`msclip_fast.ops.modality_layer_norm` through the custom op (same arguments)."""
    ids = modality_ids if isinstance(modality_ids, Tensor) else None
    out, s = layer_norm_op(x, weight, bias, ids, 0 if ids is not None else int(modality_ids), float(eps), residual,
                           backend)
    return (out, s) if residual is not None else out


# ------------------------------------------------------------------------------- bias_act


@torch.library.custom_op("msclip_fast::bias_act", mutates_args=())
def bias_act_op(x: Tensor, bias: Optional[Tensor], act: str, backend: str) -> Tensor:
    return _no_alias(_ba.bias_act(x, bias, act=act, backend=backend), (x, bias))


@bias_act_op.register_fake
def _(x, bias, act, backend):
    _ba.validate_bias_act(x, bias, act)
    return _like(x)


@torch.library.custom_op("msclip_fast::bias_act_backward", mutates_args=())
def bias_act_backward_op(grad: Tensor, x: Tensor, bias: Optional[Tensor], act: str,
                         backend: str) -> tuple[Tensor, Tensor]:
    return tuple(_vjp(lambda x, b: _ba.bias_act(x, b, act=act, backend=backend), (x, bias), (grad,)))


@bias_act_backward_op.register_fake
def _(grad, x, bias, act, backend):
    return tuple(_fake_grads(x, bias))


def _ba_setup(ctx, inputs, output):
    x, bias, act, backend = inputs
    ctx.save_for_backward(x, bias)
    ctx.args = (act, backend)


def _ba_bwd(ctx, grad):
    x, bias = ctx.saved_tensors
    dx, db = bias_act_backward_op(grad, x, bias, *ctx.args)
    return dx, _opt(db, bias), None, None


bias_act_op.register_autograd(_ba_bwd, setup_context=_ba_setup)


def bias_act(x, bias=None, act="quick_gelu", backend="auto"):
    """:func:`msclip_fast.ops.bias_act` through the custom op (same arguments)."""
    return bias_act_op(x, bias, act, backend)


# ------------------------------------------------------------------------------------ ffn


@torch.library.custom_op("msclip_fast::ffn", mutates_args=())
def ffn_op(x: Tensor, fc_weight: Tensor, fc_bias: Optional[Tensor], proj_weight: Tensor, proj_bias: Optional[Tensor],
           act: str, backend: str) -> Tensor:
    ins = (x, fc_weight, fc_bias, proj_weight, proj_bias)
    return _no_alias(_ba.ffn(*ins, act=act, backend=backend), ins)


@ffn_op.register_fake
def _(x, fc_weight, fc_bias, proj_weight, proj_bias, act, backend):
    _ba.validate_ffn(x, fc_weight, fc_bias, proj_weight, proj_bias, act)
    return x.new_empty((*x.shape[:-1], proj_weight.shape[0]))


@torch.library.custom_op("msclip_fast::ffn_backward", mutates_args=())
def ffn_backward_op(grad: Tensor, x: Tensor, fc_weight: Tensor, fc_bias: Optional[Tensor], proj_weight: Tensor,
                    proj_bias: Optional[Tensor], act: str, backend: str) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    fn = lambda *a: _ba.ffn(*a, act=act, backend=backend)  # noqa: E731
    return tuple(_vjp(fn, (x, fc_weight, fc_bias, proj_weight, proj_bias), (grad,)))


@ffn_backward_op.register_fake
def _(grad, x, fc_weight, fc_bias, proj_weight, proj_bias, act, backend):
    return tuple(_fake_grads(x, fc_weight, fc_bias, proj_weight, proj_bias))


def _ffn_setup(ctx, inputs, output):
    *ts, act, backend = inputs
    ctx.save_for_backward(*ts)
    ctx.args = (act, backend)


def _ffn_bwd(ctx, grad):
    x, w1, b1, w2, b2 = ctx.saved_tensors
    dx, dw1, db1, dw2, db2 = ffn_backward_op(grad, x, w1, b1, w2, b2, *ctx.args)
    return dx, dw1, _opt(db1, b1), dw2, _opt(db2, b2), None, None


ffn_op.register_autograd(_ffn_bwd, setup_context=_ffn_setup)


def ffn(x, fc_weight, fc_bias, proj_weight, proj_bias, act="quick_gelu", backend="auto"):
    """:func:`msclip_fast.ops.ffn` through the custom op (same arguments)."""
    return ffn_op(x, fc_weight, fc_bias, proj_weight, proj_bias, act, backend)


# ----------------------------------------------------------------------- contrastive_loss


@torch.library.custom_op("msclip_fast::contrastive_loss", mutates_args=())
def contrastive_op(img: Tensor, txt: Tensor, scale: Tensor, backend: str) -> Tensor:
    return _no_alias(_con.contrastive_loss(img, txt, scale, backend=backend), (img, txt, scale))


@contrastive_op.register_fake
def _(img, txt, scale, backend):
    _con.validate_contrastive_loss(img, txt, scale)
    return img.new_empty((), dtype=torch.promote_types(img.dtype, torch.float32))


@torch.library.custom_op("msclip_fast::contrastive_loss_backward", mutates_args=())
def contrastive_backward_op(grad: Tensor, img: Tensor, txt: Tensor, scale: Tensor,
                            backend: str) -> tuple[Tensor, Tensor, Tensor]:
    fn = lambda i, t, s: _con.contrastive_loss(i, t, s, backend=backend)  # noqa: E731
    return tuple(_vjp(fn, (img, txt, scale), (grad,)))


@contrastive_backward_op.register_fake
def _(grad, img, txt, scale, backend):
    return tuple(_fake_grads(img, txt, scale))


def _con_setup(ctx, inputs, output):
    img, txt, scale, backend = inputs
    ctx.save_for_backward(img, txt, scale)
    ctx.backend = backend


def _con_bwd(ctx, grad):
    img, txt, scale = ctx.saved_tensors
    return (*contrastive_backward_op(grad, img, txt, scale, ctx.backend), None)


contrastive_op.register_autograd(_con_bwd, setup_context=_con_setup)


def contrastive_loss(img, txt, scale, backend="auto"):
    """:func:`msclip_fast.ops.contrastive_loss` through the custom op (same arguments)."""
    if not isinstance(scale, Tensor):  # let the fake impl's validation name the field
        _con.validate_contrastive_loss(img, txt, scale)
    return contrastive_op(img, txt, scale, backend)


# --------------------------------------------------------------------------- sigmoid_loss


@torch.library.custom_op("msclip_fast::sigmoid_loss", mutates_args=())
def sigmoid_op(image: Tensor, text: Tensor, logit_scale: Tensor, logit_bias: Optional[Tensor], negative_only: bool,
               backend: str) -> Tensor:
    ins = (image, text, logit_scale, logit_bias)
    return _no_alias(_sig.sigmoid_loss(*ins, negative_only, backend=backend), ins)


@sigmoid_op.register_fake
def _(image, text, logit_scale, logit_bias, negative_only, backend):
    _sig.validate_sigmoid_loss(image, text, logit_scale, logit_bias, negative_only)
    return image.new_empty((), dtype=torch.promote_types(image.dtype, torch.float32))


@torch.library.custom_op("msclip_fast::sigmoid_loss_backward", mutates_args=())
def sigmoid_backward_op(grad: Tensor, image: Tensor, text: Tensor, logit_scale: Tensor, logit_bias: Optional[Tensor],
                        negative_only: bool, backend: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    fn = lambda i, t, s, b: _sig.sigmoid_loss(i, t, s, b, negative_only, backend=backend)  # noqa: E731
    return tuple(_vjp(fn, (image, text, logit_scale, logit_bias), (grad,)))


@sigmoid_backward_op.register_fake
def _(grad, image, text, logit_scale, logit_bias, negative_only, backend):
    return tuple(_fake_grads(image, text, logit_scale, logit_bias))


def _sig_setup(ctx, inputs, output):
    image, text, s, b, negative_only, backend = inputs
    ctx.save_for_backward(image, text, s, b)
    ctx.args = (negative_only, backend)


def _sig_bwd(ctx, grad):
    image, text, s, b = ctx.saved_tensors
    di, dt, ds, db = sigmoid_backward_op(grad, image, text, s, b, *ctx.args)
    return di, dt, ds, _opt(db, b), None, None


sigmoid_op.register_autograd(_sig_bwd, setup_context=_sig_setup)


def sigmoid_loss(image, text, logit_scale, logit_bias=None, negative_only=False, backend="auto"):
    """:func:`msclip_fast.ops.sigmoid_loss` through the custom op (same arguments)."""
    for name, t in (("image", image), ("text", text), ("logit_scale", logit_scale)):
        if not isinstance(t, Tensor):
            _sig.validate_sigmoid_loss(image, text, logit_scale, logit_bias, negative_only)
    return sigmoid_op(image, text, logit_scale, logit_bias, bool(negative_only), backend)
