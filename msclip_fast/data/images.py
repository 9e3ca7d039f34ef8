"""Safe image decoding shared by ``make_shards`` and the loaders.

Every function here either returns a usable ``PIL.Image`` in mode ``"RGB"`` or raises
:class:`SkipSample` carrying a short reason string (``"empty_image"``, ``"oversized"``,
``"decode_error"``, ``"fully_transparent"``); callers count reasons and never crash on bad input.

The pixel limit is checked from the header (``Image.open`` is lazy: it reads only the header)
*before* any pixel data is inflated, so a 20990x29700 PNG (~2.5 GB as RGBA) is rejected without
allocating it.  Pillow's own ``DecompressionBombError`` is also mapped to ``"oversized"``.
"""
from __future__ import annotations

import io
import warnings
from typing import Union

from PIL import Image, ImageFile

# The three largest openclipart PNGs have 231 M, 623 M and 623 M pixels (~7 GB to decode
# together); the next ones have 169 M.  200 M pixels skips exactly those three.
DEFAULT_MAX_PIXELS = 200_000_000

# A truncated image is an error (counted as "decode_error"), not a silently grey-padded picture.
ImageFile.LOAD_TRUNCATED_IMAGES = False


class SkipSample(Exception):
    """A sample that must be skipped; ``reason`` is the counter key."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


def has_alpha(im: Image.Image) -> bool:
    """True for RGBA/LA/PA images and palette or RGB/L images with a ``transparency`` key."""
    return im.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in im.info


def open_image(data: Union[bytes, str], max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Open and fully decode an image from bytes or a path, refusing bombs.

    Args:
        data: encoded image bytes, or a filesystem path.
        max_pixels: width*height above which the image is skipped as ``"oversized"``
            (checked from the header, before decoding).
    Returns:
        the decoded image, mode unchanged (may be P, LA, RGBA, L, I;16, CMYK, ...).
    Raises:
        SkipSample: ``empty_image`` (0 bytes), ``oversized``, ``decode_error``.
    """
    if isinstance(data, (bytes, bytearray, memoryview)):
        if len(data) == 0:
            raise SkipSample("empty_image")
        src = io.BytesIO(data)
    else:
        src = data
    try:
        with warnings.catch_warnings():
            # Our own limit decides; Pillow's warning for large (but allowed) images is noise.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(src)
            w, h = im.size
            if w * h > max_pixels:
                raise SkipSample("oversized", f"{w}x{h} > {max_pixels} pixels")
            if w <= 0 or h <= 0:
                raise SkipSample("decode_error", f"bad size {w}x{h}")
            im.load()
    except SkipSample:
        raise
    except Image.DecompressionBombError as e:
        raise SkipSample("oversized", str(e)) from None
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, struct.error, ...
        raise SkipSample("decode_error", f"{type(e).__name__}: {e}") from None
    return im


def to_rgb_on_white(im: Image.Image, skip_fully_transparent: bool = False) -> Image.Image:
    """Convert to ``RGB``, alpha-compositing any transparency onto white.

    Raises:
        SkipSample: ``fully_transparent`` when ``skip_fully_transparent`` and alpha is 0
            everywhere (the image would be blank white).
    """
    if has_alpha(im):
        rgba = im.convert("RGBA")
        if skip_fully_transparent and rgba.getchannel("A").getextrema()[1] == 0:
            raise SkipSample("fully_transparent")
        bg = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        bg.alpha_composite(rgba)
        return bg.convert("RGB")
    if im.mode == "RGB":
        return im
    if im.mode.startswith("I") or im.mode == "F":
        # 16/32-bit gray: scale to 8 bit instead of clipping (convert("L") clips at 255).
        lo, hi = im.getextrema()
        scale = 255.0 / (hi - lo) if hi > lo else 0.0
        im = im.point(lambda v: (v - lo) * scale).convert("L")
    return im.convert("RGB")


def resize_shorter_side(im: Image.Image, size: int, resample=Image.BICUBIC) -> Image.Image:
    """Resize keeping aspect so the shorter side is ``size`` (img2dataset ``keep_ratio``).

    Large downscales first use ``Image.reduce`` (box filter, integer factor) so a 10k x 16k
    image costs one cheap pass plus a small bicubic resize.
    """
    w, h = im.size
    short = min(w, h)
    if short == size:
        return im
    factor = short // (2 * size)
    if factor >= 2:
        im = im.reduce(factor)
        w, h = im.size
        short = min(w, h)
    s = size / short
    nw, nh = max(1, round(w * s)), max(1, round(h * s))
    if w < h:
        nw = size
    else:
        nh = size
    return im.resize((nw, nh), resample)


def prepare_image(im: Image.Image, size: int | None, skip_fully_transparent: bool = True) -> Image.Image:
    """Shard-time preparation: RGB on white, shorter side ``size`` (``None``: keep size).

    Alpha is checked on the full image (a downscale could round thin strokes to 0) and the
    resize runs before compositing (Pillow resamples RGBA premultiplied, so edges don't fringe)
    to keep the expensive per-pixel work on the small image.

    Raises:
        SkipSample: ``fully_transparent`` (when asked), ``decode_error`` for unusable modes.
    """
    try:
        if has_alpha(im):
            if im.mode not in ("RGBA", "LA"):
                im = im.convert("RGBA")
            if skip_fully_transparent and im.getchannel("A").getextrema()[1] == 0:
                raise SkipSample("fully_transparent")
        elif im.mode not in ("RGB", "L"):
            im = to_rgb_on_white(im)
        if size is not None:
            im = resize_shorter_side(im, size)
        return to_rgb_on_white(im)
    except SkipSample:
        raise
    except Exception as e:
        raise SkipSample("decode_error", f"{type(e).__name__}: {e}") from None
