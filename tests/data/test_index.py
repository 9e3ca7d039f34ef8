"""The per-shard DALI index (msclip_fast.data.index): classification, byte offsets, fallback,
DALI honouring it, refused shards, load errors, parallel build, CLI and the make_shards hook."""
import io
import json
import os
import shutil
import tarfile

import numpy as np
import pytest
from PIL import Image

from msclip_fast.data.images import open_image, to_rgb_on_white
from msclip_fast.data.index import (
    INDEX_VERSION, IndexBuildError, IndexMissingError, build_index, build_shard_index, index_files,
    load_shard_index, main,
)


def _helpers():
    # tests/ has no __init__.py, so the sibling conftest is loaded by path for its helpers.
    import importlib.util

    here = os.path.join(os.path.dirname(__file__), "conftest.py")
    spec = importlib.util.spec_from_file_location("_data_conftest_helpers", here)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod._jpg, mod._png, mod.make_good_image, mod.write_tar


_jpg, _png, make_good_image, write_tar = _helpers()

GOOD = ["g0", "g1", "gray", "gpng", "a b", "g2"]
FALLBACK = [("rgba", "alpha"), ("palette", "palette"), ("palette_alpha", "alpha"), ("cmyk", "cmyk"),
            ("gray16", "16bit"), ("webp", "format"), ("bilevel", "mode")]
SKIPPED = [("corrupt", "decode_error"), ("cut", "decode_error"), ("emptyfile", "empty_image"),
           ("big", "oversized"), ("notext", "missing_caption"), ("emptytext", "empty_caption"),
           ("noimage", "missing_image")]
MAX_PIXELS = 5000


def _webp(im):
    b = io.BytesIO()
    im.save(b, format="WEBP", lossless=True)
    return b.getvalue()


def _messy_samples():
    jpg = _jpg(make_good_image(99))
    pal = Image.new("P", (12, 9), 0)
    pal.putpalette([255, 0, 0, 0, 255, 0] + [0] * (256 * 3 - 6))
    pal.paste(1, (0, 0, 6, 9))
    pal_t = pal.copy()
    pal_t.info["transparency"] = 0
    g16 = Image.fromarray((np.arange(96, dtype=np.uint16).reshape(8, 12) * 600))
    return [
        {"__key__": "g0", "jpg": _jpg(make_good_image(0)), "txt": "good zero", "json": {"i": 0}},
        {"__key__": "corrupt", "jpg": jpg[: len(jpg) // 3] + b"\x00garbage" * 10, "txt": "corrupt"},
        {"__key__": "g1", "jpeg": _jpg(make_good_image(1)), "caption": "good one"},
        {"__key__": "rgba", "png": _png(Image.new("RGBA", (10, 8), (200, 10, 10, 90))), "txt": "rgba",
         "json": {"i": 2}},
        {"__key__": "cut", "jpg": jpg[:-200], "txt": "image bytes cut"},
        {"__key__": "emptyfile", "jpg": b"", "txt": "empty file"},
        {"__key__": "palette", "png": _png(pal), "txt": "palette"},
        {"__key__": "palette_alpha", "png": _png(pal_t), "txt": "palette with transparency"},
        {"__key__": "gray", "png": _png(Image.new("L", (9, 7), 77)), "text": "gray ok"},
        {"__key__": "big", "jpg": _jpg(make_good_image(3, (100, 80))), "txt": "too many pixels"},
        {"__key__": "cmyk", "jpg": _jpg(Image.new("CMYK", (10, 6), (10, 200, 30, 5))), "txt": "cmyk"},
        {"__key__": "gray16", "png": _png(g16), "txt": "sixteen bit"},
        {"__key__": "webp", "webp": _webp(make_good_image(4)), "txt": "webp image", "json": {"i": 4}},
        {"__key__": "bilevel", "png": _png(Image.new("1", (8, 8), 1)), "txt": "one bit"},
        {"__key__": "gpng", "png": _png(make_good_image(5)), "txt": "  good   png  "},
        {"__key__": "notext", "jpg": _jpg(make_good_image(6)), "json": {"class": "x"}},
        {"__key__": "emptytext", "jpg": _jpg(make_good_image(7)), "txt": "   "},
        {"__key__": "noimage", "txt": "caption only"},
        {"__key__": "a b", "jpg": _jpg(make_good_image(8)), "txt": "key with a space"},
        {"__key__": "g2", "jpg": _jpg(make_good_image(9)), "txt": "good two", "json": {"i": 9}},
    ]


@pytest.fixture(scope="module")
def messy(tmp_path_factory):
    d = tmp_path_factory.mktemp("idx_messy")
    samples = _messy_samples()
    path = str(d / "000000.tar")
    write_tar(path, samples)
    info = build_shard_index(path, max_pixels=MAX_PIXELS)
    return path, info, {s["__key__"]: s for s in samples}


def _tar_bytes(path):
    with tarfile.open(path) as tf:
        return {m.name: tf.extractfile(m).read() for m in tf if m.isreg()}


def test_classification_and_json(messy):
    path, info, _ = messy
    assert info["version"] == INDEX_VERSION and info["shard"] == "000000.tar" and info["trusted"] is False
    assert info["shard_bytes"] == os.path.getsize(path) and info["max_pixels"] == MAX_PIXELS
    assert info["samples"] == 20 and info["members"] == len(_tar_bytes(path))
    assert [(f["key"], f["reason"]) for f in info["fallback"]] == FALLBACK
    assert [(s["key"], s["reason"]) for s in info["skipped"]] == SKIPPED
    assert info["good"] == len(GOOD)
    assert info["counts"] == {"good": 6, "fallback": 7, "skipped": {"decode_error": 2, "empty_image": 1,
                              "oversized": 1, "missing_caption": 1, "empty_caption": 1, "missing_image": 1}}
    ix = load_shard_index(path, max_pixels=MAX_PIXELS)
    assert [s.key for s in ix.samples] == GOOD
    assert [s.key for s in ix.fallback_samples] == [k for k, _ in FALLBACK]
    assert ix.shard == os.path.abspath(path) and ix.idx_path == index_files(path)["idx"]
    assert [src[0] for src in ix.sources()] == [ix.shard, ix.fallback_shard]
    with open(ix.idx_path) as f:
        assert f.readline() == "v1.2 6\n"


def test_idx_lines_point_at_member_bytes(messy):
    path, _, samples = messy
    ix = load_shard_index(path)
    with open(path, "rb") as f:
        blob = f.read()
    for s in ix.samples:
        exts = [m[0] for m in s.members]
        src = samples[s.key]
        img = next(e for e in ("jpg", "jpeg", "png") if e in src)
        txt = next(e for e in ("txt", "text", "caption") if e in src)
        assert exts == [img, txt] + (["json"] if "json" in src else [])
        for ext, off, size, name in s.members:
            assert name == f"{s.key}.{ext}"
            want = src[ext]
            want = json.dumps(want).encode() if isinstance(want, dict) else want
            want = want.encode() if isinstance(want, str) else want
            assert blob[off: off + size] == want
    assert "a%20b.jpg" in open(ix.idx_path).read()  # the space-separated format stays parseable


def test_fallback_is_normalised_png(messy):
    path, _, samples = messy
    ix = load_shard_index(path)
    members = _tar_bytes(ix.fallback_shard)
    with open(ix.fallback_shard, "rb") as f:
        blob = f.read()
    for s in ix.fallback_samples:
        src = samples[s.key]
        assert [m[0] for m in s.members] == ["png", "txt"] + (["json"] if "json" in src else [])
        for ext, off, size, name in s.members:
            assert blob[off: off + size] == members[name]
        img_ext = next(e for e in ("jpg", "png", "webp") if e in src)
        want = np.asarray(to_rgb_on_white(open_image(src[img_ext])))
        got = Image.open(io.BytesIO(members[f"{s.key}.png"]))
        assert got.mode == "RGB" and np.array_equal(np.asarray(got), want)
        assert members[f"{s.key}.txt"] == src["txt"].encode()
        if "json" in src:
            assert json.loads(members[f"{s.key}.json"]) == src["json"]
    # byte-reproducible: a rebuild writes the same fallback tar
    before = open(ix.fallback_shard, "rb").read()
    build_shard_index(path, max_pixels=MAX_PIXELS)
    assert open(ix.fallback_shard, "rb").read() == before


def test_dali_reads_exactly_the_indexed_samples(messy):
    pytest.importorskip("nvidia.dali")
    from nvidia.dali import fn, pipeline_def

    path, _, samples = messy
    ix = load_shard_index(path)
    got = []
    for tar, idx, listed in ix.sources():
        @pipeline_def
        def pipe():
            img, txt = fn.readers.webdataset(paths=[tar], index_paths=[idx], ext=["jpg;jpeg;png", "txt;text;caption"],
                                             random_shuffle=False, name="r")
            return img, fn.pad(txt, fill_value=0)

        p = pipe(batch_size=1, num_threads=1, device_id=None)
        p.build()
        assert p.epoch_size("r") == len(listed)
        for _ in range(len(listed)):
            _, txt = p.run()
            got.append(bytes(np.array(txt[0])).rstrip(b"\0").decode())
    keys = GOOD + [k for k, _ in FALLBACK]

    def caption(s):
        return next(s[e] for e in ("txt", "text", "caption") if e in s)

    assert got == [caption(samples[k]) for k in keys]


def test_no_fallback_files_without_fallback_samples(tmp_path):
    path = str(tmp_path / "000000.tar")
    write_tar(path, [{"__key__": f"k{i}", "jpg": _jpg(make_good_image(i)), "txt": f"c{i}"} for i in range(3)])
    f = index_files(path)
    open(f["fallback_tar"], "wb").write(b"stale")  # from an earlier build: must go
    info = build_shard_index(path)
    assert info["good"] == 3 and info["fallback"] == [] and info["skipped"] == []
    assert not os.path.exists(f["fallback_tar"]) and not os.path.exists(f["fallback_idx"])
    ix = load_shard_index(path)
    assert ix.fallback_shard is None and len(ix.sources()) == 1
    assert [s.key for s in ix.samples] == ["k0", "k1", "k2"] and [len(s.members) for s in ix.samples] == [2, 2, 2]


def _refused(tmp_path, name, data):
    path = str(tmp_path / name)
    with open(path, "wb") as f:
        f.write(data)
    with pytest.raises(IndexBuildError, match=f"cannot index .*{name}") as e:
        build_shard_index(path)
    stem = name[:-4]
    assert [fn for fn in os.listdir(tmp_path) if fn.startswith(stem)] == [name]  # no index files
    return str(e.value)


def test_refused_shards(tmp_path):
    good = str(tmp_path / "src.tar")
    write_tar(good, [{"__key__": f"k{i}", "jpg": _jpg(make_good_image(i, (64, 64))), "txt": "x"} for i in range(3)])
    blob = open(good, "rb").read()
    os.remove(good)
    with tarfile.open(fileobj=io.BytesIO(blob)) as tf:
        last = [m for m in tf if m.name.endswith(".jpg")][-1]
    assert "truncated tar" in _refused(tmp_path, "000001.tar", blob[: last.offset_data + last.size // 2])
    assert "truncated tar" in _refused(tmp_path, "000002.tar", blob[: last.offset + 100])  # cut header
    assert "not a readable tar" in _refused(tmp_path, "000003.tar", b"this is not a tar file\n" * 50)
    assert "not a readable tar" in _refused(tmp_path, "000004.tar", b"")
    with pytest.raises(IndexBuildError, match="missing.tar"):
        build_shard_index(str(tmp_path / "missing.tar"))


def test_load_errors(tmp_path):
    path = str(tmp_path / "000000.tar")
    write_tar(path, [{"__key__": "k", "jpg": _jpg(make_good_image(0)), "txt": "c"}])
    with pytest.raises(IndexMissingError, match=r"000000\.idx.*python -m msclip_fast\.data\.index"):
        load_shard_index(path)
    build_shard_index(path, max_pixels=1000)
    with pytest.raises(ValueError, match="max_pixels=1000.*max_pixels=2000"):
        load_shard_index(path, max_pixels=2000)
    assert load_shard_index(path, max_pixels=1000).max_pixels == 1000
    f = index_files(path)
    idx = open(f["idx"]).read()
    open(f["idx"], "w").write("v1.2 1\njpg 12 notanumber k.jpg\n")
    with pytest.raises(ValueError, match="malformed index .*000000.idx"):
        load_shard_index(path)
    open(f["idx"], "w").write(idx)
    meta = json.load(open(f["json"]))
    json.dump({**meta, "version": 99}, open(f["json"], "w"))
    with pytest.raises(ValueError, match="version 99"):
        load_shard_index(path)
    json.dump(meta, open(f["json"], "w"))
    with open(path, "ab") as fh:
        fh.write(b"\0" * 512)
    with pytest.raises(ValueError, match="stale index.*--force"):
        load_shard_index(path)
    os.remove(f["json"])
    with pytest.raises(IndexMissingError, match=r"000000\.idx\.json"):
        load_shard_index(path)


def _three_shards(d):
    os.makedirs(d / "sub")
    paths = [str(d / "000000.tar"), str(d / "000001.tar"), str(d / "sub" / "000002.tar")]
    k = 0
    for si, p in enumerate(paths):
        samples = []
        for _ in range(4):
            samples.append({"__key__": f"s{k:03d}", "jpg": _jpg(make_good_image(k, (16, 16))), "txt": f"sample {k}"})
            k += 1
        if si == 1:
            samples.append({"__key__": "alpha", "png": _png(Image.new("LA", (5, 5), (3, 7))), "txt": "la"})
            samples.append({"__key__": "bad", "jpg": b"junk", "txt": "bad"})
        write_tar(p, samples)
    return paths


def test_build_index_parallel_up_to_date_force(tmp_path):
    paths = _three_shards(tmp_path)
    r = build_index(str(tmp_path), workers=2, progress=False)
    assert {k: r[k] for k in ("shards", "built", "up_to_date", "good", "fallback", "skipped")} == {
        "shards": 3, "built": 3, "up_to_date": 0, "good": 12, "fallback": {"alpha": 1}, "skipped": {"decode_error": 1}}
    assert all(os.path.exists(index_files(p)["json"]) for p in paths)
    assert not os.path.exists(str(tmp_path / "000000.fallback.tar"))
    assert os.path.exists(str(tmp_path / "000001.fallback.tar"))
    r2 = build_index(str(tmp_path), workers=2, progress=False)  # the fallback tar is not a shard
    assert (r2["shards"], r2["built"], r2["up_to_date"], r2["good"]) == (3, 0, 3, 12)
    r3 = build_index(paths, workers=2, force=True, progress=False)
    assert (r3["shards"], r3["built"], r3["up_to_date"]) == (3, 3, 0)
    r4 = build_index(paths[:1], max_pixels=10_000, progress=False)  # another limit: rebuilt
    assert (r4["built"], load_shard_index(paths[0]).max_pixels) == (1, 10_000)


def test_build_index_and_cli_report_bad_shard(tmp_path, capsys):
    paths = _three_shards(tmp_path)
    bad = str(tmp_path / "000009.tar")
    open(bad, "wb").write(b"not a tar" * 100)
    with pytest.raises(IndexBuildError, match="000009.tar"):
        build_index(str(tmp_path), workers=2, progress=False)
    assert all(os.path.exists(index_files(p)["json"]) for p in paths)  # the others were built
    capsys.readouterr()
    assert main([str(tmp_path), "--workers", "2", "--no-progress"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1 and err.startswith("error: cannot index ") and "000009.tar" in err
    os.remove(bad)
    assert main([str(tmp_path), "--no-progress", "--workers", "1"]) == 0
    out, _ = capsys.readouterr()
    summary = json.loads(out)
    assert (summary["shards"], summary["built"], summary["up_to_date"]) == (3, 0, 3)


def test_make_shards_writes_trusted_index(tmp_path):
    from msclip_fast.data.make_shards import main as make_main

    out = str(tmp_path / "digits")
    assert make_main(["--source", "digits", "--out", out, "--image-size", "16", "--workers", "1",
                      "--limit", "60", "--shard-size", "25"]) == 0
    n = 0
    for split in ("train", "val"):
        d = os.path.join(out, split)
        for fn in sorted(os.listdir(d)):
            if not fn.endswith(".tar"):
                continue
            path = os.path.join(d, fn)
            ix = load_shard_index(path)
            assert ix.meta["trusted"] is True and ix.fallback_shard is None and ix.skipped == []
            with tarfile.open(path) as tf:
                keys = list(dict.fromkeys(m.name.split(".")[0] for m in tf))
            assert [s.key for s in ix.samples] == keys
            assert all([m[0] for m in s.members] == ["jpg", "txt", "json"] for s in ix.samples)
            n += len(keys)
    assert n == 60
    # a rebuild with a bigger shard size leaves no stale shard or index files behind
    shutil.rmtree(os.path.join(out, "val"))
    make_main(["--source", "digits", "--out", out, "--image-size", "16", "--workers", "1",
               "--limit", "60", "--shard-size", "100"])
    assert sorted(os.listdir(os.path.join(out, "train"))) == ["000000.idx", "000000.idx.json", "000000.tar"]
