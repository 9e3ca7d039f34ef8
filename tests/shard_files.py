"""Helpers for the tests that write WebDataset shards by hand: an encoded image and a tar.

Imported by name (``from shard_files import ...``): the root tests/conftest.py puts tests/ on
sys.path, and the name is unique, unlike ``conftest``.
"""
import io

from PIL import Image


def encode_image(im: Image.Image, fmt: str = "PNG", **save_kw) -> bytes:
    """``im`` encoded as ``fmt`` ("PNG", "JPEG", "WEBP", ...)."""
    b = io.BytesIO()
    im.save(b, format=fmt, **save_kw)
    return b.getvalue()


def write_tar(path, samples) -> None:
    """Write ``samples`` (dicts ``{"__key__", ext: bytes | str | dict}``) as one shard."""
    import webdataset as wds

    with open(path, "wb") as f:
        w = wds.TarWriter(f)
        for s in samples:
            w.write(s)
        w.close()
