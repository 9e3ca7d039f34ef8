"""One optimizer step over ``accum_steps`` micro-batches: independent or exact accumulation.

Independent accumulation averages the gradients of K separate losses; each micro-batch's
contrastive loss sees only its own ``B x world_size`` pairs.

Exact accumulation (feature caching, as in GradCache: Gao, Zhang, Han, Callan, "Scaling Deep
Contrastive Learning Batch Size under Memory Limited Setup", RepL4NLP 2021) gives the loss and
the gradients of one contrastive batch of all ``K x B x world_size`` pairs, with the activation
memory of one micro-batch:

1. forward every micro-batch without autograd; keep only its features (and the scale, and the
   logit bias of a model that has one: SigLIP);
2. the loss over all of them (gathered across ranks, fused O(N) memory) and its gradient with
   respect to every cached feature, the scale and the bias;
3. forward each micro-batch again with autograd and back-propagate its cached feature
   gradients (a surrogate ``<f, dL/df>`` per micro-batch); gradients accumulate; one optimizer
   step.

The first micro-batch runs with autograd already in step 1 and keeps its graph until step 3,
so it is never recomputed. Cost: one extra forward for K - 1 of the K micro-batches; memory:
one micro-batch's activations, plus the transient working set of one no-grad forward.
Semantics for BatchNorm models (MS-CLIP-S's conv stem and parallel branch): every micro-batch
is normalized with its own batch statistics in both passes, as in independent accumulation,
and running statistics are updated once per micro-batch, in micro-batch order (the cached
passes leave them alone), so they end where independent accumulation leaves them. The RNG
state of each cached pass is replayed in its recomputation, so any randomness in a forward
gives both passes the same features.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch
from torch import nn


class NonFiniteLossError(FloatingPointError):
    """The loss became NaN/inf; ``step`` is the 1-based optimizer step that produced it."""

    def __init__(self, step: int, value: float, checkpoint: str | None):
        self.step = step
        super().__init__(f"non-finite loss {value} at step {step}; stopped without saving "
                         f"(last good checkpoint: {checkpoint or 'none'})")


@dataclass(frozen=True)
class StepResult:
    """What one optimizer step reports.

    Fields: loss (float, mean over ranks: the loss over the whole accumulated contrastive batch
    under exact accumulation, the mean of the micro-batch losses under independent), scale
    (``exp(logit_scale)`` the step trained with), grad_norm (global norm before clipping, None
    if the engine cannot tell), lrs (group name -> learning rate of this step), bias (the
    logit bias the step trained with; None for a model without one).
    """

    loss: float
    scale: float
    grad_norm: float | None
    lrs: dict
    bias: float | None = None


@contextlib.contextmanager
def frozen_batchnorm_stats(model: nn.Module) -> Iterator[None]:
    """BatchNorm layers in training mode normalize with batch statistics but leave their
    running statistics (and ``num_batches_tracked``) untouched inside the block."""
    changed = [m for m in model.modules()
               if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training and m.track_running_stats]
    for m in changed:
        m.track_running_stats = False  # training mode then uses batch stats without updating them
    try:
        yield
    finally:
        for m in changed:
            m.track_running_stats = True


def _acc(t: torch.Tensor) -> torch.Tensor:
    """At least float32: the loss and its feature gradients accumulate in fp32 (fp64 stays)."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def _rng_state(device: torch.device) -> tuple:
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return torch.get_rng_state(), cuda


def _set_rng_state(state: tuple, device: torch.device) -> None:
    cpu, cuda = state
    torch.set_rng_state(cpu)
    if cuda is not None:
        torch.cuda.set_rng_state(cuda, device)


def _item(t: torch.Tensor | None) -> float | None:
    """A 0-d or (1,) tensor (DeepSpeed's promoted scalars) as a float."""
    return None if t is None else float(t.detach().float().reshape(-1)[0])


def _bias(out: tuple) -> torch.Tensor | None:
    """The logit bias of a forward's output: its 4th entry, when the model has one."""
    return out[3] if len(out) > 3 else None


def _checked(engine, loss: torch.Tensor, step: int, last_checkpoint: str | None) -> float:
    value = engine.all_mean(loss)  # every rank sees the same value -> the same decision
    if not math.isfinite(value):
        raise NonFiniteLossError(step, value, last_checkpoint)
    return value


def independent_step(engine, micro: Sequence[dict], step: int, last_checkpoint: str | None = None) -> StepResult:
    """Forward, loss and backward per micro-batch (gradient of the mean of the K losses), then
    one optimizer step. ``step`` is the 1-based number of the step being taken.

    Raises:
        NonFiniteLossError: a micro-batch's loss is NaN/inf (before its backward; no update).
    """
    losses, out = [], None
    for b in micro:
        out = engine.forward(b)
        loss = engine.loss(*out)
        losses.append(_checked(engine, loss, step, last_checkpoint))
        engine.backward(loss, mean_over_accum=True)
    lrs = engine.lrs()  # the rates this step trains with (step() advances the schedule)
    grad_norm = engine.step()
    return StepResult(sum(losses) / len(losses), _item(out[2]), grad_norm, lrs, _item(_bias(out)))


def cached_feature_gradients(engine, features: Sequence[tuple[torch.Tensor, torch.Tensor]], scale: torch.Tensor,
                             bias: torch.Tensor | None = None):
    """Loss over the concatenated micro-batch features and its gradients (step 2 of exact
    accumulation).

    Args:
        features: per micro-batch ``(image (B_k, E), text (B_k, E))`` features without autograd.
        scale: ``exp(logit_scale)`` of the first pass (0-d or ``(1,)``).
        bias: the logit bias of the first pass (0-d or ``(1,)``), or None (no bias).
    Returns:
        ``(loss, [(d_image_k, d_text_k)], d_scale, d_bias)``: the 0-d loss (no graph), the
        float32 (float64 for float64 features) gradients split like ``features``, and the
        gradients for ``scale`` and ``bias`` (their shapes; ``d_bias`` None without a bias).
    Raises:
        ValueError: the loss does not depend differentiably on both features, the scale and
            the bias (exact accumulation needs that gradient path).
    """
    img = _acc(torch.cat([f[0] for f in features])).requires_grad_(True)
    txt = _acc(torch.cat([f[1] for f in features])).requires_grad_(True)
    s = _acc(scale.detach()).requires_grad_(True)
    leaves, names = [img, txt, s], ["image features", "text features", "logit scale"]
    if bias is not None:
        leaves.append(_acc(bias.detach()).requires_grad_(True))
        names.append("logit bias")
    with torch.enable_grad():
        loss = engine.loss(*leaves)
        if not loss.requires_grad:
            raise ValueError(f"--accum-mode exact needs a loss differentiable in the features; "
                             f"{type(engine.loss_fn).__name__} returned a loss without a graph")
        grads = torch.autograd.grad(loss, leaves, allow_unused=True)
    missing = [n for n, g in zip(names, grads) if g is None]
    if missing:
        raise ValueError(f"--accum-mode exact needs the loss's gradient with respect to the features; "
                         f"{type(engine.loss_fn).__name__} gives none for the {', '.join(missing)} "
                         "(use --accum-mode independent for such a loss)")
    d_img, d_txt, d_s = grads[:3]
    d_b = grads[3] if bias is not None else None
    sizes = [f[0].shape[0] for f in features]
    tsizes = [f[1].shape[0] for f in features]
    return loss.detach(), list(zip(d_img.split(sizes), d_txt.split(tsizes))), d_s, d_b


def exact_step(engine, micro: Sequence[dict], step: int, last_checkpoint: str | None = None) -> StepResult:
    """Exact accumulation (module docstring): the loss and gradients of one contrastive batch
    of all micro-batches on all ranks, then one optimizer step.

    Raises:
        NonFiniteLossError: the accumulated loss is NaN/inf (before any backward; no update).
        ValueError: the engine's loss has no gradient path to the features.
    """
    model = engine.model
    device = engine.device
    k = len(micro)
    # micro-batch 0 runs with autograd right away and keeps its graph through the cached
    # passes of the others: its backward needs no second forward (K - 1 recomputations, not K)
    live = engine.forward(micro[0])
    scale, bias = live[2], _bias(live)
    features = [(_acc(live[0]).detach(), _acc(live[1]).detach())]
    rng = [None]
    with torch.no_grad(), frozen_batchnorm_stats(model):
        for b in micro[1:]:
            rng.append(_rng_state(device))
            out = engine.forward(b)
            features.append((_acc(out[0]), _acc(out[1])))
            del out
    loss, grads, d_scale, d_bias = cached_feature_gradients(engine, features, scale, bias)
    value = _checked(engine, loss, step, last_checkpoint)
    after = _rng_state(device)
    for i, (b, state, (g_img, g_txt)) in enumerate(zip(micro, rng, grads)):
        if i == 0:
            out = live
            live = None  # the graph is freed by this backward
        else:
            _set_rng_state(state, device)
            out = engine.forward(b)
        img, txt, s = out[:3]
        # <f, dL/df> has the gradient dL/df at f: backward of it is the chain rule's second half.
        # The scale's (and the bias's) term is split over the micro-batches so that every
        # backward reaches the same parameters (DeepSpeed ZeRO expects that), summing to dL/ds
        # (dL/db) once.
        surrogate = ((_acc(img) * g_img).sum() + (_acc(txt) * g_txt).sum() + (_acc(s) * d_scale).sum() / k)
        if d_bias is not None:
            surrogate = surrogate + (_acc(out[3]) * d_bias).sum() / k
        engine.backward(surrogate, mean_over_accum=False)
        del out, img, txt, s, surrogate
    _set_rng_state(after, device)
    lrs = engine.lrs()
    grad_norm = engine.step()
    return StepResult(value, _item(scale), grad_norm, lrs, _item(bias))


def train_step(engine, micro: Sequence[dict], mode: str, step: int, last_checkpoint: str | None = None) -> StepResult:
    """One optimizer step in accumulation ``mode`` ("exact" | "independent"). With one
    micro-batch both modes are the same computation; it runs once (no cached pass).

    Raises:
        ValueError: unknown ``mode``. See :func:`exact_step` / :func:`independent_step`.
    """
    if mode not in ("exact", "independent"):
        raise ValueError(f"--accum-mode must be 'exact' or 'independent', got {mode!r}")
    if mode == "exact" and len(micro) > 1:
        return exact_step(engine, micro, step, last_checkpoint)
    return independent_step(engine, micro, step, last_checkpoint)
