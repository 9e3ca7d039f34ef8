"""CLIP-style image transforms with explicit, per-sample random generators.

Inputs are ``PIL.Image`` in mode RGB (see :mod:`msclip_fast.data.images`); outputs are
``(3, size, size)`` float32 tensors normalised with ``(x/255 - mean) / std``.

* train: ``RandomResizedCrop(size, scale=(0.9, 1.0), ratio=(3/4, 4/3))`` with bicubic
  resampling (open_clip's default for CLIP training), then normalise;
* eval: resize the shorter side to ``size`` (bicubic), center crop, normalise.

The crop parameters are drawn from a ``random.Random`` passed in by the caller (the loader
seeds one per sample from ``(seed, epoch, key)``), never from global RNG state, so augmentation
is reproducible whatever the worker/rank layout.
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Sequence, Tuple

import numpy as np
import torch
from PIL import Image

# OpenAI CLIP normalisation constants (same values as open_clip.OPENAI_DATASET_MEAN/STD).
CLIP_MEAN: Tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD: Tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)


def _check_triplet(name: str, v: Sequence[float]) -> Tuple[float, float, float]:
    try:
        t = tuple(float(x) for x in v)
    except TypeError:
        raise ValueError(f"{name} must be 3 floats, got {v!r}") from None
    if len(t) != 3:
        raise ValueError(f"{name} must be 3 floats, got {v!r}")
    return t


@dataclass(frozen=True)
class TransformConfig:
    """Settings of :func:`image_transform`; validated on construction."""

    image_size: int = 224
    mean: Tuple[float, float, float] = CLIP_MEAN
    std: Tuple[float, float, float] = CLIP_STD
    scale: Tuple[float, float] = (0.9, 1.0)
    ratio: Tuple[float, float] = (3 / 4, 4 / 3)

    def __post_init__(self):
        if not isinstance(self.image_size, int) or isinstance(self.image_size, bool) or self.image_size < 1:
            raise ValueError(f"image_size must be a positive int, got {self.image_size!r}")
        object.__setattr__(self, "mean", _check_triplet("mean", self.mean))
        std = _check_triplet("std", self.std)
        if min(std) <= 0:
            raise ValueError(f"std must be positive, got {self.std!r}")
        object.__setattr__(self, "std", std)
        if not (0 < self.scale[0] <= self.scale[1] <= 1):
            raise ValueError(f"scale must satisfy 0 < lo <= hi <= 1, got {self.scale!r}")


def random_resized_crop_params(w: int, h: int, scale, ratio, rng: random.Random) -> Tuple[int, int, int, int]:
    """torchvision's RandomResizedCrop.get_params, drawing from ``rng``: (top, left, height, width).

    All four are ints with ``0 <= left``, ``left + width <= w``, ``0 <= top``,
    ``top + height <= h`` (both branches clamp), so the resize box cannot leave the image the
    way a float box can (see :func:`center_crop_box`).
    """
    area = w * h
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(*log_ratio))
        cw = int(round(math.sqrt(target_area * aspect)))
        ch = int(round(math.sqrt(target_area / aspect)))
        if 0 < cw <= w and 0 < ch <= h:
            top = rng.randint(0, h - ch)
            left = rng.randint(0, w - cw)
            return top, left, ch, cw
    # Fallback: central crop clamped to the ratio range (as torchvision does).
    in_ratio = w / h
    if in_ratio < min(ratio):
        cw, ch = w, int(round(w / min(ratio)))
    elif in_ratio > max(ratio):
        ch, cw = h, int(round(h * max(ratio)))
    else:
        cw, ch = w, h
    ch, cw = max(1, min(ch, h)), max(1, min(cw, w))
    return (h - ch) // 2, (w - cw) // 2, ch, cw


def _to_tensor(im: Image.Image, mean, std) -> torch.Tensor:
    a = np.asarray(im, dtype=np.uint8)
    if a.ndim == 2:  # defensive: callers pass RGB
        a = np.repeat(a[:, :, None], 3, axis=2)
    x = torch.from_numpy(a.copy()).permute(2, 0, 1).float().div_(255.0)
    m = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
    return x.sub_(m).div_(s)


def train_transform(im: Image.Image, cfg: TransformConfig, rng: random.Random) -> torch.Tensor:
    """RandomResizedCrop + normalise. ``im`` RGB PIL -> ``(3, S, S)`` float32."""
    w, h = im.size
    top, left, ch, cw = random_resized_crop_params(w, h, cfg.scale, cfg.ratio, rng)
    s = cfg.image_size
    im = im.resize((s, s), Image.BICUBIC, box=(left, top, left + cw, top + ch))
    return _to_tensor(im, cfg.mean, cfg.std)


def center_crop_box(w: int, h: int) -> Tuple[float, float, float, float]:
    """The source box ``(left, top, right, bottom)`` (pixels) that resize-shorter-side +
    center-crop reads from a ``w x h`` image: the centered ``min(w, h)`` square.

    Exact for any output size: the square's side is the shorter side itself, never
    ``size / (size / short)``, whose round-off put the box 1e-14 px outside the image
    (PIL: "box offset can't be negative") for e.g. 249x429 at 64 px.  ``left``/``top`` are
    integers or halves (an odd difference of sides), so the box always lies in
    ``[0, w] x [0, h]``.

    Raises:
        ValueError: ``w`` or ``h`` < 1.
    """
    if w < 1 or h < 1:
        raise ValueError(f"image size must be at least 1x1, got {w}x{h}")
    side = min(w, h)
    left, top = (w - side) / 2, (h - side) / 2
    return left, top, left + side, top + side


def eval_transform(im: Image.Image, cfg: TransformConfig) -> torch.Tensor:
    """Resize shorter side + center crop + normalise. ``im`` RGB PIL -> ``(3, S, S)`` float32."""
    s = cfg.image_size
    # Resize and crop in one resampling pass: the box is the center region of the source
    # that maps onto the S x S output.
    im = im.resize((s, s), Image.BICUBIC, box=center_crop_box(*im.size))
    return _to_tensor(im, cfg.mean, cfg.std)
