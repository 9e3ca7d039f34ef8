"""nn.Modules with parameters, built on :mod:`msclip_fast.ops` (DESIGN §4)."""
from .attention import ModalityParallelAttention, MultiheadSelfAttention
from .block import SHARE_CHOICES, TransformerBlock
from .layer_norm import IMAGE, MODALITY_NAMES, TEXT, ModalityLayerNorm
from .mlp import MLP, ModalityParallelFFN
from .packing import PackedBatch, text_lengths

__all__ = [
    "IMAGE",
    "MLP",
    "MODALITY_NAMES",
    "ModalityLayerNorm",
    "ModalityParallelAttention",
    "ModalityParallelFFN",
    "MultiheadSelfAttention",
    "PackedBatch",
    "SHARE_CHOICES",
    "TEXT",
    "TransformerBlock",
    "text_lengths",
]
