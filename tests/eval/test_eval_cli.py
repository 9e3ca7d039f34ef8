"""End to end: digits shards from make_shards + a randomly initialized tiny model saved in the
checkpoint layout -> `python -m msclip_fast.eval ...` prints one JSON line of metrics."""
import json
import os
import subprocess
import sys

import pytest

from msclip_fast.eval import cli

ZS_METRICS = ("top1", "top5", "balanced_top1", "chance_top1", "chance_top5", "chance_balanced", "majority_rate")


def _run(args, timeout=180):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=timeout, env=env)


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    out = tmp_path_factory.mktemp("digits")
    r = _run(["-m", "msclip_fast.data.make_shards", "--source", "digits", "--out", str(out),
              "--limit", "240", "--val-fraction", "0.25", "--workers", "1"])
    assert r.returncode == 0, r.stderr[-2000:]
    return out


def _last_json(stdout: str) -> dict:
    lines = [ln for ln in stdout.strip().splitlines() if ln.strip()]
    assert lines, "no stdout"
    return json.loads(lines[-1])


@pytest.mark.slow  # two interpreter start-ups (make_shards, eval): ~20 s on 2 busy cores
def test_zeroshot_module_cli(digits, run_dir):
    r = _run(["-m", "msclip_fast.eval", "zeroshot", "--checkpoint", str(run_dir), "--data", str(digits),
              "--classes", "digits", "--batch-size", "32"])
    assert r.returncode == 0, r.stderr[-2000:]
    m = _last_json(r.stdout)
    for k in ZS_METRICS:
        assert 0.0 <= m[k] <= 1.0, (k, m[k])
    assert m["num_classes"] == 10 and m["chance_top1"] == pytest.approx(0.1)
    assert m["n"] > 0 and m["skipped"] == {}


def test_retrieval_cli_in_process(digits, run_dir, capsys):
    ckpt = run_dir / "checkpoints" / "step_00000000"  # a checkpoint dir works too
    m = cli.main(["retrieval", "--checkpoint", str(ckpt), "--data", str(digits / "val"), "--batch-size", "64"])
    printed = _last_json(capsys.readouterr().out)
    assert printed == pytest.approx(m)
    for d in ("i2t", "t2i"):
        for k in (1, 5, 10):
            for suffix in ("", "_dedup"):
                assert 0.0 <= m[f"{d}_r{k}{suffix}"] <= 1.0
    for k in (1, 5, 10):
        assert m[f"chance_r{k}"] == pytest.approx(k / m["n"])
    # digits captions come from a few templates: many duplicates, so dedup recall >= plain
    assert m["n_unique_captions"] < m["n"]
    assert m["i2t_r10_dedup"] >= m["i2t_r10"] and m["t2i_r10_dedup"] >= m["t2i_r10"]


def test_cli_help_and_errors(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["--help"])
    assert e.value.code == 0
    assert "zeroshot" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        cli.main(["zeroshot", "--data", "x", "--classes", "digits"])  # --checkpoint missing
    assert cli.cli(["zeroshot", "--checkpoint", str(tmp_path / "nope"), "--data", str(tmp_path),
                    "--classes", "digits"]) == 2
    assert "error:" in capsys.readouterr().err
    assert cli.cli(["retrieval", "--checkpoint", "x", "--data", "x", "--batch-size", "0"]) == 2
