"""Gallery command, train-caption zero-shot prompts and the --split / --classes CLI messages,
on hand-written shards and a randomly initialized tiny checkpoint (all in-process)."""
import json

import pytest
import torch
from PIL import Image

from msclip_fast.eval import cli, distinctive_words, retrieve, train_caption_prompts
from msclip_fast.eval.prompts import read_shard_captions
from shard_files import encode_image
from shard_files import write_tar as _write_tar

CLASSES = ["animals", "buildings", "signs_and_symbols"]
TRAIN_CAPTIONS = {
    "animals": ["a cat sitting", "a brown dog", "a cat and a dog", "cute cat"],
    "buildings": ["a red house", "old church tower", "house with garden", "small house"],
    "signs_and_symbols": ["a stop sign", "warning sign arrow", "arrow sign", "road sign"],
}
VAL_CAPTIONS = {
    "animals": ["a zebra heldoutword", "a cat"],
    "buildings": ["a castle", "a house"],
    "signs_and_symbols": ["an arrow", "a sign"],
}


def _png(rgb, size=(48, 40)):
    return encode_image(Image.new("RGB", size, rgb), "PNG")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("gal")
    for split, caps in (("train", TRAIN_CAPTIONS), ("val", VAL_CAPTIONS)):
        (d / split).mkdir()
        samples, k = [], 0
        for ci, c in enumerate(CLASSES):
            for cap in caps[c]:
                samples.append({"__key__": f"{split}_{k:03d}", "png": _png((40 * ci, 5 * k % 255, 200)),
                                "txt": cap, "json": {"class": c}})
                k += 1
        # a duplicated caption on another image: counts as "same_caption"
        if split == "val":
            samples.append({"__key__": f"{split}_{k:03d}", "png": _png((9, 9, 9)), "txt": "a cat",
                            "json": {"class": "animals"}})
        _write_tar(d / split / "000000.tar", samples)
    (d / "manifest.json").write_text(json.dumps({"classes": CLASSES}))
    return d


def test_gallery_cli_writes_pictures_and_json(data, run_dir, tmp_path, capsys):
    out = tmp_path / "gallery"
    m = cli.main(["gallery", "--checkpoint", str(run_dir), "--data", str(data), "--out", str(out),
                  "--queries", "4", "--top", "3", "--batch-size", "4"])
    printed = capsys.readouterr().out
    assert str(out / "text_to_image.png") in printed and str(out / "image_to_text.png") in printed
    for name in ("text_to_image.png", "image_to_text.png"):
        im = Image.open(out / name)
        assert im.format == "PNG" and im.size[0] > 300 and im.size[1] > 200
    shown = json.loads((out / "gallery.json").read_text())
    assert shown["n"] == 7 and shown["top"] == 3 and m["n"] == 7
    assert len(shown["text_to_image"]) == 4 and len(shown["image_to_text"]) == 4
    t2i_captions = [e["caption"] for e in shown["text_to_image"]]
    assert len(set(t2i_captions)) == 4  # text queries are distinct captions
    for e in shown["text_to_image"] + shown["image_to_text"]:
        scores = [h["score"] for h in e["retrieved"]]
        assert scores == sorted(scores, reverse=True) and len(scores) == 3
        assert all(h["caption"] for h in e["retrieved"]) and e["caption"]
        exact = [i for i, h in enumerate(e["retrieved"]) if h["match"] == "exact"]
        assert exact == ([e["true_rank"] - 1] if e["true_rank"] <= 3 else [])
        for h in e["retrieved"]:
            if h["match"] == "same_caption":
                assert h["caption"] == e["caption"] and h["key"] != e["key"]


def test_retrieve_ranks_by_similarity_and_marks_matches():
    """Toy features: image i and caption i are e_i, caption 3 repeats caption 0's tokens."""

    class Toy(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.p = torch.nn.Parameter(torch.zeros(1))

        def encode_image(self, x, normalize=True):
            return torch.eye(5)[x[:, 0, 0, 0].long()]

        def encode_text(self, t, normalize=True):
            return torch.eye(5)[t[:, 0]] + 0.1 * torch.eye(5)[t[:, 1]]

    img = torch.zeros(5, 3, 2, 2)
    img[:, 0, 0, 0] = torch.arange(5.0)
    text = torch.zeros(5, 77, dtype=torch.long)
    text[:, 0] = torch.arange(5)
    text[:, 1] = torch.tensor([1, 2, 3, 4, 0])
    text[0] = text[3]  # captions 0 and 3 identical (both e_3 + 0.1 e_4)
    res = retrieve(Toy(), [{"image": img, "text": text, "key": list("abcde")}], queries=5, top=2)
    assert res["n"] == 5 and len(res["t2i"]) == 4  # 4 distinct captions
    by_q = {e["query"]: e for e in res["i2t"]}
    assert by_q[1]["retrieved"][0]["index"] == 1 and by_q[1]["retrieved"][0]["match"] == "exact"
    assert by_q[1]["true_rank"] == 1
    # image 3: its own caption and the identical caption 0 tie at the top, both correct
    assert {h["match"] for h in by_q[3]["retrieved"]} == {"exact", "same_caption"}
    assert by_q[3]["true_rank"] == 1
    # image 0 (e_0) shares nothing with its caption (e_3 + 0.1 e_4): not first
    assert by_q[0]["true_rank"] > 1 and by_q[0]["retrieved"][0]["match"] is None


def test_zeroshot_train_caption_prompts_cli(data, run_dir, capsys):
    m = cli.main(["zeroshot", "--checkpoint", str(run_dir), "--data", str(data), "--classes", "openclipart",
                  "--prompts", "train-captions", "--train-data", str(data), "--batch-size", "8"])
    assert m["prompts"] == "train-captions" and m["num_classes"] == 3
    for k in ("top1", "balanced_top1", "chance_top1"):
        assert 0 <= m[k] <= 1 and 0 <= m["plain_prompts"][k] <= 1
    words = m["train_caption_words"]
    assert "cat" in words["animals"] and "house" in words["buildings"] and "sign" in words["signs_and_symbols"]
    assert not any("heldoutword" in w or "zebra" in w for ws in words.values() for w in ws)
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["prompts"] == "train-captions"


def test_train_caption_prompts_refuse_eval_shards_and_use_train_only(data):
    from msclip_fast.data import resolve_urls

    with pytest.raises(ValueError, match="shares 1 shard"):
        train_caption_prompts(str(data / "val"), CLASSES, ["a clip art of {}."], eval_urls=resolve_urls(str(data / "val")))
    prompts, words = train_caption_prompts(str(data / "train"), CLASSES, ["a clip art of {}."],
                                           eval_urls=resolve_urls(str(data / "val")), words=2, captions=1)
    assert prompts["animals"][:2] == ["a clip art of cat.", "a clip art of dog."]
    assert len(prompts["animals"]) == 3 and prompts["animals"][2] in TRAIN_CAPTIONS["animals"]
    with pytest.raises(ValueError, match="needs --train-data"):
        cli.main(["zeroshot", "--checkpoint", "x", "--data", str(data), "--classes", "digits",
                  "--prompts", "train-captions"])


def test_distinctive_words_and_caption_reader(data):
    w = distinctive_words({"a": ["red cat", "red dog", "cat"], "b": ["red car", "blue car"]}, top=3)
    assert w["a"][0] == "cat" and "car" == w["b"][0] and "red" not in w["b"][:1]
    rows = list(read_shard_captions([str(data / "train" / "000000.tar")]))
    assert len(rows) == 12 and rows[0] == ("train_000", "a cat sitting", {"class": "animals"})


def test_missing_split_error_names_split_and_contents(tmp_path, run_dir, capsys):
    (tmp_path / "train").mkdir()
    _write_tar(tmp_path / "train" / "000000.tar", [{"__key__": "k", "png": _png((1, 2, 3)), "txt": "x"}])
    (tmp_path / "notes.txt").write_text("x")
    rc = cli.cli(["retrieval", "--checkpoint", str(run_dir), "--data", str(tmp_path), "--split", "validation"])
    err = capsys.readouterr().err
    assert rc == 2
    assert "no split 'validation'" in err and "notes.txt" in err and "train/" in err
    assert "split directories with shards: ['train']" in err


def test_zeroshot_help_says_where_class_names_come_from(capsys):
    with pytest.raises(SystemExit):
        cli.main(["zeroshot", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "manifest.json" in out and "prompt templates" in out and "train-captions" in out


def test_zero_shot_eval_class_prompts_reported_beside_plain():
    """Class names that point the wrong way (plain prompts: 0 %) vs caption words (100 %)."""
    from msclip_fast.eval import zero_shot_eval

    axis = {"gradient": 0, "shapes": 0, "star": 1, "special": 1}

    def tok(prompts):
        return torch.tensor([[next(v for w, v in axis.items() if w in p)] + [0] * 76 for p in prompts])

    class Toy(torch.nn.Module):
        context_length = 77

        def __init__(self):
            super().__init__()
            self.p = torch.nn.Parameter(torch.zeros(1))

        def encode_image(self, x, normalize=True):
            return torch.eye(2)[x[:, 0, 0, 0].long()]

        def encode_text(self, t, normalize=True):
            return torch.eye(2)[t[:, 0]]

    img = torch.zeros(4, 3, 2, 2)
    img[:, 0, 0, 0] = torch.tensor([0.0, 0.0, 1.0, 1.0])
    batch = {"image": img, "meta": [{"class": "special"}] * 2 + [{"class": "shapes"}] * 2}
    m = zero_shot_eval(Toy(), [batch], ["special", "shapes"], ["a {}."], tokenizer=tok,
                       class_prompts={"special": ["a clip art of gradient."], "shapes": ["a clip art of star."]})
    assert m["top1"] == 1.0 and m["plain_prompts"]["top1"] == 0.0
    # a class without caption prompts keeps its plain prompts
    m = zero_shot_eval(Toy(), [batch], ["special", "shapes"], ["a {}."], tokenizer=tok,
                       class_prompts={"special": ["gradient"]})
    assert m["top1"] == 0.5 and "plain_prompts" in m
