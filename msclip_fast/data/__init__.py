"""Data: CLIP tokenizer, WebDataset shards (make_shards), loaders and transforms.

Public names: :func:`get_tokenizer`, :func:`build_loader`, :func:`resolve_urls`,
:class:`Preprocess` (inference preprocess, as the loaders do it), :data:`CLIP_MEAN`,
:data:`CLIP_STD`.  See DESIGN.md §5-§6.
"""
from .loader import build_loader
from .preprocess import Preprocess
from .tokenizer import get_tokenizer
from .transforms import CLIP_MEAN, CLIP_STD
from .urls import resolve_urls

__all__ = ["get_tokenizer", "build_loader", "resolve_urls", "Preprocess", "CLIP_MEAN", "CLIP_STD"]
