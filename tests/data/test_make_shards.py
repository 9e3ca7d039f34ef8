import json
import os
import tarfile

import pytest

from msclip_fast.data import build_loader
from msclip_fast.data.make_shards import main


def _members(out, split):
    names = {}
    for fn in sorted(f for f in os.listdir(os.path.join(out, split)) if f.endswith(".tar")):
        with tarfile.open(os.path.join(out, split, fn)) as tf:
            for m in tf.getmembers():
                key, ext = m.name.split(".", 1)
                names.setdefault(key, {})[ext] = tf.extractfile(m).read()
    return names


@pytest.fixture(scope="module")
def digits_out(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("digits"))
    assert main(["--source", "digits", "--out", out, "--image-size", "24", "--workers", "1", "--shard-size", "500"]) == 0
    return out


def test_digits_manifest_and_layout(digits_out):
    with open(os.path.join(digits_out, "manifest.json")) as f:
        m = json.load(f)
    assert m["counts"]["train"] + m["counts"]["val"] == 1797
    assert 0.08 < m["counts"]["val"] / 1797 < 0.12
    assert m["classes"][:3] == ["zero", "one", "two"] and len(m["classes"]) == 10
    assert sum(m["shards"].values()) == 1797 and "train/000000.tar" in m["shards"]
    assert m["skipped"] == {}
    tr = _members(digits_out, "train")
    k, s = next(iter(tr.items()))
    assert set(s) == {"jpg", "txt", "json"}
    meta = json.loads(s["json"])
    assert meta["source"] == "digits" and m["classes"][meta["label"]] == meta["class"]
    assert all(len(set(json.loads(v["json"])["class"] for v in _members(digits_out, sp).values())) == 10
               for sp in ("train", "val"))


def test_digits_split_is_leak_free_and_deterministic(digits_out, tmp_path):
    tr, va = _members(digits_out, "train"), _members(digits_out, "val")
    assert not set(tr) & set(va)
    assert not {v["jpg"] for v in tr.values()} & {v["jpg"] for v in va.values()}
    out2 = str(tmp_path / "again")
    main(["--source", "digits", "--out", out2, "--image-size", "24", "--workers", "1", "--shard-size", "500"])
    for sp in ("train", "val"):
        for fn in os.listdir(os.path.join(digits_out, sp)):
            with open(os.path.join(digits_out, sp, fn), "rb") as a, open(os.path.join(out2, sp, fn), "rb") as b:
                assert a.read() == b.read()


def test_digits_shards_load(digits_out):
    ld = build_loader(os.path.join(digits_out, "val"), 64, train=False, image_size=24)
    b = next(iter(ld))
    assert b["image"].shape == (64, 3, 24, 24) and b["text"].shape == (64, 77)
    assert len(ld) == 3  # ceil(~180 / 64)


def test_folder_source(tmp_path):
    from PIL import Image

    os.makedirs(tmp_path / "imgs" / "cats")
    for i in range(6):
        Image.new("RGBA", (30 + i, 20), (i * 40, 0, 0, 128)).save(tmp_path / "imgs" / "cats" / f"{i}.png")
    (tmp_path / "imgs" / "bad.png").write_bytes(b"not an image")
    lines = ["path\tcaption"] + [f"cats/{i}.png\ta red cat {i}" for i in range(6)]
    lines += ["bad.png\tbroken", "missing.png\tgone", "cats/0.png\tdup path", "cats/5.png"]
    (tmp_path / "imgs" / "list.tsv").write_text("\n".join(lines) + "\n")
    out = str(tmp_path / "out")
    main(["--source", "folder", "--tsv", str(tmp_path / "imgs" / "list.tsv"), "--out", out,
          "--image-size", "16", "--workers", "1", "--val-fraction", "0.3"])
    m = json.load(open(os.path.join(out, "manifest.json")))
    assert m["counts"]["train"] + m["counts"]["val"] == 6
    assert m["skipped"] == {"decode_error": 1, "missing_image": 1, "duplicate_tsv_path": 1, "bad_tsv_line": 1}
    assert m["classes"] == ["cats"]


def test_bad_args(tmp_path):
    with pytest.raises(ValueError, match="val_fraction"):
        main(["--source", "digits", "--out", str(tmp_path), "--val-fraction", "1.5"])
    with pytest.raises(ValueError, match="tsv"):
        main(["--source", "folder", "--out", str(tmp_path)])


@pytest.mark.slow
@pytest.mark.skipif(not os.path.isdir("/usr/share/openclipart/png"), reason="openclipart-png not installed")
def test_openclipart_limit_200(tmp_path):
    out = str(tmp_path / "ocl")
    main(["--source", "openclipart", "--out", out, "--limit", "200", "--image-size", "48", "--workers", "2"])
    m = json.load(open(os.path.join(out, "manifest.json")))
    c = m["counts"]
    assert c["candidates"] == 200 and c["train"] + c["val"] + c["skipped"] == 200
    assert len(m["classes"]) == 22 and c["val"] > 0
    tr, va = _members(out, "train"), _members(out, "val")
    # leak-free: no shared image bytes of the same source file and no shared caption
    caps = lambda d: {v["txt"].decode().casefold() for v in d.values()}
    assert not caps(tr) & caps(va)
    src = lambda d: {os.path.realpath("/usr/share/openclipart/png/" + json.loads(v["json"])["uid"]) for v in d.values()}
    assert not src(tr) & src(va)
    from PIL import Image
    import io
    im = Image.open(io.BytesIO(next(iter(tr.values()))["jpg"]))
    assert im.mode == "RGB" and min(im.size) == 48


def _tiny_folder(tmp_path, n=8):
    from PIL import Image

    os.makedirs(tmp_path / "imgs" / "dots", exist_ok=True)
    for i in range(n):
        Image.new("RGB", (12 + i, 10), (i * 20, 90, 0)).save(tmp_path / "imgs" / "dots" / f"{i}.png")
    tsv = tmp_path / "imgs" / "list.tsv"
    tsv.write_text("".join(f"dots/{i}.png\ta green dot {i}\n" for i in range(n)))
    return str(tsv)


def test_progress_bars_on_stderr_and_no_progress(tmp_path, capsys):
    tsv = _tiny_folder(tmp_path)
    base = ["--source", "folder", "--tsv", tsv, "--image-size", "8", "--workers", "1", "--val-fraction", "0.25"]
    assert main(base + ["--out", str(tmp_path / "a")]) == 0
    out, err = capsys.readouterr()
    assert [json.loads(out)["counts"]["written"]] == [8]  # stdout: the summary line only
    for phase in ("reading images", "decoding images", "writing shards"):
        assert f"{phase}: 100%" in err, err
    assert "8/8" in err

    assert main(base + ["--out", str(tmp_path / "b"), "--no-progress"]) == 0
    out, err = capsys.readouterr()
    assert json.loads(out)["counts"]["written"] == 8
    assert "%|" not in err and "decoding images" not in err
    for sp in ("train", "val"):  # the bars change nothing in the output
        for fn in os.listdir(tmp_path / "a" / sp):
            assert (tmp_path / "a" / sp / fn).read_bytes() == (tmp_path / "b" / sp / fn).read_bytes()


def test_more_bad_args(tmp_path):
    (tmp_path / "file").write_text("x")
    for extra, match in ((["--limit", "0"], "limit"), (["--quality", "0"], "quality"),
                         (["--out", str(tmp_path / "file")], "is a file")):
        argv = ["--source", "digits", "--out", str(tmp_path / "o"), *extra]
        with pytest.raises(ValueError, match=match):
            main(argv)
    with pytest.raises(FileNotFoundError, match="tsv"):
        main(["--source", "folder", "--tsv", str(tmp_path / "missing.tsv"), "--out", str(tmp_path / "o")])


def test_cli_user_error_is_one_line_exit_2(tmp_path):
    """One interpreter start-up: a missing --tsv is one `error:` line, no traceback, exit 2."""
    import subprocess
    import sys

    missing = str(tmp_path / "missing.tsv")
    r = subprocess.run([sys.executable, "-m", "msclip_fast.data.make_shards", "--source", "folder", "--tsv", missing,
                        "--out", str(tmp_path / "o"), "--no-progress"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 2, r.stderr
    assert r.stderr.strip().splitlines() == [f"error: --tsv file not found: {missing}"]
    assert r.stdout == ""
