"""Fixtures for training tests: real digits shards (make_shards) built once per session."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def digits_shards(tmp_path_factory) -> Path:
    """``OUT`` of ``python -m msclip_fast.data.make_shards --source digits --out OUT``."""
    out = tmp_path_factory.mktemp("digits")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-m", "msclip_fast.data.make_shards", "--source", "digits", "--out", str(out)],
                   check=True, env=env, capture_output=True, timeout=300)
    assert (out / "train").is_dir() and (out / "manifest.json").is_file()
    return out


def _train_args(shards: Path, out: Path, *extra: str, model: str = "msclip-tiny", batch: int = 8) -> list[str]:
    return ["--model", model, "--train-data", str(shards / "train"), "--batch-size", str(batch),
            "--warmup", "2", "--no-progress", "--output", str(out), *extra]


@pytest.fixture
def train_args():
    """``train_args(shards, out, *extra, model=, batch=)`` -> flags of a tiny CPU run."""
    return _train_args
