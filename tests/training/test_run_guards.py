"""Guards of train.py against silent misuse: overwriting a run, resuming another model, a
resume with nothing left to do, and the logged lr being the lr the step trained with."""
import json

import pytest

from msclip_fast.training import main


def _rows(run):
    return [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines() if l.strip()]


def test_logged_lr_is_the_lr_of_that_step(digits_shards, tmp_path, train_args):
    run = tmp_path / "lr"
    main(["--model", "msclip-tiny", "--train-data", str(digits_shards / "train"), "--batch-size", "4",
          "--warmup", "4", "--lr", "1e-3", "--max-steps", "3", "--log-every", "1", "--no-progress",
          "--output", str(run)])
    # warmup: step s (1-based) trains at lr * s / warmup
    assert [r["lr"] for r in _rows(run)] == pytest.approx([2.5e-4, 5e-4, 7.5e-4])


def test_existing_run_is_not_overwritten(digits_shards, tmp_path, train_args):
    run = tmp_path / "run"
    main(train_args(digits_shards, run, "--max-steps", "1", batch=4))
    before = (run / "metrics.jsonl").read_text()
    with pytest.raises(ValueError, match="already holds a run.*--resume"):
        main(train_args(digits_shards, run, "--max-steps", "1", batch=4))
    assert (run / "metrics.jsonl").read_text() == before


def test_resume_guards(digits_shards, tmp_path, train_args):
    run = tmp_path / "run"
    main(train_args(digits_shards, run, "--max-steps", "2", batch=4))
    with pytest.raises(ValueError, match="model='msclip-tiny'.*--model"):
        main(train_args(digits_shards, run, "--max-steps", "3", "--resume", str(run), model="msclip-all-tiny",
                        batch=4))
    with pytest.raises(ValueError, match="global_batch=4.*global_batch=8"):
        main(train_args(digits_shards, run, "--max-steps", "3", "--resume", str(run), batch=8))
    with pytest.raises(ValueError, match="at step 2, already at or past"):
        main(train_args(digits_shards, run, "--max-steps", "2", "--resume", str(run), batch=4))
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "finished" and summary["final_loss"] is not None
