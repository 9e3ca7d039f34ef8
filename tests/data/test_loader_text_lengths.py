"""Loader batches carry ``text_lengths``: (B,) int64 CPU, ``eot + 1`` of each CPU token row."""
import io
import os

import numpy as np
import pytest
import torch
from PIL import Image

from msclip_fast.data import build_loader, get_tokenizer
from msclip_fast.modules import text_lengths

EOT = 49407

# '!' alone before a comma tokenizes to id 0, which is also the padding id: a length taken as
# "last non-zero token + 1" or "count of non-zero tokens" would be wrong for these
BANG_CAPTIONS = ["!,!", "!,! !,! !,!", "wow !,! so !,!", "a plain caption", "!,!" * 60]


def _jpg(i: int, size=(16, 16)) -> bytes:
    rng = np.random.default_rng(i)
    b = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(b, format="JPEG")
    return b.getvalue()


@pytest.fixture(scope="module")
def bang_shard_dir(tmp_path_factory):
    import webdataset as wds

    d = tmp_path_factory.mktemp("bang")
    with open(os.path.join(d, "000000.tar"), "wb") as f:
        w = wds.TarWriter(f)
        for i, cap in enumerate(BANG_CAPTIONS):
            w.write({"__key__": f"b{i}", "jpg": _jpg(i), "txt": cap})
        w.close()
    return str(d)


def _check_batch(b):
    lengths = b["text_lengths"]
    assert isinstance(lengths, torch.Tensor)
    assert lengths.dtype == torch.int64 and lengths.device.type == "cpu"
    assert lengths.shape == (b["text"].shape[0],)
    assert b["text"].device.type == "cpu"
    assert torch.equal(lengths, text_lengths(b["text"]))
    # the last kept token is the EOT, and nothing but padding follows it
    rows = torch.arange(len(lengths))
    assert (b["text"][rows, lengths - 1] == EOT).all()
    for row, n in zip(b["text"], lengths.tolist()):
        assert (row[n:] == 0).all()


@pytest.mark.parametrize("train", [True, False])
def test_every_batch_has_cpu_text_lengths(numbered_shards, messy_shard_dir, train):
    n = 0
    for urls in (numbered_shards, messy_shard_dir):
        for b in build_loader(urls, 3, train=train, image_size=16, drop_last=False):
            _check_batch(b)
            n += len(b["key"])
    assert n == 17 + 10


def test_text_lengths_from_worker_processes(numbered_shards):
    # with workers the collate runs in a worker process; the lengths travel with the batch
    batches = list(build_loader(numbered_shards, 4, train=True, image_size=16, num_workers=2, drop_last=False))
    assert sum(len(b["key"]) for b in batches) == 17
    for b in batches:
        _check_batch(b)


def test_bang_captions_end_at_the_eot(bang_shard_dir):
    (b,) = list(build_loader(bang_shard_dir, len(BANG_CAPTIONS), train=False, image_size=16))
    _check_batch(b)
    tok = get_tokenizer()(BANG_CAPTIONS)
    by_key = dict(zip(b["key"], b["text_lengths"].tolist()))
    for i, row in enumerate(tok):
        eot = int((row == EOT).nonzero()[0])
        assert by_key[f"b{i}"] == eot + 1
    # the token-0 captions really hold a 0 before their EOT, and the long one is truncated
    # to the full context (EOT in the last slot)
    assert (tok[0, 1 : by_key["b0"] - 1] == 0).any()
    assert by_key["b1"] > 5 and (tok[1, : by_key["b1"]] == 0).sum() >= 3
    assert by_key[f"b{len(BANG_CAPTIONS) - 1}"] == 77


def _dali_ok():
    from msclip_fast.data.dali import dali_available

    return dali_available()[0]


@pytest.mark.skipif(not _dali_ok(), reason="nvidia-dali not importable")
def test_dali_batches_have_the_same_text_lengths(numbered_shards, bang_shard_dir, tmp_path):
    import shutil

    from msclip_fast.data.index import build_index

    for i, src in enumerate((numbered_shards, bang_shard_dir)):
        urls = shutil.copytree(src, tmp_path / str(i))  # never index the shared fixtures in place
        build_index(str(urls), workers=1, progress=False)
        kw = dict(train=False, image_size=16, drop_last=False)
        dali = list(build_loader(urls, 4, backend="dali", **kw))
        torch_ = list(build_loader(urls, 4, **kw))
        assert [b["key"] for b in dali] == [b["key"] for b in torch_]
        for a, b in zip(dali, torch_):
            _check_batch(a)
            assert torch.equal(a["text_lengths"], b["text_lengths"])
