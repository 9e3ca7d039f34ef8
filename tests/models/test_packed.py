"""Packed execution (DESIGN §3): packed == per-tower (outputs and gradients, fp64), one varlen
attention call (with a host-side max_seqlen) and one modality-indexed LayerNorm call per shared
LN, no host syncs, refusal
for configs that cannot pack, and the PackedBatch / grouped parallel-FFN pieces."""
import pytest
import torch

from msclip_fast import ops
from msclip_fast.models import create_model
from msclip_fast.modules import ModalityParallelFFN, PackedBatch, TransformerBlock, text_lengths

EOT = 49407
N_IMG, N_TXT = 3, 5  # different batch sizes on purpose

# (preset, overrides): every tiny preset with attn+mlp sharing, the parallel FFN option, and
# partial share ranges (tower-only blocks before and after the shared blocks; an adapter
# before a tower-only block and before shared blocks).
CASES = [
    ("msclip-tiny", {}),
    ("msclip-all-tiny", {}),
    ("msclip-s-tiny", {}),
    ("msclip-s-tiny", {"parallel_ffn_dim": 16}),
    ("msclip-tiny", {"parallel_ffn_dim": 8, "share_layers": [1, 3]}),
    ("msclip-s-tiny", {"share_layers": [2, 3]}),
    ("msclip-pattn-tiny", {}),
    ("msclip-s-tiny", {"parallel_attn_dim": 16, "parallel_attn_heads": 2, "parallel_ffn_dim": 8}),
]
IDS = [n + "".join(f"-{k}={v}" for k, v in o.items()).replace(" ", "") for n, o in CASES]


def _tokens(b, seed=0):
    g = torch.Generator().manual_seed(seed)
    tok = torch.zeros(b, 77, dtype=torch.int64)
    for i in range(b):
        n = 3 + 4 * i
        tok[i, 0] = 49406
        tok[i, 1:n] = torch.randint(1, 49000, (n - 1,), generator=g)
        tok[i, n] = EOT
    return tok


def _perturb(model, seed=0):
    """Make per-modality rows differ (LNs init to 1/0 for both modalities, the parallel FFN's
    up projection to 0), so a modality mix-up in the packed path cannot go unnoticed."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if ".ln" in n or "parallel_" in n or n.startswith("ln"):
                p.add_(0.2 * torch.randn(p.shape, generator=g, dtype=p.dtype))


def _pair(name, overrides):
    torch.manual_seed(0)
    packed = create_model(name, **overrides).double()
    assert packed.config.packed is True
    _perturb(packed)
    plain = create_model(name, packed=False, **overrides).double()
    plain.load_state_dict(packed.state_dict())
    assert plain.config.packed is False
    return packed, plain


def _loss(model, images, tokens, wi, wt):
    img, txt, scale = model(images, tokens)
    return (img * wi).sum() + (txt * wt).sum() * scale / 10, (img, txt, scale)


@pytest.mark.parametrize("name,overrides", CASES, ids=IDS)
def test_packed_equals_per_tower_fp64(name, overrides):
    packed, plain = _pair(name, overrides)
    g = torch.Generator().manual_seed(1)
    images = torch.randn(N_IMG, 3, 64, 64, generator=g, dtype=torch.float64)
    tokens = _tokens(N_TXT)
    E = packed.embed_dim
    wi = torch.randn(N_IMG, E, generator=g, dtype=torch.float64)
    wt = torch.randn(N_TXT, E, generator=g, dtype=torch.float64)
    la, outs_a = _loss(packed, images, tokens, wi, wt)
    lb, outs_b = _loss(plain, images, tokens, wi, wt)
    assert outs_a[0].shape == (N_IMG, E) and outs_a[1].shape == (N_TXT, E)
    for a, b in zip(outs_a, outs_b):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    la.backward()
    lb.backward()
    pa, pb = dict(packed.named_parameters()), dict(plain.named_parameters())
    for n, p in pa.items():
        assert p.grad is not None and pb[n].grad is not None, n
        torch.testing.assert_close(p.grad, pb[n].grad, rtol=1e-10, atol=1e-12, msg=lambda m: f"{n}: {m}")
    # the per-modality rows really got different gradients (both modalities reached their own rows)
    ln = pa[f"blocks.{packed.config.share_layers[0]}.ln_1.weight"]
    if ln.shape[0] == 2:
        assert not torch.allclose(ln.grad[0], ln.grad[1])


def test_packed_fp32_close_to_per_tower():
    packed, plain = _pair("msclip-s-tiny", {})
    packed, plain = packed.float(), plain.float()
    images, tokens = torch.randn(N_IMG, 3, 64, 64), _tokens(N_TXT)
    for a, b in zip(packed(images, tokens), plain(images, tokens)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_encode_paths_stay_per_tower():
    packed, plain = _pair("msclip-tiny", {})
    images, tokens = torch.randn(2, 3, 64, 64, dtype=torch.float64), _tokens(N_TXT)
    torch.testing.assert_close(packed.encode_image(images), plain.encode_image(images), rtol=0, atol=0)
    torch.testing.assert_close(packed.encode_text(tokens), plain.encode_text(tokens), rtol=0, atol=0)
    img, txt = packed.forward_features(images, tokens)
    torch.testing.assert_close(img, packed.encode_image(images, normalize=False), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(txt, packed.encode_text(tokens, normalize=False), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("trim", [True, False], ids=["trimmed", "padded"])
@pytest.mark.parametrize("name", ["msclip-s-tiny", "msclip-tiny"])
def test_one_call_per_shared_op_and_no_host_sync(name, trim, monkeypatch):
    """On the meta device any host sync (.item(), .tolist(), bool(tensor), nonzero...) raises,
    so a packed forward that completes there reads nothing back from the device (given the
    host-side text lengths, as the loader hands them over). The attention op is replaced by a
    meta-safe stand-in that records its calls (the reference backend itself reads cu_seqlens
    on the host)."""
    model = create_model(name, parallel_ffn_dim=8, parallel_attn_dim=16, parallel_attn_heads=2,
                         trim_text=trim).to("meta")
    calls = {"varlen": [], "batched": 0, "ln_ids": 0}

    def fake_attention(q, k, v, cu_seqlens=None, causal=False, scale=None, max_seqlen=None, backend="auto"):
        if cu_seqlens is None:
            calls["batched"] += 1
            assert max_seqlen is None
        else:
            c = (tuple(causal.shape), causal.dtype) if isinstance(causal, torch.Tensor) else causal
            calls["varlen"].append((q.shape, cu_seqlens.shape, cu_seqlens.dtype, c, max_seqlen))
        return q * 1.0

    real_ln = ops.modality_layer_norm

    def counting_ln(x, weight, bias, modality_ids, **kw):
        if isinstance(modality_ids, torch.Tensor):
            calls["ln_ids"] += 1
            assert modality_ids.dtype == torch.int8 and modality_ids.shape == x.shape[:-1]
        return real_ln(x, weight, bias, modality_ids, **kw)

    monkeypatch.setattr(ops, "attention", fake_attention)
    monkeypatch.setattr(ops, "modality_layer_norm", counting_ln)
    images = torch.empty(N_IMG, 3, 64, 64, device="meta")
    tokens = torch.empty(N_TXT, 77, dtype=torch.int64, device="meta")
    lengths = text_lengths(_tokens(N_TXT))
    img, txt, scale = model(images, tokens, text_lengths=lengths)
    assert img.shape == (N_IMG, model.embed_dim) and txt.shape == (N_TXT, model.embed_dim)
    n_shared = len(model.blocks)
    L_img = model.config.grid_size**2 + 1
    text_rows = int(lengths.sum()) if trim else N_TXT * 77
    T = N_IMG * L_img + text_rows
    joint = [c for c in calls["varlen"] if c[0][0] == T]
    # the shared attention and the parallel attention: one varlen call each per shared block
    assert len(joint) == 2 * n_shared
    for q_shape, cu_shape, cu_dtype, c, max_seqlen in joint:
        assert cu_shape == (N_IMG + N_TXT + 1,) and cu_dtype == torch.int32
        assert c == ((N_IMG + N_TXT,), torch.bool)
        # the longest sequence comes from the host (no device read in the attention launcher)
        assert type(max_seqlen) is int and max_seqlen == max(L_img, int(lengths.max()) if trim else 77)
    # tower-only blocks (MS-CLIP-S text block 0): ragged text runs varlen, causal, at its own
    # lengths; images and padded text run batched
    n_text_only, n_vision_only = len(model.text.blocks), len(model.visual.blocks)
    text_only = [c for c in calls["varlen"] if c[0][0] == text_rows]
    assert len(text_only) == (n_text_only if trim else 0)
    for q_shape, cu_shape, cu_dtype, c, max_seqlen in text_only:
        assert cu_shape == (N_TXT + 1,) and c is True and max_seqlen == int(lengths.max())
    assert calls["batched"] == n_vision_only + (0 if trim else n_text_only)
    assert calls["ln_ids"] == 2 * n_shared  # ln_1 and ln_2 of each shared block, one call each


def test_packed_refused_without_attn_and_mlp_sharing():
    for name in ("msclip-attn-tiny", "msclip-mlp-tiny", "clip-tiny"):
        with pytest.raises(ValueError, match="packed"):
            create_model(name, packed=True)
        model = create_model(name)
        assert model.config.packed is False
        with pytest.raises(ValueError, match="packed"):
            model.forward_features(torch.randn(1, 3, 64, 64), _tokens(1), packed=True)
    blk = TransformerBlock(32, 4, (0, 1), share=("attn",))
    assert not blk.can_pack and not TransformerBlock(32, 4, (1,)).can_pack
    pack = PackedBatch.build(1, 3, 1, 2)
    with pytest.raises(ValueError, match="packed execution"):
        blk.forward_packed(torch.randn(5, 32), pack)


def test_packed_batch_layout():
    pack = PackedBatch.build(2, 3, 3, 4)
    assert pack.cu_seqlens.dtype == torch.int32 and pack.cu_seqlens.tolist() == [0, 3, 6, 10, 14, 18]
    assert pack.causal.tolist() == [False, False, True, True, True]
    assert pack.modality_ids.dtype == torch.int8 and pack.modality_ids.tolist() == [0] * 6 + [1] * 12
    assert pack.group_sizes == (6, 12) and pack.total_rows == 18
    assert type(pack.max_seqlen) is int and pack.max_seqlen == 4
    xi, xt = torch.randn(2, 3, 8), torch.randn(3, 4, 8)
    x = pack.pack(xi, xt)
    assert x.shape == (18, 8)
    a, b = pack.unpack(x)
    assert torch.equal(a, xi) and torch.equal(b, xt)
    with pytest.raises(ValueError, match="pack expects"):
        pack.pack(xt, xi)
    with pytest.raises(ValueError, match="num_images"):
        PackedBatch.build(-1, 3, 1, 4)
    with pytest.raises(ValueError, match="text_len"):
        PackedBatch.build(1, 3, 1, 0)
    only_text = PackedBatch.build(0, 3, 2, 4)
    assert only_text.cu_seqlens.tolist() == [0, 4, 8] and only_text.group_sizes == (0, 8)
    assert only_text.max_seqlen == 4  # (image_len does not count without images)
    assert PackedBatch.build(2, 50, 0, 77).max_seqlen == 50


def test_parallel_ffn_grouped_equals_per_row_ids():
    torch.manual_seed(0)
    ffn = ModalityParallelFFN(8, 4, 2).double()
    with torch.no_grad():
        ffn.up_weight.normal_()
    x = torch.randn(7, 8, dtype=torch.float64)
    ids = torch.tensor([0, 0, 0, 1, 1, 1, 1])
    torch.testing.assert_close(ffn.forward_grouped(x, (3, 4)), ffn(x, ids), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ffn.forward_grouped(x, (0, 7)), ffn(x, 1), rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="group_sizes"):
        ffn.forward_grouped(x, (3, 3))


def test_block_forward_packed_equals_per_modality():
    torch.manual_seed(0)
    blk = TransformerBlock(32, 4, (0, 1), share=("attn", "mlp"), parallel_ffn_dim=8, parallel_attn_dim=16,
                           parallel_attn_heads=2).double()
    _perturb(blk)
    with torch.no_grad():
        blk.ln_1.weight.add_(0.3 * torch.randn_like(blk.ln_1.weight))
    xi, xt = torch.randn(2, 5, 32, dtype=torch.float64), torch.randn(3, 7, 32, dtype=torch.float64)
    pack = PackedBatch.build(2, 5, 3, 7)
    x, y = blk.forward_packed(pack.pack(xi, xt), pack)
    a, b = pack.unpack(x + y)
    torch.testing.assert_close(a, blk(xi, 0, causal=False), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(b, blk(xt, 1, causal=True), rtol=1e-12, atol=1e-12)
    # a pending residual update is fused into ln_1 and equals adding it first
    d = torch.randn_like(x)
    x2, y2 = blk.forward_packed(x, pack, pending=d)
    x3, y3 = blk.forward_packed(x + d, pack)
    torch.testing.assert_close(x2 + y2, x3 + y3, rtol=1e-12, atol=1e-12)
