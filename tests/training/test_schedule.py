import math

import pytest
import torch

from msclip_fast.training.schedule import WarmupCosine, create_scheduler


def test_warmup_cosine_values():
    f = WarmupCosine(warmup=4, total=14)
    assert [f(s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert f(4) == 1.0
    assert f(9) == pytest.approx(0.5 * (1 + math.cos(math.pi * 5 / 10)))
    assert f(14) == pytest.approx(0.0, abs=1e-12)
    assert f(100) == pytest.approx(0.0, abs=1e-12)  # clamped past the end
    assert WarmupCosine(0, 10)(0) == 1.0


def test_scheduler_keeps_group_ratios():
    p1, p2 = torch.nn.Parameter(torch.zeros(1)), torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.AdamW([{"params": [p1], "lr": 1.0}, {"params": [p2], "lr": 0.1}])
    sched = create_scheduler(opt, warmup=2, total=10)
    seen = []
    for _ in range(10):
        seen.append([g["lr"] for g in opt.param_groups])
        opt.step()
        sched.step()
    assert seen[0] == pytest.approx([0.5, 0.05])
    assert seen[1] == pytest.approx([1.0, 0.1])
    for a, b in seen:
        assert b == pytest.approx(a / 10)
    # the state dict round-trips (resume)
    sched2 = create_scheduler(opt, warmup=2, total=10)
    sched2.load_state_dict(sched.state_dict())
    assert sched2.last_epoch == sched.last_epoch


def test_bad_values():
    with pytest.raises(ValueError, match="total"):
        WarmupCosine(1, 0)
    with pytest.raises(ValueError, match="warmup"):
        WarmupCosine(-1, 5)
