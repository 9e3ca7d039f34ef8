"""msclip_fast: a custom-kernel training engine for modality-shared CLIP (MS-CLIP).

Public API (see DESIGN.md §5)::

    import msclip_fast as mf
    mf.list_models()
    model = mf.create_model("msclip-s-tiny")
    tok = mf.get_tokenizer()
    img, txt, scale = model(images, tok(["a photo of a cat"]))
    loss = mf.ClipLoss()(img, txt, scale)
"""
from . import ops
from .data.tokenizer import get_tokenizer
from .losses import ClipLoss
from .models import create_model, list_models, load_model

__version__ = "0.1.0"

__all__ = ["ops", "ClipLoss", "create_model", "get_tokenizer", "list_models", "load_model"]
