"""Image preprocessing for inference, exactly as the loaders do it (open_clip's ``preprocess``).

``Image.open(p).convert("RGB")`` puts transparent pixels on *black*; the shards and the
loaders composite them on *white* (:func:`~msclip_fast.data.images.to_rgb_on_white`), so a
model trained here sees clip art on white. :class:`Preprocess` repeats the loader's steps::

    open_image (bytes / path / PIL) -> to_rgb_on_white -> eval_transform (or train_transform)

and returns the ``(3, S, S)`` float32 tensor that the eval loader yields for the same file.
Build one with :func:`msclip_fast.get_preprocess` (from a model) or
:func:`msclip_fast.create_model_and_transforms`.
"""
from __future__ import annotations

import os
import random
from typing import Optional, Sequence, Union

import torch
from PIL import Image

from .images import DEFAULT_MAX_PIXELS, SkipSample, open_image, to_rgb_on_white
from .transforms import CLIP_MEAN, CLIP_STD, TransformConfig, eval_transform, train_transform

ImageInput = Union[str, os.PathLike, bytes, bytearray, memoryview, Image.Image]


class Preprocess:
    """Callable image -> ``(3, image_size, image_size)`` float32 tensor, normalised with
    ``(x / 255 - mean) / std``.

    Args:
        image_size: output side in pixels (the model's ``image_size``).
        mean, std: per-channel RGB normalisation for pixels in [0, 1] (the model's
            ``image_mean`` / ``image_std``).
        train: ``False``: resize shorter side + center crop (the eval loader);
            ``True``: the training augmentation (RandomResizedCrop, scale (0.9, 1)).
        seed: seed of the train variant's crop generator (``None``: from the OS); unused
            in eval.
        max_pixels: larger images (width * height, from the header) are refused.
    Raises:
        ValueError: bad ``image_size`` / ``mean`` / ``std`` (from :class:`TransformConfig`).
    """

    def __init__(self, image_size: int, mean: Sequence[float] = CLIP_MEAN, std: Sequence[float] = CLIP_STD,
                 *, train: bool = False, seed: Optional[int] = None, max_pixels: int = DEFAULT_MAX_PIXELS):
        self.cfg = TransformConfig(image_size=image_size, mean=tuple(mean), std=tuple(std))
        self.train = bool(train)
        self.max_pixels = max_pixels
        self._rng = random.Random(seed)

    @property
    def image_size(self) -> int:
        return self.cfg.image_size

    def load(self, image: ImageInput) -> Image.Image:
        """``image`` (a path, encoded bytes, or a PIL image of any mode) -> RGB PIL image
        with transparency composited on white.

        Raises:
            ValueError: unreadable, empty or oversized image (names the path when given);
                an unsupported input type.
        """
        if isinstance(image, Image.Image):
            return to_rgb_on_white(image)
        if isinstance(image, os.PathLike):
            image = os.fspath(image)
        if not isinstance(image, (str, bytes, bytearray, memoryview)):
            raise ValueError(f"image must be a path, bytes or a PIL image, got {type(image).__name__}")
        what = repr(image) if isinstance(image, str) else f"{len(image)} bytes of image data"
        if isinstance(image, str) and not os.path.isfile(image):
            raise ValueError(f"image file {image!r} does not exist")
        try:
            return to_rgb_on_white(open_image(image, self.max_pixels))
        except SkipSample as e:
            raise ValueError(f"cannot use image {what}: {e}") from None

    def __call__(self, image: ImageInput) -> torch.Tensor:
        """``image`` -> ``(3, S, S)`` float32 CPU tensor (see the class docstring).

        Raises:
            ValueError: see :meth:`load`.
        """
        im = self.load(image)
        if self.train:
            return train_transform(im, self.cfg, self._rng)
        return eval_transform(im, self.cfg)

    def __repr__(self) -> str:
        return (f"Preprocess(image_size={self.cfg.image_size}, mean={self.cfg.mean}, std={self.cfg.std}, "
                f"train={self.train})")
