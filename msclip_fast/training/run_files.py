"""The run directory's log files: ``metrics.jsonl`` (one JSON object per logged step) and
``summary.json``, written by rank 0 only."""
from __future__ import annotations

import json
import os
from pathlib import Path


class RunFiles:
    """``metrics.jsonl`` / ``summary.json`` of ``run_dir``; no-ops on ranks other than 0.

    A fresh run (``resume_step`` None) starts an empty metrics file; a resumed one drops the
    rows logged after the checkpoint it resumes from, so the file holds one curve.
    """

    def __init__(self, run_dir: Path, rank: int, resume_step: int | None):
        self.rank = rank
        self.run_dir = Path(run_dir)
        self.metrics = self.run_dir / "metrics.jsonl"
        if rank != 0:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if resume_step is None:
            self.metrics.write_text("")
        elif self.metrics.exists():
            rows = [l for l in self.metrics.read_text().splitlines() if l.strip()]
            keep = [l for l in rows if json.loads(l).get("step", 0) <= resume_step]
            self.metrics.write_text("".join(l + "\n" for l in keep))

    def log(self, row: dict) -> None:
        if self.rank == 0:
            with open(self.metrics, "a") as f:
                f.write(json.dumps(row) + "\n")

    def write_json(self, name: str, obj) -> None:
        """``run_dir/name`` replaced atomically (temp file + ``os.replace``)."""
        if self.rank == 0:
            tmp = self.run_dir / f".{name}.tmp"
            tmp.write_text(json.dumps(obj, indent=2, default=str))
            os.replace(tmp, self.run_dir / name)

    def summary(self, summary: dict) -> None:
        self.write_json("summary.json", summary)
