"""Issue 2 acceptance: a tiny MS-CLIP trained for a few minutes on scikit-learn's digits
classifies held-out digits from text prompts alone (zero-shot) with >= 80% top-1."""
import pytest

from msclip_fast.data.make_shards import main as make_shards
from msclip_fast.eval import cli as eval_cli
from msclip_fast.training import main as train


@pytest.mark.slow  # ~2-4 min on 2 cores
def test_digits_zero_shot_top1_at_least_80_percent(tmp_path):
    data, run = tmp_path / "digits", tmp_path / "run"
    make_shards(["--source", "digits", "--out", str(data)])
    summary = train(["--model", "msclip-tiny", "--train-data", str(data / "train"), "--batch-size", "64",
                     "--epochs", "8", "--lr", "5e-4", "--warmup", "25", "--seed", "0",
                     "--output", str(run), "--no-progress"])
    assert summary["status"] == "finished"
    assert summary["final_loss"] < summary["first_loss"] - 1.0
    metrics = eval_cli.main(["zeroshot", "--checkpoint", str(run), "--data", str(data / "val"),
                             "--classes", "digits"])
    assert metrics["num_classes"] == 10 and metrics["n"] == 180
    assert metrics["top1"] >= 0.80, metrics
