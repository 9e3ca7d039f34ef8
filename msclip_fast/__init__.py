"""msclip_fast: a custom-kernel training engine for modality-shared CLIP (MS-CLIP).

Public API (see DESIGN.md §5)::

    import msclip_fast as mf
    mf.list_models()
    model = mf.create_model("msclip-s-tiny")
    tok = mf.get_tokenizer()
    model, preprocess_train, preprocess = mf.create_model_and_transforms("msclip-s-tiny")
    preprocess = mf.get_preprocess(mf.load_model("runs/demo"))   # path/bytes/PIL -> (3,S,S)
    img, txt, scale = model(images, tok(["a photo of a cat"]))
    loss = mf.ClipLoss()(img, txt, scale)

Names are resolved on first use so that ``import msclip_fast.ops`` stays light (no
open_clip, DeepSpeed or DALI import).
"""
import importlib

__version__ = "0.1.0"

_LAZY = {
    "ops": ("msclip_fast.ops", None),
    "get_tokenizer": ("msclip_fast.data.tokenizer", "get_tokenizer"),
    "integrations": ("msclip_fast.integrations", None),
    "ClipLoss": ("msclip_fast.losses", "ClipLoss"),
    "SigLipLoss": ("msclip_fast.losses", "SigLipLoss"),
    "create_model": ("msclip_fast.models", "create_model"),
    "create_model_and_transforms": ("msclip_fast.models", "create_model_and_transforms"),
    "export_state_dict": ("msclip_fast.models", "export_state_dict"),
    "get_preprocess": ("msclip_fast.models", "get_preprocess"),
    "list_models": ("msclip_fast.models", "list_models"),
    "load_model": ("msclip_fast.models", "load_model"),
    "Preprocess": ("msclip_fast.data.preprocess", "Preprocess"),
    "text_lengths": ("msclip_fast.modules.packing", "text_lengths"),
}

__all__ = sorted(_LAZY)


def __getattr__(name):
    if name not in _LAZY:
        raise AttributeError(f"module 'msclip_fast' has no attribute {name!r}")
    module, attr = _LAZY[name]
    value = importlib.import_module(module)
    if attr is not None:
        value = getattr(value, attr)
    globals()[name] = value
    return value


def __dir__():
    return sorted(list(globals()) + list(_LAZY))
