"""Model library: configs, presets, MSCLIP, factory (DESIGN §2, §5)."""
from .config import CLIP_MEAN, CLIP_STD, ModelConfig, TextConfig, VisionConfig
from .factory import create_model, create_model_from_config, get_model_config, list_models, load_model
from .msclip import MSCLIP

__all__ = [
    "CLIP_MEAN",
    "CLIP_STD",
    "MSCLIP",
    "ModelConfig",
    "TextConfig",
    "VisionConfig",
    "create_model",
    "create_model_from_config",
    "get_model_config",
    "list_models",
    "load_model",
]
