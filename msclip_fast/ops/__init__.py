"""Ops with interchangeable backends (see :mod:`msclip_fast.ops.registry`).

Models reach kernels only through this package; every op works on the CPU without Triton,
CUDA or the compiled extension through its ``"reference"`` backend.
"""
from .attention import attention, attention_ref
from .bias_act import ACTIVATIONS, bias_act, bias_act_ref, ffn, ffn_ref
from .contrastive import contrastive_loss, contrastive_loss_ref
from .contrastive_share import contrastive_loss_share
from .layer_norm import modality_layer_norm, modality_layer_norm_ref
from .sigmoid import sigmoid_loss, sigmoid_loss_ref

OPS = {f.op.name: f.op for f in (attention, modality_layer_norm, bias_act, ffn, contrastive_loss, sigmoid_loss)}


def backend_status() -> dict[str, dict[str, list[str]]]:
    """op name -> backend name -> reasons it is unavailable here (empty list: usable)."""
    return {name: op.status() for name, op in OPS.items()}


__all__ = [
    "ACTIVATIONS",
    "OPS",
    "attention",
    "attention_ref",
    "backend_status",
    "bias_act",
    "bias_act_ref",
    "contrastive_loss",
    "contrastive_loss_ref",
    "contrastive_loss_share",
    "ffn",
    "ffn_ref",
    "modality_layer_norm",
    "modality_layer_norm_ref",
    "sigmoid_loss",
    "sigmoid_loss_ref",
]

from . import custom_ops  # noqa: E402,F401  (registers the msclip_fast:: custom ops for torch.compile)
