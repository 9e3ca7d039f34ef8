"""The execution plan (DESIGN §3): positions built from the config, one executor, and the
parallel attention option's grouped call."""
import pytest
import torch

from msclip_fast.models import create_model, get_model_config, list_models
from msclip_fast.models.plan import ExecutionPlan, Position
from msclip_fast.modules import IMAGE, TEXT, ModalityParallelAttention, PackedBatch

BOTH = (IMAGE, TEXT)


def test_msclip_s_plan():
    plan = ExecutionPlan.from_config(get_model_config("msclip-s-tiny"))
    # vision position 0 is the conv stem; text block 0 is text-only; blocks 1..3 shared, with
    # the lateral adapters 0, 1, 2 before them
    assert plan.positions == (
        Position(0, "text.blocks.0", (TEXT,)),
        Position(1, "blocks.1", BOTH, 0, True),
        Position(2, "blocks.2", BOTH, 1, True),
        Position(3, "blocks.3", BOTH, 2, True),
    )
    assert [p.index for p in plan.tower(IMAGE)] == [1, 2, 3]
    assert [p.index for p in plan.tower(TEXT)] == [0, 1, 2, 3]
    assert plan.packed_span() == (1, 4)


def test_clip_plan_has_two_towers_and_no_packed_span():
    plan = ExecutionPlan.from_config(get_model_config("clip-tiny"))
    assert [p.block for p in plan.tower(IMAGE)] == [f"visual.blocks.{i}" for i in range(4)]
    assert [p.block for p in plan.tower(TEXT)] == [f"text.blocks.{i}" for i in range(4)]
    assert plan.packed_span() is None
    with pytest.raises(ValueError, match="packed"):
        create_model("clip-tiny").forward_features(torch.randn(1, 3, 64, 64), torch.zeros(1, 77, dtype=torch.long),
                                                   packed=True)


def test_partial_share_range_and_attn_only_sharing():
    cfg = get_model_config("msclip-tiny").replace(share_layers=[1, 3])
    plan = ExecutionPlan.from_config(cfg)
    assert [(p.index, p.modalities) for p in plan.positions] == [
        (0, (IMAGE,)), (0, (TEXT,)), (1, BOTH), (2, BOTH), (3, (IMAGE,)), (3, (TEXT,))]
    assert plan.packed_span() == (2, 4)
    attn_only = ExecutionPlan.from_config(get_model_config("msclip-attn-tiny"))
    assert all(p.modalities == BOTH and not p.packable for p in attn_only.positions)
    assert attn_only.packed_span() is None


@pytest.mark.parametrize("name", list_models())
def test_plan_names_real_blocks_of_every_preset(name):
    with torch.device("meta"):
        model = create_model(name)
    for p in model.plan.positions:
        blk = model.get_submodule(p.block)
        assert set(p.modalities) <= set(blk.modalities)
    v = model.config.vision
    adapters = [p.adapter for p in model.plan.tower(IMAGE) if p.adapter is not None]
    assert adapters == (list(range(len(v.adapter_layers))) if v.parallel_branch else [])
    assert len(model.vision_blocks()) == v.layers - model.config.vision_first_block()
    assert len(model.text_blocks()) == model.config.text.layers


def test_parallel_attention_grouped_equals_per_modality():
    torch.manual_seed(0)
    pa = ModalityParallelAttention(16, 8, 2).double()
    with torch.no_grad():
        pa.out_weight.normal_()
    xi, xt = torch.randn(2, 5, 16, dtype=torch.float64), torch.randn(3, 4, 16, dtype=torch.float64)
    pack = PackedBatch.build(2, 5, 3, 4)
    out = pa.forward_grouped(pack.pack(xi, xt), pack.group_sizes, pack.cu_seqlens, pack.causal, pack.max_seqlen)
    a, b = pack.unpack(out)
    torch.testing.assert_close(a, pa(xi, 0, causal=False), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(b, pa(xt, 1, causal=True), rtol=1e-12, atol=1e-12)
    assert torch.count_nonzero(ModalityParallelAttention(16, 8, 2)(xi.float(), 0)) == 0  # adds 0 at init
    with pytest.raises(ValueError, match="divisible"):
        ModalityParallelAttention(16, 6, 4)
    with pytest.raises(ValueError, match="parallel_attn_heads"):
        get_model_config("msclip-tiny").replace(parallel_attn_dim=10, parallel_attn_heads=4)
    with pytest.raises(ValueError, match="needs shared layers"):
        get_model_config("clip-tiny").replace(parallel_attn_dim=8)
