"""Fixtures for data tests: a hand-made messy shard (bad samples of every kind)."""
import json
import os

import numpy as np
import pytest
from PIL import Image
from shard_files import encode_image, write_tar  # noqa: F401 (write_tar: re-exported to test_index)


def _png(im: Image.Image) -> bytes:
    return encode_image(im, "PNG")


def _jpg(im: Image.Image) -> bytes:
    return encode_image(im, "JPEG")


def make_good_image(i: int, size=(40, 30)) -> Image.Image:
    rng = np.random.default_rng(i)
    return Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8))


@pytest.fixture(scope="session")
def messy_shard_dir(tmp_path_factory):
    """A dir with one shard: 8 good samples and one sample per bad kind.

    Expected: good keys g0..g7, tiny_1x1, palette_alpha (yielded); skipped: decode_error
    (corrupt JPEG), empty_image, missing_caption, empty_caption.
    """
    d = tmp_path_factory.mktemp("messy")
    samples = []
    for i in range(8):
        samples.append({"__key__": f"g{i}", "jpg": _jpg(make_good_image(i)), "txt": f"good sample {i}",
                        "json": {"class": "good", "i": i}})
    good_jpg = _jpg(make_good_image(99))
    samples.append({"__key__": "corrupt", "jpg": good_jpg[: len(good_jpg) // 3] + b"\x00garbage" * 10, "txt": "corrupt"})
    samples.append({"__key__": "emptyfile", "jpg": b"", "txt": "empty file"})
    samples.append({"__key__": "tiny_1x1", "png": _png(Image.new("RGB", (1, 1), (10, 20, 30))), "txt": "one pixel"})
    pal = Image.new("P", (12, 9), 0)
    pal.putpalette([255, 0, 0, 0, 255, 0] + [0] * (256 * 3 - 6))
    pal.paste(1, (0, 0, 6, 9))
    pal.info["transparency"] = 0
    samples.append({"__key__": "palette_alpha", "png": _png(pal), "txt": "palette with transparency"})
    samples.append({"__key__": "notext", "jpg": _jpg(make_good_image(5)), "json": {"class": "x"}})
    samples.append({"__key__": "emptytext", "jpg": _jpg(make_good_image(6)), "txt": "   "})
    write_tar(os.path.join(d, "000000.tar"), samples)
    return str(d)


@pytest.fixture(scope="session")
def numbered_shards(tmp_path_factory):
    """3 shards of 7, 7 and 3 good 16x16 samples (keys s000..s016) plus a manifest."""
    d = tmp_path_factory.mktemp("numbered")
    os.makedirs(d / "train")
    counts, k = {}, 0
    for si, n in enumerate((7, 7, 3)):
        samples = []
        for _ in range(n):
            samples.append({"__key__": f"s{k:03d}", "jpg": _jpg(make_good_image(k, (16, 16))), "txt": f"sample {k}"})
            k += 1
        write_tar(str(d / "train" / f"{si:06d}.tar"), samples)
        counts[f"train/{si:06d}.tar"] = n
    with open(d / "manifest.json", "w") as f:
        json.dump({"shards": counts}, f)
    return str(d / "train")
