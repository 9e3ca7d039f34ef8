"""Model library: configs, presets, MSCLIP, factory, weight layouts (DESIGN §2, §5)."""
from .config import CLIP_MEAN, CLIP_STD, ModelConfig, TextConfig, VisionConfig
from .factory import (create_model, create_model_and_transforms, create_model_from_config, export_state_dict,
                      get_model_config, get_preprocess, list_models, load_model, load_pretrained, read_state_dict)
from .msclip import MSCLIP

__all__ = [
    "CLIP_MEAN",
    "CLIP_STD",
    "MSCLIP",
    "ModelConfig",
    "TextConfig",
    "VisionConfig",
    "create_model",
    "create_model_and_transforms",
    "create_model_from_config",
    "export_state_dict",
    "get_model_config",
    "get_preprocess",
    "list_models",
    "load_model",
    "load_pretrained",
    "read_state_dict",
]
