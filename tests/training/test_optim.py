import pytest

import msclip_fast as mf
from msclip_fast.training.optim import create_optimizer, param_groups
from msclip_fast.training.params import parse_args


@pytest.fixture(scope="module")
def model():
    return mf.create_model("msclip-tiny")


def test_groups_partition_trainable_params(model):
    groups = param_groups(model, lr=1e-3, wd=0.2, lr_share=5e-4, wd_share=0.1)
    by_name = {g["name"]: g for g in groups}
    assert set(by_name) <= {"decay", "no_decay", "shared_decay", "shared_no_decay"}
    names = [n for g in groups for n in g["param_names"]]
    assert len(names) == len(set(names))  # each tensor once
    assert set(names) == {n for n, p in model.named_parameters() if p.requires_grad}
    shared, no_wd = model.shared_parameter_names(), model.no_weight_decay_names()
    assert shared, "msclip-tiny shares weights"
    for g in groups:
        for n in g["param_names"]:
            assert (n in shared) == g["name"].startswith("shared")
            assert (n in no_wd) == g["name"].endswith("no_decay")
        assert g["lr"] == (5e-4 if g["name"].startswith("shared") else 1e-3)
        expected_wd = 0.0 if g["name"].endswith("no_decay") else (0.1 if g["name"].startswith("shared") else 0.2)
        assert g["weight_decay"] == expected_wd
    assert "logit_scale" in by_name["no_decay"]["param_names"]


def test_logit_bias_gets_no_weight_decay():
    m = mf.create_model("clip-tiny", logit_bias_init=-10.0)
    (group,) = [g for g in param_groups(m, 1e-3, 0.2, 1e-3, 0.2) if "logit_bias" in g["param_names"]]
    assert group["name"] == "no_decay" and group["weight_decay"] == 0.0


def test_locked_tower_is_left_out():
    m = mf.create_model("msclip-tiny")
    m.lock_image_tower()
    names = {n for g in param_groups(m, 1e-3, 0.2, 1e-3, 0.2) for n in g["param_names"]}
    assert names == {n for n, p in m.named_parameters() if p.requires_grad}
    assert not any(n in names for n in m.shared_parameter_names())  # shared ones are locked too


def test_create_optimizer_from_args(model, tmp_path):
    args = parse_args(["--train-data", str(tmp_path), "--lr", "1e-3", "--lr-share", "2e-4", "--wd", "0.3"])
    opt = create_optimizer(model, args)
    lrs = {g["name"]: (g["lr"], g["weight_decay"]) for g in opt.param_groups}
    assert lrs["shared_decay"] == (2e-4, 0.3)  # --wd-share defaults to --wd
    assert lrs["decay"] == (1e-3, 0.3)
    assert all("param_names" not in g for g in opt.param_groups)
