import logging

import pytest
import torch

from msclip_fast.data import CLIP_MEAN, CLIP_STD, build_loader


def _keys(loader):
    return [k for b in loader for k in b["key"]]


def test_messy_shard_yields_good_and_counts_each_skip(messy_shard_dir, caplog):
    caplog.set_level(logging.WARNING)
    loader = build_loader(messy_shard_dir, 4, train=True, image_size=32, drop_last=False)
    batches = list(loader)
    keys = sorted(k for b in batches for k in b["key"])
    assert keys == sorted([f"g{i}" for i in range(8)] + ["tiny_1x1", "palette_alpha"])
    assert loader.skipped == {"decode_error": 1, "empty_image": 1, "missing_caption": 1, "empty_caption": 1}
    b = batches[0]
    assert b["image"].dtype == torch.float32 and b["image"].shape[1:] == (3, 32, 32)
    assert b["text"].dtype == torch.int64 and b["text"].shape[1] == 77
    assert torch.isfinite(b["image"]).all()
    meta = {k: m for bb in batches for k, m in zip(bb["key"], bb["meta"])}
    assert meta["g3"] == {"class": "good", "i": 3} and meta["tiny_1x1"] == {}
    assert "skipping sample" in caplog.text
    # cumulative across epochs
    loader.set_epoch(1)
    list(loader)
    assert loader.skipped["decode_error"] == 2


def test_palette_transparency_composited_on_white(messy_shard_dir):
    loader = build_loader(messy_shard_dir, 1, train=False, image_size=12, mean=(0, 0, 0), std=(1, 1, 1))
    for b in loader:
        if b["key"][0] == "palette_alpha":
            x = b["image"][0]
            # left half opaque green, right half transparent -> white
            assert torch.allclose(x[:, 4, 1], torch.tensor([0.0, 1.0, 0.0]), atol=0.05)
            assert torch.allclose(x[:, 4, 10], torch.ones(3), atol=0.05)
            return
    pytest.fail("palette sample not yielded")


def test_oversized_skipped_by_pixel_limit(messy_shard_dir):
    loader = build_loader(messy_shard_dir, 4, train=False, image_size=8, max_pixels=40 * 30 - 1)
    keys = _keys(loader)
    assert set(keys) == {"tiny_1x1", "palette_alpha"}
    assert loader.skipped["oversized"] == 8


def test_deterministic_order_and_augmentation(numbered_shards):
    def run(seed, epoch):
        ld = build_loader(numbered_shards, 5, train=True, image_size=16, seed=seed, epoch=epoch, shuffle_buffer=4)
        bs = list(ld)
        return [k for b in bs for k in b["key"]], torch.cat([b["image"] for b in bs])

    k1, x1 = run(0, 0)
    k2, x2 = run(0, 0)
    assert k1 == k2 and torch.equal(x1, x2)
    k3, _ = run(0, 1)
    k4, _ = run(1, 0)
    assert k3 != k1 and k4 != k1
    assert len(k1) == 15  # 17 samples, drop_last with batch 5


def test_eval_order_is_shard_order(numbered_shards):
    ld = build_loader(numbered_shards, 4, train=False, image_size=16)
    assert _keys(ld) == [f"s{i:03d}" for i in range(17)]
    assert len(ld) == 5


@pytest.mark.parametrize("train", [True, False])
def test_exactly_once_across_two_ranks(numbered_shards, train):
    seen = []
    for rank in range(2):
        ld = build_loader(numbered_shards, 3, train=train, image_size=16, rank=rank, world_size=2,
                          drop_last=False, seed=3, epoch=2)
        seen.append(_keys(ld))
    assert not set(seen[0]) & set(seen[1])
    assert sorted(seen[0] + seen[1]) == [f"s{i:03d}" for i in range(17)]
    assert abs(len(seen[0]) - len(seen[1])) <= 1


def test_len_from_manifest(numbered_shards):
    assert len(build_loader(numbered_shards, 4, train=True, image_size=16)) == 4  # 17 // 4
    assert len(build_loader(numbered_shards, 4, train=True, image_size=16, rank=1, world_size=2)) == 2  # 8 // 4
    assert len(build_loader(numbered_shards, 4, train=False, image_size=16, rank=0, world_size=2)) == 3  # ceil(9/4)


def test_len_unknown_without_manifest(messy_shard_dir):
    with pytest.raises(TypeError):
        len(build_loader(messy_shard_dir, 4, train=True))


def test_num_workers_same_samples(numbered_shards):
    ld = build_loader(numbered_shards, 4, train=True, image_size=16, num_workers=2, drop_last=False)
    k1 = _keys(ld)
    assert sorted(k1) == [f"s{i:03d}" for i in range(17)]
    assert _keys(ld) == k1


def test_bad_arguments(numbered_shards):
    with pytest.raises(ValueError, match="batch_size"):
        build_loader(numbered_shards, 0, train=True)
    with pytest.raises(ValueError, match="rank"):
        build_loader(numbered_shards, 2, train=True, rank=2, world_size=2)
    with pytest.raises(ValueError, match="backend"):
        build_loader(numbered_shards, 2, train=True, backend="tf")
    with pytest.raises(ValueError, match="std"):
        build_loader(numbered_shards, 2, train=True, std=(1, 0, 1))
    with pytest.raises(ValueError, match="nothing|no files|no .tar"):
        build_loader(numbered_shards + "/nope*.tar", 2, train=True)


def test_normalization_constants():
    assert CLIP_MEAN == (0.48145466, 0.4578275, 0.40821073)
    assert CLIP_STD == (0.26862954, 0.26130258, 0.27577711)
