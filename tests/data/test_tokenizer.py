import pytest
import torch

from msclip_fast.data import get_tokenizer
from msclip_fast.data.tokenizer import EOT_TOKEN, SOT_TOKEN


@pytest.fixture(scope="module")
def tok():
    return get_tokenizer()


def test_shape_dtype_and_special_tokens(tok):
    t = tok(["a photo of a cat", "dog"])
    assert t.shape == (2, 77) and t.dtype == torch.int64
    for row in t:
        assert row[0] == SOT_TOKEN
        n = int((row != 0).sum())
        assert row[n - 1] == EOT_TOKEN and (row[n:] == 0).all()
        assert int(row.argmax()) == n - 1  # EOT pooling finds it


def test_matches_open_clip(tok):
    import open_clip

    ref = open_clip.get_tokenizer("ViT-B-32")
    texts = ["A photo of a café", "résumé naïve Ångström", "🐱🐶 emoji"]
    assert torch.equal(tok(texts), ref(texts))


def test_accents_emoji_roundtrip(tok):
    for text in ["crème brûlée à la française", "señor niño", "cat 🐱 and dog 🐶"]:
        ids = tok(text)[0]
        assert (ids > 0).sum() > 2
        assert tok.decode(ids) == text.lower()


def test_html_entities_unescaped(tok):
    assert torch.equal(tok("caf&eacute; &amp; bar"), tok("café & bar"))
    assert torch.equal(tok("Croissant (B &amp;amp; W)"), tok("croissant (b & w)"))


def test_long_caption_truncated_with_eot_last(tok):
    t = tok(" ".join(["word"] * 200))
    assert t.shape == (1, 77)
    assert t[0, 0] == SOT_TOKEN and t[0, 76] == EOT_TOKEN
    assert (t[0, 1:76] != 0).all() and (t[0, 1:76] != EOT_TOKEN).all()
    assert int(t[0].argmax()) == 76


def test_empty_and_single_string(tok):
    t = tok("")
    assert t.shape == (1, 77)
    assert t[0, :2].tolist() == [SOT_TOKEN, EOT_TOKEN] and (t[0, 2:] == 0).all()
    assert tok([]).shape == (0, 77)


def test_context_length_and_errors():
    t = get_tokenizer(16)(" ".join(["x"] * 50))
    assert t.shape == (1, 16) and t[0, 15] == EOT_TOKEN
    with pytest.raises(ValueError, match="context_length"):
        get_tokenizer(1)
    with pytest.raises(ValueError, match=r"texts\[1\]"):
        get_tokenizer()(["ok", None])
