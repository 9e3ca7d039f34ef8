import os

import pytest

from msclip_fast.data import resolve_urls
from msclip_fast.data.urls import expand_braces


@pytest.fixture()
def shard_tree(tmp_path):
    for split in ("train", "val"):
        os.makedirs(tmp_path / split)
        for i in range(3):
            (tmp_path / split / f"{i:06d}.tar").write_bytes(b"")
    (tmp_path / "train" / "notes.txt").write_text("x")
    return tmp_path


def test_dir_glob_brace_and_joined(shard_tree):
    t = str(shard_tree / "train")
    v = str(shard_tree / "val")
    assert resolve_urls(t) == [f"{t}/{i:06d}.tar" for i in range(3)]
    assert resolve_urls(f"{t}/*.tar") == resolve_urls(t)
    assert resolve_urls(f"{t}/{{000000..000001}}.tar") == [f"{t}/000000.tar", f"{t}/000001.tar"]
    assert resolve_urls(f"{t}::{v}/00000[12].tar") == resolve_urls(t) + [f"{v}/000001.tar", f"{v}/000002.tar"]
    assert resolve_urls([t, t]) == resolve_urls(t)  # duplicates removed


def test_expand_braces():
    assert expand_braces("a{0..2}b") == ["a0b", "a1b", "a2b"]
    assert expand_braces("{00..02}") == ["00", "01", "02"]
    assert expand_braces("{x,y}/{1..2}") == ["x/1", "x/2", "y/1", "y/2"]
    with pytest.raises(ValueError, match="empty"):
        expand_braces("{5..1}")


def test_errors_name_the_pattern(shard_tree):
    bad = str(shard_tree / "train" / "zz*.tar")
    with pytest.raises(ValueError, match="zz"):
        resolve_urls(f"{shard_tree}/train::{bad}")
    with pytest.raises(ValueError, match="no .tar"):
        resolve_urls(str(shard_tree))  # the root holds only folders
    with pytest.raises(ValueError, match="empty"):
        resolve_urls("")
