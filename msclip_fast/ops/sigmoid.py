"""The sigmoid (SigLIP) contrastive loss over a batch of image/text pairs (Zhai et al. 2023)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from . import sigmoid_fused as _fused
from . import sigmoid_triton as _triton
from .registry import Backend, Op


def validate_sigmoid_loss(image, text, logit_scale, logit_bias=None, negative_only=False) -> None:
    """The op's input validation (run once, before backend selection; the reference calls it
    too). Raises ValueError naming the field and its value. Reads no device value back."""
    for name, t in (("image", image), ("text", text)):
        if not isinstance(t, torch.Tensor) or t.dim() != 2:
            raise ValueError(f"{name} must be a 2-D (N, D) tensor, got {getattr(t, 'shape', t)!r}")
        if not t.is_floating_point():
            raise ValueError(f"{name} must be a floating tensor, got dtype {t.dtype}")
    if image.shape[1] != text.shape[1]:
        raise ValueError(f"image and text must share D, got {image.shape[1]} and {text.shape[1]}")
    if image.shape[0] < 1 or text.shape[0] < 1:
        raise ValueError(f"image and text need at least one row, got {image.shape[0]} and {text.shape[0]}")
    if not isinstance(negative_only, bool):
        raise ValueError(f"negative_only must be a bool, got {negative_only!r}")
    if not negative_only and image.shape[0] != text.shape[0]:
        raise ValueError(
            f"image and text must have one row count N (row i of each is a positive pair), got "
            f"{image.shape[0]} and {text.shape[0]}; only negative_only=True scores unequal counts"
        )
    for name, t in (("logit_scale", logit_scale), ("logit_bias", logit_bias)):
        if t is None and name == "logit_bias":
            continue
        if not isinstance(t, torch.Tensor) or t.numel() != 1 or not t.is_floating_point():
            raise ValueError(f"{name} must be a 1-element floating tensor, got {t!r}")


def sigmoid_loss_ref(image, text, logit_scale, logit_bias=None, negative_only=False):
    """Plain PyTorch reference for :func:`sigmoid_loss` (materializes the N_I x N_T logits)."""
    validate_sigmoid_loss(image, text, logit_scale, logit_bias, negative_only)
    return _sigmoid_loss_ref(image, text, logit_scale, logit_bias, negative_only)


def _sigmoid_loss_ref(image, text, logit_scale, logit_bias=None, negative_only=False):
    """The "reference" backend (inputs validated by the op)."""
    acc = torch.promote_types(image.dtype, torch.float32)
    logits = logit_scale.to(acc).reshape(()) * (image.to(acc) @ text.to(acc).t())
    if logit_bias is not None:
        logits = logits + logit_bias.to(acc).reshape(())
    z = -torch.ones_like(logits)
    if not negative_only:
        z.diagonal().fill_(1.0)
    return -F.logsigmoid(z * logits).sum() / image.shape[0]


_OP = Op("sigmoid_loss", validate=validate_sigmoid_loss)
# registration order is the "auto" preference: cuda > triton > cpu > reference ("auto" never picks
# triton for CPU tensors: the interpreter is for tests)
_OP.register(Backend("cuda", _fused.sigmoid_loss_fused, supports=_fused.cuda_supports,
                     available=_fused.cuda_available))
_OP.register(Backend("triton", _triton.sigmoid_loss_triton, supports=_triton.triton_supports,
                     available=_triton.triton_available, auto_skip=_triton.triton_auto_skip))
_OP.register(Backend("cpu", _fused.sigmoid_loss_fused, supports=_fused.cpu_supports,
                     available=_fused.cpu_available))
_OP.register(Backend("reference", _sigmoid_loss_ref))


def sigmoid_loss(image, text, logit_scale, logit_bias=None, negative_only=False, backend: str = "auto"):
    """Sigmoid loss of SigLIP (Zhai et al. 2023, "Sigmoid Loss for Language Image Pre-Training",
    Algorithm 1), normalized as open_clip's ``SigLipLoss`` (by the number of images)::

        logits = logit_scale · image @ textᵀ + logit_bias          (N_I, N_T)
        z_ij   = +1 if i == j (and not negative_only) else -1
        loss   = -Σ_ij log σ(z_ij · logits_ij) / N_I

    Args:
        image: ``(N_I, D)`` image features (normally L2-normalized), float32/16/bf16/64.
        text: ``(N_T, D)`` text features; ``N_T == N_I`` (row i of each is a positive pair)
            unless ``negative_only``.
        logit_scale: 1-element tensor, the scale itself (``exp`` of the log-scale parameter, as
            open_clip passes it); receives a gradient.
        logit_bias: 1-element tensor added to every logit (SigLIP initializes it to -10), or
            None for no bias; receives a gradient.
        negative_only: every pair is a negative (the chunks of other ranks' texts in the
            distributed loss); ``N_T`` may then differ from ``N_I``.
        backend: "auto", "cuda" (extension built with CUDA, CUDA tensors), "triton"
            (``kernels/sigmoid_loss.py``: CUDA tensors, or CPU tensors under
            ``TRITON_INTERPRET=1`` for tests), "cpu" (extension, CPU tensors; these three are
            fused: O(N) memory, never an N_I x N_T buffer, float32/16/bf16 inputs with fp32
            accumulation, deterministic) or "reference" (materializes the logits; any float
            dtype). "auto" takes the first of cuda, triton, cpu, reference that can run the
            inputs, and never picks triton for CPU tensors.
    Returns:
        0-d float32 (float64 for float64 inputs) tensor.
    Raises:
        ValueError: shapes, dtypes or arguments as above, or an unusable backend.
    """
    if torch.compiler.is_compiling():  # one opaque custom-op node (see .custom_ops)
        from . import custom_ops

        return custom_ops.sigmoid_loss(image, text, logit_scale, logit_bias, negative_only, backend)
    return _OP(image, text, logit_scale, logit_bias, negative_only, backend=backend)


sigmoid_loss.op = _OP
