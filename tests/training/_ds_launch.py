"""Shared by the ZeRO tests: run the `deepspeed` launcher with 2 CPU ranks and read losses."""
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def launch(args: list[str], timeout: int = 300) -> float:
    """Run `deepspeed --num_gpus 2 train.py ARGS` on the CPU (2 gloo ranks); returns wall seconds."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port", str(port),
           "train.py", *args]
    t = time.time()
    try:
        out = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    finally:
        # DeepSpeed's CPU shared-memory all-reduce (deepspeed/ops/csrc/cpu/comm/shm.cpp) never
        # unlinks its 66 MB per-rank buffers: a day of test runs left 16 GB in /dev/shm
        for f in Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_*"):
            f.unlink(missing_ok=True)
    assert out.returncode == 0, (out.stdout + out.stderr)[-6000:]
    return time.time() - t


def losses(run: Path) -> list[float]:
    """The `loss` column of RUN/metrics.jsonl."""
    return [json.loads(l)["loss"] for l in (run / "metrics.jsonl").read_text().splitlines() if l.strip()]
