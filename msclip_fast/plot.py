"""`python -m msclip_fast.plot RUN_DIR`: write RUN_DIR/curves.png from RUN_DIR/metrics.jsonl."""
from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

logger = logging.getLogger(__name__)

PANELS = (("loss", "loss"), ("lr", "learning rate"), ("scale", "exp(logit_scale)"), ("samples_per_s", "samples/s"))


def read_metrics(run_dir: str | Path) -> list[dict]:
    """Rows of ``run_dir/metrics.jsonl`` (ValueError when missing or empty)."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise ValueError(f"run dir {str(run_dir)!r} has no metrics.jsonl")
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    if not rows:
        raise ValueError(f"{path} is empty")
    return rows


def plot_run(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Plot loss (and val_loss when logged), lr (and lr_share), scale and throughput per step."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    rows = read_metrics(run_dir)
    out = Path(out) if out else Path(run_dir) / "curves.png"
    fig, axes = plt.subplots(2, 2, figsize=(10, 7))
    for ax, (key, title) in zip(axes.flat, PANELS):
        pts = [(r["step"], r[key]) for r in rows if r.get(key) is not None]
        if pts:
            ax.plot(*zip(*pts), label=key)
        if key == "loss":
            val = [(r["step"], r["val_loss"]) for r in rows if r.get("val_loss") is not None]
            if val:
                ax.plot(*zip(*val), "o-", label="val_loss")
        if key == "lr":
            sh = [(r["step"], r["lr_share"]) for r in rows if r.get("lr_share") is not None]
            if sh:
                ax.plot(*zip(*sh), "--", label="lr_share")
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=8)
    fig.suptitle(str(run_dir))
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def main(argv=None) -> Path:
    p = argparse.ArgumentParser(prog="python -m msclip_fast.plot", description=__doc__)
    p.add_argument("run_dir", help="a run directory holding metrics.jsonl")
    p.add_argument("--out", default=None, help="PNG path (default RUN_DIR/curves.png)")
    args = p.parse_args(argv)
    out = plot_run(args.run_dir, args.out)
    print(out)
    return out


if __name__ == "__main__":
    main()
