"""ModalityLayerNorm, MultiheadSelfAttention, MLP, ModalityParallelFFN, TransformerBlock."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from msclip_fast.modules import (
    MLP,
    ModalityLayerNorm,
    ModalityParallelFFN,
    MultiheadSelfAttention,
    TransformerBlock,
)


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def test_modality_layer_norm_picks_rows_per_modality():
    torch.manual_seed(0)
    ln = ModalityLayerNorm(16, 2)
    with torch.no_grad():
        ln.weight.normal_()
        ln.bias.normal_()
    x = torch.randn(3, 5, 16, dtype=torch.float64)
    ln = ln.double()
    for m in (0, 1):
        ref = F.layer_norm(x, (16,), ln.weight[m], ln.bias[m], eps=1e-12)
        assert _rel(ln(x, m), ref) < 1e-12
    ids = torch.randint(0, 2, (3, 5), dtype=torch.int8)
    out = ln(x, ids)
    for m in (0, 1):
        assert torch.allclose(out[ids == m], ln(x, m)[ids == m])
    with pytest.raises(ValueError, match="modality=2"):
        ln(x, 2)


def test_modality_layer_norm_single_row_ignores_modality_and_fp32_stats():
    ln = ModalityLayerNorm(8, 1)
    x = (torch.randn(4, 8) * 100 + 1000).bfloat16()
    a, b = ln(x, 1), ln(x, 0)
    assert a.dtype == torch.bfloat16 and torch.equal(a, b)
    ref = F.layer_norm(x.float(), (8,), eps=1e-12).bfloat16()
    assert torch.allclose(a.float(), ref.float(), atol=2e-2)
    out, s = ln(x, 0, residual=x)
    assert torch.equal(s, x + x)


def test_attention_matches_nn_multihead_attention():
    torch.manual_seed(0)
    D, H = 32, 4
    ours = MultiheadSelfAttention(D, H).double()
    ref = nn.MultiheadAttention(D, H, batch_first=True).double()
    ref.load_state_dict(ours.state_dict())
    x = torch.randn(2, 7, D, dtype=torch.float64)
    mask = torch.ones(7, 7, dtype=torch.bool).triu(1)
    for causal in (False, True):
        want = ref(x, x, x, need_weights=False, attn_mask=mask if causal else None)[0]
        assert _rel(ours(x, causal=causal), want) < 1e-12


def test_attention_packed_equals_batched():
    torch.manual_seed(0)
    attn = MultiheadSelfAttention(32, 4).double()
    a, b = torch.randn(1, 5, 32, dtype=torch.float64), torch.randn(1, 9, 32, dtype=torch.float64)
    packed = attn(torch.cat([a[0], b[0]]), cu_seqlens=torch.tensor([0, 5, 14], dtype=torch.int32),
                  causal=torch.tensor([False, True]))
    assert _rel(packed[:5], attn(a)[0]) < 1e-12
    assert _rel(packed[5:], attn(b, causal=True)[0]) < 1e-12
    with pytest.raises(ValueError, match="heads"):
        MultiheadSelfAttention(30, 4)


def test_mlp_quick_gelu():
    torch.manual_seed(0)
    mlp = MLP(8, 32).double()
    x = torch.randn(3, 8, dtype=torch.float64)
    h = mlp.c_fc(x)
    assert _rel(mlp(x), mlp.c_proj(h * torch.sigmoid(1.702 * h))) < 1e-12
    with pytest.raises(ValueError, match="act"):
        MLP(8, 32, act="relu")


def test_parallel_ffn_ids_match_int_and_start_at_zero():
    torch.manual_seed(0)
    ffn = ModalityParallelFFN(8, 4, 2).double()
    x = torch.randn(6, 8, dtype=torch.float64)
    assert torch.count_nonzero(ffn(x, 0)) == 0  # up projection starts at zero
    with torch.no_grad():
        ffn.up_weight.normal_()
    ids = torch.tensor([0, 1, 1, 0, 1, 0])
    out = ffn(x, ids)
    for m in (0, 1):
        assert torch.allclose(out[ids == m], ffn(x, m)[ids == m])


def test_block_sharing_structure():
    blk = TransformerBlock(32, 4, (0, 1), share=("attn",))
    assert isinstance(blk.attn, MultiheadSelfAttention)
    assert set(blk.mlp.keys()) == {"image", "text"}
    assert blk.ln_1.weight.shape == (2, 32)
    assert blk.shared_parameter_names() == {"attn.in_proj_weight", "attn.in_proj_bias",
                                            "attn.out_proj.weight", "attn.out_proj.bias"}
    all_shared = TransformerBlock(32, 4, (0, 1), share=("attn", "mlp", "ln"))
    assert all_shared.ln_2.weight.shape == (1, 32)
    assert len(all_shared.shared_parameter_names()) == len(list(all_shared.parameters()))
    text_only = TransformerBlock(32, 4, (1,))
    with pytest.raises(ValueError, match="modality 0"):
        text_only(torch.randn(1, 3, 32), 0)
    with pytest.raises(ValueError, match="share"):
        TransformerBlock(32, 4, (0, 1), share=("ffn",))


def test_block_matches_clip_residual_block():
    """A one-modality block equals open_clip's ResidualAttentionBlock (pre-LN, QuickGELU)."""
    open_clip_tf = pytest.importorskip("open_clip.transformer")
    torch.manual_seed(0)
    ours = TransformerBlock(32, 4, (1,), eps=1e-5).double()
    ref = open_clip_tf.ResidualAttentionBlock(32, 4, act_layer=open_clip_tf.QuickGELU, batch_first=True).double()
    sd = {k: (v[0] if k.startswith(("ln_1", "ln_2")) else v) for k, v in ours.state_dict().items()}
    ref.load_state_dict(sd)
    x = torch.randn(2, 6, 32, dtype=torch.float64)
    mask = torch.full((6, 6), float("-inf"), dtype=torch.float64).triu(1)
    assert _rel(ours(x, 1, causal=True), ref(x, attn_mask=mask)) < 1e-12
    assert _rel(ours(x, 1, causal=False), ref(x)) < 1e-12
