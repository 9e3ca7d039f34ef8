"""MSCLIP forward/backward, pooling, masks, sharing identity, locking."""
import pytest
import torch

from msclip_fast.models import create_model, list_models

TINY = [n for n in list_models() if n.endswith("-tiny")]
EOT = 49407


def _tokens(b, lengths=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    tok = torch.zeros(b, 77, dtype=torch.int64)
    for i in range(b):
        n = lengths[i] if lengths else 5 + i
        tok[i, 0] = 49406
        tok[i, 1:n] = torch.randint(1, 49000, (n - 1,), generator=g)
        tok[i, n] = EOT
    return tok


@pytest.mark.parametrize("name", TINY)
def test_tiny_forward_backward(name):
    torch.manual_seed(0)
    model = create_model(name)
    images = torch.randn(2, 3, model.image_size, model.image_size)
    img, txt, scale = model(images, _tokens(3))
    E = model.embed_dim
    assert img.shape == (2, E) and txt.shape == (3, E) and scale.dim() == 0
    assert torch.allclose(img.norm(dim=-1), torch.ones(2)) and torch.allclose(txt.norm(dim=-1), torch.ones(3))
    assert torch.isclose(scale, torch.tensor(1 / 0.07))
    assert model.encode_image(images, normalize=False).shape == (2, E)
    logits = scale * img @ txt.T  # (2, 3)
    loss = -logits.log_softmax(-1).diagonal().mean() - logits.T[:2].log_softmax(-1).diagonal().mean()
    loss.backward()
    for n, p in model.named_parameters():
        assert p.grad is not None, f"{n} got no gradient"
        assert torch.isfinite(p.grad).all(), n
    assert model.context_length == 77 and len(model.image_mean) == 3 and len(model.image_std) == 3


@pytest.mark.parametrize("name", ["msclip-tiny", "msclip-attn-tiny", "msclip-mlp-tiny", "msclip-all-tiny",
                                  "msclip-s-tiny"])
def test_shared_tensors_are_one_object(name):
    model = create_model(name)
    names = model.shared_parameter_names()
    assert names
    vb, tb = model.vision_blocks(), model.text_blocks()
    cfg = model.config
    for i in cfg.shared_layer_ids():
        v, t = vb[i - model.visual.first_block], tb[i]
        assert v is t
        if "attn" in cfg.share:
            assert v.attn.in_proj_weight is t.attn.in_proj_weight
    ptrs = [p.data_ptr() for p in model.parameters()]
    assert len(ptrs) == len(set(ptrs))  # each tensor once
    params = dict(model.named_parameters())
    assert names <= set(params)
    for comp in ("attn", "mlp"):
        has = any(f".{comp}." in n for n in names)
        assert has == (comp in cfg.share)
    if "ln" not in cfg.share:
        assert params["blocks.1.ln_1.weight"].shape[0] == 2  # per-modality rows stacked


def test_clip_has_no_shared_params():
    model = create_model("clip-tiny")
    assert model.shared_parameter_names() == set() and len(model.blocks) == 0


def test_early_specialization_structure():
    model = create_model("msclip-s-tiny")
    assert "0" in model.text.blocks and "0" not in model.blocks and len(model.visual.blocks) == 0
    assert len(model.vision_blocks()) == 3 and len(model.text_blocks()) == 4
    assert len(model.visual.branch.adapters) == 3


def test_eot_pooling_picks_argmax_position():
    torch.manual_seed(0)
    model = create_model("msclip-tiny").eval()
    tok = _tokens(2, [6, 9])
    base = model.encode_text(tok, normalize=False)
    changed = tok.clone()
    changed[:, 20:] = 7  # tokens after EOT are never pooled (and causally invisible)
    assert torch.allclose(model.encode_text(changed, normalize=False), base)
    # the pooled row is the hidden state at the EOT position
    x = model.text.token_embedding(tok) + model.text.positional_embedding
    for blk in model.text_blocks():
        x = blk(x, 1, causal=True)
    want = model.text.ln_final(x[torch.arange(2), torch.tensor([6, 9])]) @ model.text.text_projection
    assert torch.allclose(base, want, atol=1e-6)


def test_text_causal_mask():
    torch.manual_seed(0)
    model = create_model("msclip-s-tiny").eval()
    tok = _tokens(1, [12])
    x = model.text.token_embedding(tok) + model.text.positional_embedding
    changed = tok.clone()
    changed[0, 8] = 123
    y = model.text.token_embedding(changed) + model.text.positional_embedding
    for blk in model.text_blocks():
        x, y = blk(x, 1, causal=True), blk(y, 1, causal=True)
    assert torch.allclose(x[:, :8], y[:, :8], atol=1e-6)
    assert not torch.allclose(x[:, 8:], y[:, 8:])


def test_vision_is_bidirectional():
    torch.manual_seed(0)
    model = create_model("msclip-tiny").eval()
    images = torch.randn(1, 3, 64, 64)
    changed = images.clone()
    changed[..., -8:, -8:] += 1  # the last patch changes the CLS output
    assert not torch.allclose(model.encode_image(images), model.encode_image(changed))


def test_logit_scale_clamp():
    model = create_model("clip-tiny")
    with torch.no_grad():
        model.logit_scale.fill_(10.0)
    _, _, scale = model(torch.randn(1, 3, 64, 64), _tokens(1))
    assert scale.item() == 100.0


def test_logit_bias_option():
    """SigLIP's learned logit bias: a 0-d parameter only when configured, returned by the forward
    as a 4th value (open_clip's convention), with a gradient and no weight decay."""
    import math

    import torch.nn.functional as F

    plain = create_model("clip-tiny")
    assert plain.logit_bias is None and "logit_bias" not in plain.state_dict()
    assert len(plain(torch.randn(1, 3, 64, 64), _tokens(1))) == 3
    model = create_model("clip-tiny", logit_scale_init=math.log(10), logit_bias_init=-10)
    assert isinstance(model.logit_bias, torch.nn.Parameter) and model.logit_bias.dim() == 0
    assert model.logit_bias.item() == -10.0 and model.state_dict()["logit_bias"].item() == -10.0
    img, txt, scale, bias = model(torch.randn(2, 3, 64, 64), _tokens(2))
    assert scale.item() == pytest.approx(10.0) and bias.dim() == 0 and bias.item() == -10.0
    z = 2 * torch.eye(2) - 1
    (-F.logsigmoid(z * (scale * img @ txt.T + bias)).sum() / 2).backward()
    assert model.logit_bias.grad is not None and model.logit_bias.grad.item() != 0.0
    assert "logit_bias" in model.no_weight_decay_names()


def test_wrong_image_size_raises():
    with pytest.raises(ValueError, match="token grid"):
        create_model("msclip-tiny").encode_image(torch.randn(1, 3, 96, 96))


@pytest.mark.parametrize("name", ["msclip-s-tiny", "msclip-attn-tiny"])
def test_lock_image_tower(name):
    model = create_model(name)
    model.lock_image_tower()
    params = dict(model.named_parameters())
    frozen = {n for n, p in params.items() if not p.requires_grad}
    assert all(n in frozen for n in params if n.startswith("visual."))
    assert all(n in frozen for n in model.shared_parameter_names())
    assert "text.token_embedding.weight" not in frozen and "text.text_projection" not in frozen
    if name == "msclip-attn-tiny":  # per-modality FFN of the text tower stays trainable
        assert "blocks.0.mlp.text.c_fc.weight" not in frozen and "blocks.0.mlp.image.c_fc.weight" in frozen
    model.train()
    bns = [m for m in model.visual.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert all(not m.training for m in bns)
    assert model.text.training
    # text still learns
    _, txt, _ = model(torch.randn(2, 3, 64, 64), _tokens(2))
    txt.sum().backward()
    assert model.text.token_embedding.weight.grad is not None


def test_lock_text_tower():
    model = create_model("msclip-tiny")
    model.lock_text_tower()
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert "text.token_embedding.weight" in frozen and "visual.proj" not in frozen
    assert "blocks.0.attn.in_proj_weight" in frozen


def test_no_weight_decay_names():
    model = create_model("msclip-s-tiny")
    nwd = model.no_weight_decay_names()
    for n in ["logit_scale", "visual.class_embedding", "visual.positional_embedding", "text.positional_embedding",
              "text.token_embedding.weight", "blocks.1.ln_1.weight", "blocks.1.attn.in_proj_bias",
              "visual.stem.bn1.weight", "visual.ln_post.weight"]:
        assert n in nwd, n
    for n in ["blocks.1.attn.in_proj_weight", "visual.proj", "text.text_projection", "visual.stem.conv1.weight"]:
        assert n not in nwd, n
    assert nwd <= {n for n, _ in model.named_parameters()}


def test_parallel_ffn_option():
    model = create_model("msclip-tiny", parallel_ffn_dim=16)
    assert model.blocks["0"].parallel_ffn.down_weight.shape == (2, 16, 128)
    img, txt, _ = model(torch.randn(2, 3, 64, 64), _tokens(2))
    (img.sum() + txt.sum()).backward()
    assert model.blocks["0"].parallel_ffn.up_weight.grad is not None
    assert not any("parallel_ffn" in n for n in model.shared_parameter_names())


def test_packed_flag_same_function():
    torch.manual_seed(0)
    a = create_model("msclip-tiny").eval()
    b = create_model("msclip-tiny", packed=False).eval()
    b.load_state_dict(a.state_dict())
    images, tok = torch.randn(2, 3, 64, 64), _tokens(2)
    # packed GEMMs run over more rows than per-tower ones, so BLAS may sum in another order:
    # same function, equal up to fp32 rounding (exact fp64 equality: tests/models/test_packed.py)
    for x, y in zip(a(images, tok), b(images, tok)):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6)
