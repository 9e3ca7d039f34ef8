"""EOT trimming (DESIGN §3): each caption runs only its ``eot + 1`` tokens and the features and
every gradient equal the padded computation, in float64, for every preset, both schedules."""
import pytest
import torch

from msclip_fast.models import create_model, list_models
from msclip_fast.modules import text_lengths

SOT, EOT, CTX = 49406, 49407, 77
TINY = [n for n in list_models() if n.endswith("-tiny")]


def _text_configs_once(names):
    """One preset per distinct text-side config: trimming acts on the text tower only, so e.g.
    clip-b16 and clip-b32 (equal but for the vision tower) would repeat the same check."""
    import dataclasses

    from msclip_fast.models import get_model_config

    seen, out = set(), []
    for n in names:
        c = dataclasses.asdict(get_model_config(n))
        key = repr(sorted((k, v) for k, v in c.items() if k not in ("name", "vision")))
        if key not in seen:
            seen.add(key)
            out.append(n)
    return out


FULL = _text_configs_once(n for n in list_models() if not n.endswith("-tiny"))


def _caption(n_words, g, words=None):
    """SOT, ``n_words`` ids (or the given ones), EOT, zero padding; truncated as the tokenizer
    does (EOT at 76 for a full-length caption)."""
    row = torch.zeros(CTX, dtype=torch.int64)
    body = torch.randint(1, 49000, (n_words,), generator=g) if words is None else torch.tensor(words)
    body = body[:CTX - 2]
    row[0] = SOT
    row[1:1 + len(body)] = body
    row[1 + len(body)] = EOT
    return row


def _tokens(kind, g):
    if kind == "mixed":
        rows = [_caption(1, g), _caption(75, g), _caption(200, g),  # 1 word; EOT at 76 twice
                _caption(6, g, [0, 0, 0, 0, 0, 0]),  # '!!!!!!' is token id 0, as is padding
                _caption(9, g, [320, 0, 1125, 0, 0, 539, 0, 0, 0]),
                _caption(17, g)]
    elif kind == "same_length":
        rows = [_caption(11, g) for _ in range(4)]
    elif kind == "full_length":
        rows = [_caption(80, g) for _ in range(2)]
    else:
        raise ValueError(kind)
    return torch.stack(rows)


def _perturb(model, seed=0, scale=0.2):
    """Per-modality rows and zero-initialized parallel modules differ, so any modality or
    position mix-up shows."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if ".ln" in n or "parallel_" in n or n.startswith("ln") or "positional" in n:
                p.add_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))


def _pair(name, dtype=torch.float64, scale=0.2):
    torch.manual_seed(0)
    trimmed = create_model(name).to(dtype)
    assert trimmed.config.trim_text is True  # the default
    _perturb(trimmed, scale=scale)
    padded = create_model(name, trim_text=False).to(dtype)
    padded.load_state_dict(trimmed.state_dict())
    return trimmed, padded


def _run(model, images, tokens, packed, lengths=None):
    model.zero_grad(set_to_none=True)
    img, txt = model.forward_features(images, tokens, packed=packed, text_lengths=lengths)
    g = torch.Generator().manual_seed(7)  # the same weights in every dtype
    wi = torch.randn(img.shape, generator=g, dtype=torch.float64).to(img.dtype)
    wt = torch.randn(txt.shape, generator=g, dtype=torch.float64).to(txt.dtype)
    loss = (img * wi).sum() + (txt * wt).sum()
    loss.backward()
    return img.detach(), txt.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


def _check_equal(a, b, rtol=1e-10, atol=1e-12):
    (ia, ta, ga), (ib, tb, gb) = a, b
    torch.testing.assert_close(ia, ib, rtol=rtol, atol=atol)
    torch.testing.assert_close(ta, tb, rtol=rtol, atol=atol)
    assert set(ga) == set(gb)
    for n in ga:
        torch.testing.assert_close(ga[n], gb[n], rtol=rtol, atol=atol, msg=lambda m: f"{n}: {m}")


def _schedules(model):
    return [False, True] if model.config.packed else [False]


CASES = [(n, "mixed") for n in TINY] + [(n, k) for n in ("msclip-s-tiny", "clip-tiny")
                                         for k in ("same_length", "full_length")]


@pytest.mark.parametrize("name,kind", CASES)
def test_trimmed_equals_padded_fp64_tiny(name, kind):
    trimmed, padded = _pair(name)
    g = torch.Generator().manual_seed(1)
    tokens = _tokens(kind, g)
    images = torch.randn(3, 3, 64, 64, generator=g, dtype=torch.float64)  # 3 images, != text count
    for packed in _schedules(trimmed):
        want = _run(padded, images, tokens, packed)
        # with the host lengths handed over (as the loader does) and computed by the model
        lengths = text_lengths(tokens) if packed == trimmed.config.packed else None
        _check_equal(_run(trimmed, images, tokens, packed, lengths), want)
    # positional rows beyond the longest caption: only the padded run touches them, and their
    # gradient is exactly zero (nothing after an EOT reaches the pooled token)
    longest = int(text_lengths(tokens).max())
    assert torch.all(want[2]["text.positional_embedding"][longest:] == 0)


@pytest.mark.parametrize("name", FULL)
def test_trimmed_equals_padded_fp64_full_presets(name):
    """Full-size presets, text tower (where trimming acts; the packed schedule is covered by
    the tiny presets above), forward and every gradient. A milder perturbation keeps 12
    perturbed layers well conditioned, so fp64 agreement is at rounding level."""
    torch.manual_seed(0)
    model = create_model(name).double()
    _perturb(model, scale=0.02)
    tokens = _tokens("mixed", torch.Generator().manual_seed(2))[[0, 1, 3]]  # 1 word, EOT at 76, '!'s

    def run(trim):
        # one model for both runs (a second full-size fp64 model costs more than the check)
        model.config = model.config.replace(trim_text=trim)
        model.zero_grad(set_to_none=True)
        f = model.encode_text(tokens, normalize=False)
        w = torch.randn(f.shape, generator=torch.Generator().manual_seed(7), dtype=f.dtype)
        (f * w).sum().backward()
        return f.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}

    (fa, ga), (fb, gb) = run(True), run(False)
    torch.testing.assert_close(fa, fb, rtol=1e-10, atol=1e-12)
    assert set(ga) == set(gb) and "text.token_embedding.weight" in ga
    for n in ga:
        torch.testing.assert_close(ga[n], gb[n], rtol=1e-9, atol=1e-11, msg=lambda m: f"{n}: {m}")


def test_encode_text_trimmed_equals_padded_and_rows_run():
    trimmed, padded = _pair("msclip-s-tiny")
    tokens = _tokens("mixed", torch.Generator().manual_seed(3))
    with torch.no_grad():
        a = trimmed.encode_text(tokens)
        b = padded.encode_text(tokens)
        c = trimmed.encode_text(tokens, lengths=text_lengths(tokens))
    torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(c, a, rtol=0, atol=0)
    x, pack, pool = trimmed.text.embed(tokens, trim=True)
    lens = text_lengths(tokens).tolist()
    assert x.shape[0] == sum(lens) and pack.seqlens == (tuple(lens),) and pack.max_seqlen == max(lens)
    assert pool.tolist() == (torch.tensor(lens).cumsum(0) - 1).tolist()


def test_bf16_trimmed_close_to_padded():
    trimmed, padded = _pair("msclip-s-tiny", torch.float32)
    g = torch.Generator().manual_seed(4)
    tokens, images = _tokens("mixed", g), torch.randn(2, 3, 64, 64, generator=g)
    ref = _run(trimmed.double(), images.double(), tokens, True)
    trimmed.float()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = _run(trimmed, images, tokens, True)
        out_pad = _run(padded, images, tokens, True)

    def rel(a, b):
        return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))

    for got in (out, out_pad):
        assert rel(got[0], ref[0]) <= 1.6e-2 and rel(got[1], ref[1]) <= 1.6e-2
        for n in ("blocks.1.attn.in_proj_weight", "text.token_embedding.weight", "visual.proj"):
            assert rel(got[2][n], ref[2][n]) <= 1.6e-2, n


def test_bad_lengths_are_refused():
    model = create_model("msclip-tiny")
    tokens = _tokens("same_length", torch.Generator().manual_seed(5))
    with pytest.raises(ValueError, match="one entry per caption"):
        model.encode_text(tokens, lengths=[13, 13])
    with pytest.raises(ValueError, match=r"lie in \[1, 77\]"):
        model.encode_text(tokens, lengths=[13, 13, 13, 0])
    with pytest.raises(ValueError, match="eot \\+ 1"):
        model.encode_text(tokens, lengths=[13, 13, 13, 12])
    with pytest.raises(ValueError, match="integer tensor"):
        model.encode_text(tokens, lengths=torch.full((4,), 13.0))


def test_trimmed_forward_runs_fewer_text_rows(monkeypatch):
    """The text tower's attention really sees only the trimmed rows."""
    from msclip_fast import ops

    model = create_model("msclip-s-tiny")
    tokens = _tokens("mixed", torch.Generator().manual_seed(6))
    rows = []
    real = ops.attention

    def spy(q, *a, **kw):
        rows.append(q.shape[0] if kw.get("cu_seqlens") is not None else q.shape[0] * q.shape[2])
        return real(q, *a, **kw)

    monkeypatch.setattr(ops, "attention", spy)
    with torch.no_grad():
        model.encode_text(tokens)
    assert rows and all(r == int(text_lengths(tokens).sum()) for r in rows)
