"""zero_shot_eval / retrieval_eval on a deterministic toy model whose features are known."""
import math

import pytest
import torch
import torch.nn.functional as F

from msclip_fast.eval import (
    build_zero_shot_classifier,
    format_prompt,
    load_classnames_file,
    resolve_classes,
    retrieval_eval,
    retrieval_metrics,
    zero_shot_eval,
)

CLASSES = ["cat", "dog", "fish"]
TEMPLATES = ["a {}.", "the {}!"]
E = torch.eye(3)


class ToyModel(torch.nn.Module):
    """encode_image: row ``image[:,0,0,0]`` of IMAGE_TABLE; encode_text: tokens[:,0] is a
    class id, tokens[:,1] a template id; template 1 adds 0.5 of the next class's axis."""

    context_length = 77

    def __init__(self, image_table):
        super().__init__()
        self.dummy = torch.nn.Parameter(torch.zeros(1))
        self.image_table = image_table

    def encode_image(self, images, normalize=True):
        f = self.image_table[images[:, 0, 0, 0].long()]
        return F.normalize(f, dim=-1) if normalize else f

    def encode_text(self, tokens, normalize=True):
        c, t = tokens[:, 0], tokens[:, 1]
        f = E[c] + 0.5 * (t == 1).float()[:, None] * E[(c + 1) % 3]
        return F.normalize(f, dim=-1) if normalize else f


def toy_tokenizer(prompts):
    rows = []
    for p in prompts:
        cls = next(i for i, c in enumerate(CLASSES) if c in p)
        tpl = 1 if p.startswith("the ") else 0
        rows.append([cls, tpl] + [0] * 75)
    return torch.tensor(rows, dtype=torch.long)


def _batch(idx, metas, text=None):
    img = torch.zeros(len(idx), 3, 2, 2)
    img[:, 0, 0, 0] = torch.tensor(idx, dtype=torch.float)
    b = {"image": img, "meta": metas, "key": [str(i) for i in idx]}
    if text is not None:
        b["text"] = text
    return b


def test_classifier_is_normalized_template_mean():
    model = ToyModel(E)
    w = build_zero_shot_classifier(model, CLASSES, TEMPLATES, tokenizer=toy_tokenizer, batch_size=4)
    # per class: mean of e_c and (e_c + 0.5 e_{c+1}) / sqrt(1.25), re-normalized
    a = (1 + 1 / math.sqrt(1.25)) / 2
    b = (0.5 / math.sqrt(1.25)) / 2
    nrm = math.hypot(a, b)
    expected = torch.zeros(3, 3)
    for c in range(3):
        expected[c, c] = a / nrm
        expected[c, (c + 1) % 3] = b / nrm
    assert torch.allclose(w, expected, atol=1e-6)
    assert w.shape == (3, 3) and w.dtype == torch.float32


def test_zero_shot_eval_hand_checked():
    model = ToyModel(E).train()  # mode must be restored afterwards
    loader = [
        _batch([0, 1, 2], [{"class": "cat"}, {"class": "cat"}, {"class": "fish"}]),
        # image axis 1 -> predicted dog; a sample without class and one with an unknown class
        _batch([1, 0, 0], [{"class": "dog"}, {}, {"class": "bird"}]),
    ]
    m = zero_shot_eval(model, loader, CLASSES, TEMPLATES, tokenizer=toy_tokenizer, per_class=True)
    assert model.training
    # predictions: e0 -> cat, e1 -> dog, e2 -> fish. Labelled: cat ok, cat wrong, fish ok, dog ok
    assert m["top1"] == pytest.approx(3 / 4)
    assert m["balanced_top1"] == pytest.approx((1 / 2 + 1 + 1) / 3)
    assert m["chance_top1"] == pytest.approx(1 / 3)
    assert m["majority_rate"] == pytest.approx(2 / 4)
    assert "top5" not in m  # only 3 classes
    assert m["skipped"] == {"no_class": 1, "unknown_class": 1}
    assert m["per_class_top1"] == pytest.approx({"cat": 0.5, "dog": 1.0, "fish": 1.0})
    assert m["n"] == 4


def test_zero_shot_classes_from_data_and_int_labels():
    model = ToyModel(E)
    loader = [_batch([0, 1, 2], [{"class": "fish"}, {"class": "dog"}, {"class": "cat"}])]
    m = zero_shot_eval(model, loader, None, TEMPLATES, tokenizer=toy_tokenizer)
    # derived names are sorted: cat, dog, fish -> image axes 0, 1, 2 predict them in order
    assert m["num_classes"] == 3 and m["top1"] == pytest.approx(1 / 3) and m["skipped"] == {}
    # int labels are class indices when no class is named like them
    loader = [_batch([0, 1, 2], [{"class": 0}, {"class": 1}, {"class": 7}])]
    m = zero_shot_eval(model, loader, CLASSES, TEMPLATES, tokenizer=toy_tokenizer)
    assert m["top1"] == 1.0 and m["n"] == 2 and m["skipped"] == {"unknown_class": 1}


def test_zero_shot_no_labels_raises():
    with pytest.raises(ValueError, match="meta"):
        zero_shot_eval(ToyModel(E), [_batch([0], [{}])], CLASSES, TEMPLATES, tokenizer=toy_tokenizer)
    with pytest.raises(ValueError, match="templates"):
        build_zero_shot_classifier(ToyModel(E), CLASSES, [], tokenizer=toy_tokenizer)


def test_retrieval_eval_matches_metrics_with_duplicate_captions():
    g = torch.Generator().manual_seed(0)
    table = torch.randn(6, 3, generator=g)
    model = ToyModel(table).train()
    # captions as token rows: pairs 0/3 and 1/4 carry identical captions
    cls = torch.tensor([0, 1, 2, 0, 1, 2])
    tpl = torch.tensor([0, 0, 0, 0, 0, 1])
    text = torch.zeros(6, 77, dtype=torch.long)
    text[:, 0], text[:, 1] = cls, tpl
    loader = [_batch([0, 1, 2], [{}] * 3, text[:3]), _batch([3, 4, 5], [{}] * 3, text[3:])]
    m = retrieval_eval(model, loader, ks=(1, 2))
    assert model.training
    img = F.normalize(table, dim=-1)
    txt = model.encode_text(text)
    ref = retrieval_metrics(img, txt, captions=[0, 1, 2, 0, 1, 5], ks=(1, 2))
    assert m == pytest.approx(ref)
    assert m["n_unique_captions"] == 4
    # identical caption features: text 3 equals text 0, so image 3 can only find its own
    # caption at rank >= 1 when text 0 ties it (lower index first) -> dedup recall is higher
    assert m["i2t_r1_dedup"] >= m["i2t_r1"]
    no_dedup = retrieval_eval(model, loader, ks=(1,), dedup=False)
    assert "i2t_r1_dedup" not in no_dedup


def test_resolve_classes(tmp_path):
    names, templates = resolve_classes("imagenet")
    assert len(names) == 1000 and len(templates) == 80
    assert "{}" not in templates[0]("x")  # open_clip templates are callables
    # digits/openclipart read the manifest next to the split dir
    (tmp_path / "val").mkdir()
    (tmp_path / "manifest.json").write_text('{"classes": ["0", "1", "2"]}')
    names, templates = resolve_classes("digits", data=str(tmp_path / "val"))
    assert names == ["0", "1", "2"]
    prompts = [format_prompt(t, "three") for t in templates]
    assert "a photo of the digit three." in prompts and "handwritten 3" in prompts
    (tmp_path / "a" / "b").mkdir(parents=True)  # no manifest in b/ or a/
    names, _ = resolve_classes("openclipart", data=str(tmp_path / "a" / "b" / "*.tar"))
    assert names is None  # derived from the data later
    f = tmp_path / "classes.txt"
    f.write_text("# comment\ncat\n\ndog\n")
    assert resolve_classes(str(f))[0] == ["cat", "dog"] == load_classnames_file(f)
    with pytest.raises(ValueError, match="classes"):
        resolve_classes("no-such-set")
