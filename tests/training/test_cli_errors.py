"""What a user's mistake looks like at the command line: one ``error: ...`` line on stderr and
exit status 2, no traceback (msclip_fast/cli.py), for train.py and the index builder; a real bug
keeps its traceback. Most cases run in-process through ``run_cli(main, argv)``."""
import json
import logging
import math
import os
import socket
import subprocess
import sys
import tarfile
import warnings
from pathlib import Path

import pytest

from msclip_fast.cli import run_cli
from msclip_fast.data import index
from msclip_fast.models import list_models
from msclip_fast.training import main

REPO = Path(__file__).resolve().parents[2]
main_module = sys.modules["msclip_fast.training.main"]


def _error_line(capsys, *argv) -> str:
    """Runs train.py's main through run_cli; returns its one stderr line (status 2 checked)."""
    capsys.readouterr()
    assert run_cli(main, list(argv)) == 2
    out, err = capsys.readouterr()
    assert out == "" and "Traceback" not in err and err.count("\n") == 1 and err.startswith("error: "), err
    return err.rstrip("\n")


@pytest.fixture
def no_deepspeed(monkeypatch):
    """Any ``import deepspeed`` raises ImportError (not a user error: it would escape run_cli)."""
    monkeypatch.setitem(sys.modules, "deepspeed", None)


@pytest.mark.parametrize("flags, line", [
    (["--batch-size", "0"], "error: --batch-size must be >= 1, got 0"),
    (["--accum-steps", "-2"], "error: --accum-steps must be >= 1, got -2"),
    (["--lr", "-1"], "error: --lr must be >= 0, got -1.0"),
    (["--max-steps", "0"], "error: --max-steps must be >= 1, got 0"),
    (["--eval-every", "5"], "error: --eval-every 5 needs --val-data (the validation shards)"),
])
def test_bad_numbers(capsys, tmp_path, no_deepspeed, flags, line):
    # with a ds config: the flags are checked before DeepSpeed is imported
    assert _error_line(capsys, "--train-data", "x", "--output", str(tmp_path / "r"),
                       "--ds_config", str(REPO / "configs/ds/zero2.json"), *flags) == line


def test_unknown_model_lists_presets_before_deepspeed(capsys, tmp_path, no_deepspeed):
    line = _error_line(capsys, "--model", "msclip-tny", "--train-data", "x", "--output", str(tmp_path / "r"),
                       "--ds_config", str(REPO / "configs/ds/zero2.json"))
    assert line == f"error: --model 'msclip-tny' is not a preset; choose one of: {', '.join(list_models())}"


def test_missing_ds_config_names_flag_and_path(capsys, tmp_path, no_deepspeed):
    missing = str(tmp_path / "zero9.json")
    assert _error_line(capsys, "--train-data", "x", "--ds_config", missing) == \
        f"error: --ds_config {missing!r}: no such file"
    bad = tmp_path / "bad.json"
    bad.write_text('{"optimizer": {"type": "Adam"}}')
    assert "has a 'optimizer' section" in _error_line(capsys, "--train-data", "x", "--ds_config", str(bad))


def _fake_run(run: Path, model: str = "msclip-tiny") -> None:
    """A run dir whose latest checkpoint records ``model`` (what check_run_dir reads)."""
    ck = run / "checkpoints" / "step_00000002"
    ck.mkdir(parents=True)
    (ck / "meta.json").write_text(json.dumps({"step": 2, "model": model, "loss": "clip", "accum_mode": "exact"}))
    (run / "checkpoints" / "latest").write_text("step_00000002\n")


def test_missing_data_before_deepspeed(capsys, tmp_path, no_deepspeed):
    missing = str(tmp_path / "shards")
    ds = ["--ds_config", str(REPO / "configs/ds/zero2.json")]
    assert _error_line(capsys, "--train-data", missing, *ds) == \
        f"error: --train-data: shard pattern {missing!r} matches no files"
    (tmp_path / "shards").mkdir()
    assert _error_line(capsys, "--train-data", missing, *ds) == \
        f"error: --train-data: shard directory {missing!r} holds no .tar files"
    (tmp_path / "shards" / "000000.tar").touch()
    assert _error_line(capsys, "--train-data", missing, "--val-data", missing + "/val-{000..001}.tar", *ds) == \
        f"error: --val-data: shard pattern {missing + '/val-{000..001}.tar'!r} matches no files"


def test_run_dir_guards(capsys, tmp_path, no_deepspeed):
    run = tmp_path / "run"
    _fake_run(run)
    shards = tmp_path / "shards"
    shards.mkdir()
    (shards / "000000.tar").touch()  # exists: all the checks before the loader look at
    common = ["--train-data", str(shards), "--ds_config", str(REPO / "configs/ds/zero2.json")]
    assert _error_line(capsys, *common, "--output", str(run)) == (
        f"error: --output {run} already holds a run (checkpoints/latest); pass --resume {run} to continue it, "
        "or choose a new --output")
    ck = run / "checkpoints" / "step_00000002"
    assert _error_line(capsys, *common, "--output", str(run), "--resume", "auto", "--model", "msclip-all-tiny") == (
        f"error: checkpoint {ck} was trained with model='msclip-tiny', this run has model='msclip-all-tiny': "
        "resume with the same --model")
    assert "is neither a run dir" in _error_line(capsys, *common, "--resume", str(tmp_path / "none"))


def test_too_few_batches(capsys, digits_shards, tmp_path, train_args):
    line = _error_line(capsys, *train_args(digits_shards, tmp_path / "r", "--accum-steps", "100000", batch=4))
    assert line.startswith("error: --train-data ") and "fewer than --accum-steps 100000" in line
    assert "lower --batch-size or add data" in line


def test_debug_keeps_traceback_and_bugs_are_not_user_errors(monkeypatch, capsys):
    with pytest.raises(ValueError, match="--batch-size"):
        run_cli(main, ["--train-data", "x", "--batch-size", "0", "--debug"])
    monkeypatch.setenv("MSCLIP_FAST_DEBUG", "1")
    with pytest.raises(ValueError, match="--batch-size"):
        run_cli(main, ["--train-data", "x", "--batch-size", "0"])
    monkeypatch.delenv("MSCLIP_FAST_DEBUG")

    def bug(argv):
        raise RuntimeError("mat1 and mat2 shapes cannot be multiplied")

    with pytest.raises(RuntimeError, match="shapes"):
        run_cli(bug, [])
    assert capsys.readouterr().err == ""


def _small_val(digits_shards: Path, out: Path, samples: int = 8) -> Path:
    """The first ``samples`` samples of the digits val shard, as one shard of its own."""
    out.mkdir()
    with tarfile.open(next((digits_shards / "val").glob("*.tar"))) as src, \
            tarfile.open(out / "000000.tar", "w") as dst:
        keys = []
        for m in src.getmembers():
            key = m.name.split(".")[0]
            if key not in keys:
                if len(keys) == samples:
                    break
                keys.append(key)
            dst.addfile(m, src.extractfile(m))
    return out


def test_val_data_alone_evaluates_once_per_epoch(digits_shards, tmp_path, train_args, caplog):
    run = tmp_path / "r"
    val = _small_val(digits_shards, tmp_path / "val")
    with caplog.at_level(logging.INFO, logger="msclip_fast.training"):
        main(train_args(digits_shards, run, "--max-steps", "2", "--val-data", str(val), batch=4))
    assert "--val-data without --eval-every: validation loss every 2 steps (at the last step)" in caplog.text
    rows = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines() if l.strip()]
    assert [r["step"] for r in rows if "val_loss" in r] == [2]
    assert all(math.isfinite(r["val_loss"]) for r in rows if "val_loss" in r)
    assert json.loads((run / "args.json").read_text())["eval_every"] == 2


def test_dependency_noise_filtered_exactly():
    main_module.quiet_dependency_noise()
    main_module.quiet_dependency_noise()  # idempotent: one filter
    ext = logging.getLogger("torch.utils.cpp_extension")
    assert sum(isinstance(f, main_module._DropRecord) for f in ext.filters) == 1
    seen = []

    class Keep(logging.Handler):
        def emit(self, record):
            seen.append(record.getMessage())

    h = Keep()
    ext.addHandler(h)
    try:
        ext.warning("No CUDA runtime is found, using CUDA_HOME='%s'", "/usr/local")
        ext.warning("Error checking compiler version for %s", "c++")
    finally:
        ext.removeHandler(h)
    assert seen == ["Error checking compiler version for c++"]
    with warnings.catch_warnings(record=True) as w:
        main_module.quiet_dependency_noise()  # catch_warnings(record=True) reset the filters
        for msg in ("`torch.distributed.reduce_scatter_tensor` is deprecated. Please use ...",
                    "`torch.distributed.all_gather_into_tensor` is deprecated. Please use ..."):
            warnings.warn(msg, FutureWarning)
        warnings.warn("`torch.distributed.reduce_op` is deprecated", FutureWarning)
    assert [str(x.message) for x in w] == ["`torch.distributed.reduce_op` is deprecated"]


def test_index_cli_error_line(tmp_path, capsys):
    assert index.main([str(tmp_path / "nothing-here"), "--no-progress"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1 and err.startswith("error: ") and "nothing-here" in err


def test_train_py_subprocess_one_line():
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("MSCLIP_FAST_DEBUG", None)
    out = subprocess.run([sys.executable, "train.py", "--train-data", "x", "--batch-size", "0"], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=120)
    assert (out.returncode, out.stdout, out.stderr) == (2, "", "error: --batch-size must be >= 1, got 0\n")


@pytest.mark.slow
def test_unknown_model_under_launcher_one_line_fast(tmp_path):
    """2 CPU ranks: rank 0 prints the line, each rank exits 2, before DeepSpeed starts."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    env.pop("MSCLIP_FAST_DEBUG", None)
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port", str(port),
           "train.py", "--model", "msclip-tny", "--train-data", "x", "--output", str(tmp_path / "r"),
           "--ds_config", "configs/ds/zero2.json"]
    out = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    text = out.stdout + out.stderr
    assert out.returncode != 0, text
    assert [l for l in text.splitlines() if "error: " in l] == [
        f"error: --model 'msclip-tny' is not a preset; choose one of: {', '.join(list_models())}"], text
    assert "Traceback" not in text and "exits with return code = 2" in text, text
    assert "deepspeed_shm_comm_op" not in text and "No CUDA runtime" not in text, text  # never initialised
