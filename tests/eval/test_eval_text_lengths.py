"""The evaluations hand CPU caption lengths to ``encode_text(..., lengths=)`` when it takes them."""
import pytest
import torch
import torch.nn.functional as F

import msclip_fast as mf
from msclip_fast.eval import build_zero_shot_classifier, retrieval_eval, zero_shot_eval
from msclip_fast.eval.common import encode_loader, encode_text_takes_lengths
from msclip_fast.modules import text_lengths

CLASSES = ["cat", "dog", "fish"]
# "!,!" puts token id 0 (the padding id) inside the prompt: the length must still end at the EOT
TEMPLATES = ["a photo of a {}.", lambda c: f"{c} !,! {c}", "{}"]


class _Base(torch.nn.Module):
    context_length = 77

    def __init__(self):
        super().__init__()
        self.dummy = torch.nn.Parameter(torch.zeros(1))
        self.calls = []

    def encode_image(self, images, normalize=True):
        f = images.flatten(1)[:, :4].float() + 1.0
        return F.normalize(f, dim=-1) if normalize else f

    def _text(self, tokens):
        # features from the tokens' content: equal captions -> equal features
        g = torch.Generator().manual_seed(0)
        table = torch.randn(49408, 4, generator=g)
        return table[tokens].sum(1)


class LengthsModel(_Base):
    def encode_text(self, tokens, normalize=True, lengths=None):
        self.calls.append({"tokens": tokens, "lengths": lengths})
        f = self._text(tokens)
        return F.normalize(f, dim=-1) if normalize else f


class PlainModel(_Base):  # a third-party model: no lengths parameter
    def encode_text(self, tokens, normalize=True):
        self.calls.append({"tokens": tokens})
        f = self._text(tokens)
        return F.normalize(f, dim=-1) if normalize else f


class KwargsModel(_Base):  # **kwargs says nothing about lengths: not passed
    def encode_text(self, tokens, normalize=True, **kwargs):
        self.calls.append({"tokens": tokens, **kwargs})
        f = self._text(tokens)
        return F.normalize(f, dim=-1) if normalize else f


def _check_lengths(call):
    n = call["lengths"]
    assert n is not None
    assert n.device.type == "cpu" and n.dtype == torch.int64 and n.shape == (call["tokens"].shape[0],)
    assert torch.equal(n, text_lengths(call["tokens"]))
    rows = torch.arange(len(n))
    assert (call["tokens"][rows, n - 1] == 49407).all()  # ends at the EOT


def test_signature_inspection():
    assert encode_text_takes_lengths(LengthsModel())
    assert not encode_text_takes_lengths(PlainModel())
    assert not encode_text_takes_lengths(KwargsModel())
    assert encode_text_takes_lengths(mf.create_model("clip-tiny"))


def test_zero_shot_classifier_passes_prompt_lengths():
    model = LengthsModel()
    w = build_zero_shot_classifier(model, CLASSES, TEMPLATES, batch_size=4)
    assert w.shape == (3, 4)
    assert [c["tokens"].shape[0] for c in model.calls] == [4, 4, 1]  # 9 prompts in chunks of 4
    for c in model.calls:
        _check_lengths(c)
    toks = torch.cat([c["tokens"] for c in model.calls])
    # the '!,!' prompts really hold a 0 before their EOT
    lens = text_lengths(toks)
    assert any((row[1 : n - 1] == 0).any() for row, n in zip(toks, lens.tolist()))
    # same classifier as a model that gets no lengths
    plain = PlainModel()
    torch.testing.assert_close(build_zero_shot_classifier(plain, CLASSES, TEMPLATES, batch_size=4), w)
    assert all(set(c) == {"tokens"} for c in plain.calls)


def _loader(tok, with_lengths):
    caps = [["a cat", "a dog !,! here", "fish"], ["a cat", "two birds"]]
    out = []
    for i, cs in enumerate(caps):
        t = tok(cs)
        b = {"image": torch.rand(len(cs), 3, 2, 2), "text": t, "key": [f"{i}{j}" for j in range(len(cs))],
             "meta": [{"class": "cat"}] * len(cs)}
        if with_lengths:
            b["text_lengths"] = text_lengths(t)
        out.append(b)
    return out


@pytest.mark.parametrize("with_lengths", [True, False])
def test_retrieval_passes_loader_or_computed_lengths(with_lengths):
    tok = mf.get_tokenizer()
    loader = _loader(tok, with_lengths)
    model = LengthsModel()
    m = retrieval_eval(model, loader)
    assert m["n"] == 5
    assert len(model.calls) == 2
    for c, b in zip(model.calls, loader):
        _check_lengths(c)
        if with_lengths:
            assert c["lengths"] is b["text_lengths"]  # the loader's tensor, reused as is
    assert retrieval_eval(PlainModel(), loader) == m
    assert retrieval_eval(KwargsModel(), loader) == m


def test_third_party_models_still_work():
    tok = mf.get_tokenizer()
    loader = _loader(tok, True)
    for cls in (PlainModel, KwargsModel):
        model = cls()
        enc = encode_loader(model, loader, text=True)
        assert enc["text"].shape == (5, 4)
        assert all(set(c) == {"tokens"} for c in model.calls)
        m = zero_shot_eval(model, loader, CLASSES, TEMPLATES)
        assert m["n"] == 5


def test_real_model_gets_lengths_and_same_features(monkeypatch):
    model = mf.create_model("msclip-tiny").eval()
    real = type(model).encode_text
    seen = []

    def encode_text(self, tokens, normalize=True, lengths=None):
        seen.append({"tokens": tokens, "lengths": lengths})
        return real(self, tokens, normalize=normalize, lengths=lengths)

    monkeypatch.setattr(type(model), "encode_text", encode_text)
    w = build_zero_shot_classifier(model, CLASSES, TEMPLATES, batch_size=5)
    assert len(seen) == 2
    for c in seen:
        _check_lengths(c)
    # features with the handed-over lengths equal the model's own (lengths=None) result
    with torch.no_grad():
        toks = torch.cat([c["tokens"] for c in seen])
        f = F.normalize(real(model, toks, normalize=True).float(), dim=-1).view(3, 3, -1)
    torch.testing.assert_close(w, F.normalize(f.mean(1), dim=-1), rtol=1e-4, atol=1e-5)
