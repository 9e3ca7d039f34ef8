"""msclip_fast.integrations.open_clip.patch / unpatch on real open-clip-torch models.

Patched == unpatched (features and every parameter gradient, fp32, CPU, relative error
<= 1e-4 per tensor, DESIGN §7 matmul-based bound) for ViT-B-32 (random weights, batch 2) and
tiny configs (QuickGELU CLIP, GELU CustomTextCLIP with open_clip's custom Attention blocks, the
Triton backend under TRITON_INTERPRET=1); unpatch restores bit-identical outputs; state dicts
keep open_clip's keys and load across patched / unpatched models; unsupported blocks are left
alone whole and reported. Expensive models are built once per module (CI time budget).
"""
import copy
import logging

import pytest
import torch
from torch import nn

open_clip = pytest.importorskip("open_clip")

from msclip_fast.integrations.open_clip import PatchReport, is_patched, patch, unpatch  # noqa: E402
from msclip_fast.modules.dropin import (  # noqa: E402
    DropInAttention,
    DropInLayerNorm,
    DropInMLP,
    DropInMultiheadAttention,
)

TOL = 1e-4  # DESIGN §7: fp32, matmul-based
EOT = 49407

TINY_VISION = dict(image_size=32, layers=2, width=64, head_width=32, patch_size=8)
TINY_TEXT = dict(context_length=77, vocab_size=49408, width=64, heads=2, layers=2)


def _rel(a, b) -> float:
    a, b = a.detach(), b.detach()
    nb = b.norm()
    return float((a - b).norm() / nb) if nb > 0 else float(a.norm())


def _inputs(image_size, context, batch=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    img = torch.randn(batch, 3, image_size, image_size, generator=g)
    txt = torch.randint(1, EOT - 1, (batch, context), generator=g)
    for i, e in enumerate(torch.randint(3, context, (batch,), generator=g).tolist()):
        txt[i, e] = EOT
        txt[i, e + 1:] = 0
    return img, txt


def _run(model, img, txt):
    """Features (detached) and every parameter gradient of a fixed linear probe of them."""
    model.zero_grad(set_to_none=True)
    fi, ft = model.encode_image(img), model.encode_text(txt)
    g = torch.Generator().manual_seed(1)
    (fi * torch.randn(fi.shape, generator=g)).sum().add((ft * torch.randn(ft.shape, generator=g)).sum()).backward()
    grads = {n: (None if p.grad is None else p.grad.clone()) for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    return fi.detach(), ft.detach(), grads


def _compare(model, img, txt, **patch_kw):
    """Run unpatched, patched, unpatched again; returns everything the tests assert on."""
    base = _run(model, img, txt)
    keys0 = list(model.state_dict())
    patch(model, **patch_kw)
    report = model._msclip_patch_report
    types = {n: type(m) for n, m in model.named_modules()}
    keys1 = list(model.state_dict())
    patched = _run(model, img, txt)
    unpatch(model)
    with torch.no_grad():
        again = (model.encode_image(img), model.encode_text(txt))
    return dict(base=base, patched=patched, again=again, report=report, types=types,
                keys0=keys0, keys1=keys1, keys2=list(model.state_dict()))


def _assert_match(res, tol=TOL):
    (i0, t0, g0), (i1, t1, g1) = res["base"], res["patched"]
    assert _rel(i1, i0) <= tol, _rel(i1, i0)
    assert _rel(t1, t0) <= tol, _rel(t1, t0)
    assert g0.keys() == g1.keys()
    bad = {}
    for n in g0:
        assert (g0[n] is None) == (g1[n] is None), n
        if g0[n] is not None and _rel(g1[n], g0[n]) > tol:
            bad[n] = _rel(g1[n], g0[n])
    assert not bad, bad


def _tiny_clip(seed=0, **text):
    torch.manual_seed(seed)
    return open_clip.CLIP(32, dict(TINY_VISION), {**TINY_TEXT, **text}, quick_gelu=True)


def _tiny_custom(seed=0, vision=None, text=None):
    torch.manual_seed(seed)
    return open_clip.CustomTextCLIP(32, {**TINY_VISION, **(vision or {})}, {**TINY_TEXT, **(text or {})})


# ---------------------------------------------------------------- ViT-B-32, random weights


@pytest.fixture(scope="module")
def vitb32():
    torch.manual_seed(0)
    model = open_clip.create_model("ViT-B-32", pretrained=None)
    img, txt = _inputs(224, 77)
    return _compare(model, img, txt, backend="reference")


def test_vitb32_patched_matches_unpatched_features_and_grads(vitb32):
    _assert_match(vitb32)


def test_vitb32_every_block_and_tower_norm_is_patched(vitb32):
    rep = vitb32["report"]
    assert isinstance(rep, PatchReport) and rep.skipped == []
    assert len(rep.patched) == 2 * 12 * 4 + 3  # attn, ln_1, ln_2, mlp per block; ln_pre, ln_post, ln_final
    types = vitb32["types"]
    for tower in ("visual.transformer", "transformer"):
        for i in range(12):
            b = f"{tower}.resblocks.{i}"
            assert types[f"{b}.attn"] is DropInMultiheadAttention
            assert types[f"{b}.ln_1"] is DropInLayerNorm and types[f"{b}.ln_2"] is DropInLayerNorm
            assert types[f"{b}.mlp"] is DropInMLP
    assert all(types[p] is DropInLayerNorm for p in ("visual.ln_pre", "visual.ln_post", "ln_final"))


def test_vitb32_state_dict_keys_and_unpatch_bit_identical(vitb32):
    assert vitb32["keys1"] == vitb32["keys0"] == vitb32["keys2"]
    i0, t0, _ = vitb32["base"]
    assert torch.equal(vitb32["again"][0], i0) and torch.equal(vitb32["again"][1], t0)


# ---------------------------------------------------------------- tiny configs


@pytest.fixture(scope="module")
def tiny_clip():
    model = _tiny_clip()
    img, txt = _inputs(32, 77, seed=2)
    return _compare(model, img, txt, backend="reference")


def test_tiny_quickgelu_clip_matches_and_unpatches(tiny_clip):
    _assert_match(tiny_clip)
    assert tiny_clip["report"].skipped == []
    assert tiny_clip["keys1"] == tiny_clip["keys0"]
    i0, t0, _ = tiny_clip["base"]
    assert torch.equal(tiny_clip["again"][0], i0) and torch.equal(tiny_clip["again"][1], t0)


def test_tiny_custom_attention_blocks_gelu_match():
    """CustomTextCLIP (model.text) with block_type="custom": open_clip's Attention class path,
    and a scale_attn LayerNorm (ln_attn) swapped with the block."""
    model = _tiny_custom(vision=dict(block_type="custom", scale_attn=True), text=dict(block_type="custom"))
    assert type(model.text.transformer.resblocks[0].attn).__name__ == "Attention"
    img, txt = _inputs(32, 77, seed=3)
    res = _compare(model, img, txt, backend="reference")
    _assert_match(res)
    assert res["report"].skipped == []
    assert res["types"]["text.transformer.resblocks.0.attn"] is DropInAttention
    assert res["types"]["visual.transformer.resblocks.1.ln_attn"] is DropInLayerNorm
    assert res["types"]["text.transformer.resblocks.1.mlp"] is DropInMLP
    assert res["keys1"] == res["keys0"]
    i0, t0, _ = res["base"]
    assert torch.equal(res["again"][0], i0) and torch.equal(res["again"][1], t0)


def test_state_dicts_load_across_patched_and_unpatched():
    a, b = _tiny_clip(seed=0), _tiny_clip(seed=1)
    img, txt = _inputs(32, 77, seed=4)
    patch(a, backend="reference")
    b.load_state_dict(a.state_dict(), strict=True)  # patched -> unpatched
    with torch.no_grad():
        assert _rel(b.encode_image(img), a.encode_image(img)) <= TOL
        assert _rel(b.encode_text(txt), a.encode_text(txt)) <= TOL
    c = _tiny_clip(seed=5)
    a.load_state_dict(c.state_dict(), strict=True)  # unpatched -> patched
    with torch.no_grad():
        assert _rel(a.encode_text(txt), c.encode_text(txt)) <= TOL
    # the drop-ins own the original parameter objects: one set of tensors, open_clip's names
    assert a.transformer.resblocks[0].attn.in_proj_weight is a.transformer.resblocks[0].attn._orig.in_proj_weight


def test_triton_backend_under_interpreter_matches():
    pytest.importorskip("triton")
    if not torch.cuda.is_available():
        import os

        if os.environ.get("TRITON_INTERPRET") != "1":
            pytest.skip("Triton on CPU needs TRITON_INTERPRET=1 (tests/conftest.py sets it)")
    torch.manual_seed(0)
    # exact GELU; one block per tower keeps the interpreter run short
    model = open_clip.CLIP(32, {**TINY_VISION, "layers": 1}, {**TINY_TEXT, "layers": 1}, quick_gelu=False)
    img, txt = _inputs(32, 77, seed=6)
    res = _compare(model, img, txt, backend="triton")
    _assert_match(res)
    assert res["report"].skipped == []


# ---------------------------------------------------------------- unsupported blocks, errors


def test_unsupported_blocks_left_alone_whole_and_reported(caplog):
    model = _tiny_custom(text=dict(qk_norm=True))
    model.visual.transformer.resblocks[1].mlp.gelu = nn.SiLU()  # unknown activation, one block
    before = {n: m for n, m in model.named_modules()}
    img, txt = _inputs(32, 77, seed=7)
    with torch.no_grad():
        ref = (model.encode_image(img), model.encode_text(txt))
    with caplog.at_level(logging.WARNING, logger="msclip_fast.integrations.open_clip"):
        out, rep = patch(model, backend="reference", return_report=True)
    assert out is model and rep is model._msclip_patch_report
    skipped = dict(rep.skipped)
    assert set(skipped) == {"visual.transformer.resblocks.1", "text.transformer.resblocks.0",
                            "text.transformer.resblocks.1"}
    assert "SiLU" in skipped["visual.transformer.resblocks.1"]
    assert "qk-norm" in skipped["text.transformer.resblocks.0"]
    for path in skipped:
        assert path in caplog.text
    # never half-patched: every child of a skipped block is the original object
    for path in skipped:
        for name in ("attn", "ln_1", "ln_2", "mlp"):
            assert model.get_submodule(f"{path}.{name}") is before[f"{path}.{name}"]
    assert isinstance(model.visual.transformer.resblocks[0].attn, DropInMultiheadAttention)
    assert isinstance(model.text.ln_final, DropInLayerNorm)
    with torch.no_grad():
        assert _rel(model.encode_image(img), ref[0]) <= TOL
        assert _rel(model.encode_text(txt), ref[1]) <= TOL
    unpatch(model)
    assert all(model.get_submodule(n) is m for n, m in before.items() if n)


def test_unsupported_attention_only_when_requested():
    """A qk-norm attention blocks only the attention part: with attention=False the same
    blocks take the LayerNorm and MLP drop-ins; a padding-masked text tower likewise."""
    model = _tiny_custom(text=dict(qk_norm=True))
    rep = patch(model, attention=False, backend="reference", return_report=True)[1]
    assert rep.skipped == []
    assert isinstance(model.text.transformer.resblocks[0].mlp, DropInMLP)
    assert type(model.text.transformer.resblocks[0].attn).__name__ == "Attention"

    masked = _tiny_custom(text=dict(embed_cls=True))  # CLS token: a padding/CLS additive mask
    rep = patch(masked, backend="reference", return_report=True)[1]
    assert {p for p, _ in rep.skipped} == {"text.transformer.resblocks.0", "text.transformer.resblocks.1"}
    assert all("not exactly causal" in r for _, r in rep.skipped)
    assert isinstance(masked.visual.transformer.resblocks[0].attn, DropInMultiheadAttention)


def test_errors_and_idempotence():
    model = _tiny_clip()
    with pytest.raises(TypeError, match="open_clip.CLIP"):
        patch(model.visual)
    with pytest.raises(ValueError, match="nonsense"):
        patch(model, backend="nonsense")
    with pytest.raises(ValueError, match="sdpa"):
        patch(model, backend="sdpa")  # only the attention op has it
    with pytest.raises(TypeError, match="backend"):
        patch(model, backend=3)
    assert not is_patched(model)
    patch(model, backend={"attention": "sdpa", "layer_norm": "reference", "mlp": "reference"})
    assert is_patched(model) and model.transformer.resblocks[0].attn.backend == "sdpa"
    with pytest.raises(RuntimeError, match="already patched"):
        patch(model)
    with pytest.raises(RuntimeError, match="already patched"):
        patch(copy.deepcopy(model))
    attn = model.transformer.resblocks[0].attn
    x = torch.randn(2, 77, 64)
    bad = torch.zeros(77, 77)
    bad[0, 5] = float("-inf")
    with pytest.raises(ValueError, match="causal mask"):
        attn(x, x, x, need_weights=False, attn_mask=bad)
    with pytest.raises(ValueError, match="key_padding_mask"):
        attn(x, x, x, need_weights=False, key_padding_mask=torch.zeros(2, 77, dtype=torch.bool))
    with pytest.raises(ValueError, match="need_weights"):
        attn(x, x, x)
    # the bool causal mask is accepted and equals the float one
    causal_bool = torch.ones(77, 77, dtype=torch.bool).triu_(1)
    with torch.no_grad():
        assert torch.equal(attn(x, x, x, need_weights=False, attn_mask=causal_bool)[0],
                           attn(x, x, x, need_weights=False, attn_mask=model.attn_mask)[0])
    unpatch(model)
    assert not is_patched(model) and not hasattr(model, "_msclip_patch_report")
    assert unpatch(model) is model  # not patched: unchanged


def test_dropin_mha_batch_first_false_and_mask_recheck():
    """Sequence-first nn.MultiheadAttention is handled too; a causal mask modified in place
    after its first (cached) check is checked again."""
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(64, 4, batch_first=False)
    x = torch.randn(9, 3, 64)  # (L, B, D)
    mask = torch.full((9, 9), float("-inf")).triu_(1)
    ref = mha(x, x, x, need_weights=False, attn_mask=mask)[0]
    d = DropInMultiheadAttention(mha, backend="reference")
    assert _rel(d(x, x, x, need_weights=False, attn_mask=mask)[0], ref) <= TOL
    assert _rel(d(x, need_weights=False)[0], mha(x, x, x, need_weights=False)[0]) <= TOL
    mask[3, 1] = float("-inf")
    with pytest.raises(ValueError, match="causal mask"):
        d(x, x, x, need_weights=False, attn_mask=mask)


def test_patched_with_grad_checkpointing_matches():
    model = _tiny_clip(seed=8)
    img, txt = _inputs(32, 77, seed=8)
    _, _, g0 = _run(model, img, txt)
    patch(model, backend="reference")
    model.set_grad_checkpointing(True)
    _, _, g1 = _run(model, img, txt)
    assert all(_rel(g1[n], g0[n]) <= TOL for n in g0 if g0[n] is not None)


def test_bf16_model_with_layernormfp32_matches():
    """A bf16 model as create_model(precision="bf16") builds it (LayerNormFp32, bf16 weights):
    outputs stay bf16 and match; both sides carry bf16 rounding (DESIGN §7 bf16: 1.6e-2 each)."""
    from open_clip.model import convert_weights_to_lp

    torch.manual_seed(9)
    model = open_clip.CLIP(32, dict(TINY_VISION), dict(TINY_TEXT), cast_dtype=torch.bfloat16)
    convert_weights_to_lp(model, torch.bfloat16)
    assert type(model.ln_final).__name__ == "LayerNormFp32"
    img, txt = _inputs(32, 77, seed=9)
    img = img.bfloat16()
    with torch.no_grad():
        ref = (model.encode_image(img), model.encode_text(txt))
        patch(model, backend="reference")
        out = (model.encode_image(img), model.encode_text(txt))
    assert model._msclip_patch_report.skipped == []
    for o, r in zip(out, ref):
        assert o.dtype == torch.bfloat16
        assert _rel(o.float(), r.float()) <= 2 * 1.6e-2
