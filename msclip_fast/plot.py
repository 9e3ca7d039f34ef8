"""`python -m msclip_fast.plot RUN_DIR`: write RUN_DIR/curves.png from RUN_DIR/metrics.jsonl.

Panels: training loss with the held-out loss (``val_loss``, logged when training ran with
``--val-data`` and ``--eval-every``) and the chance level ln(N) of the CLIP loss, N being the
pairs one loss sees (read from the run's summary.json or args.json); learning rate (and the
shared weights' lr_share); exp(logit_scale); throughput.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from pathlib import Path

from .cli import run_cli

logger = logging.getLogger(__name__)

# (metrics key, panel title, y-axis label)
PANELS = (("loss", "loss", "loss (nats)"), ("lr", "learning rate", "learning rate"),
          ("scale", "exp(logit_scale)", "exp(logit_scale)"), ("samples_per_s", "throughput", "samples/s"))


def read_metrics(run_dir: str | Path) -> list[dict]:
    """Rows of ``run_dir/metrics.jsonl`` (ValueError when missing or empty).

    A run killed while writing leaves a partial last line: it is skipped with a warning, so
    the curves of a crashed run can still be looked at; a bad line elsewhere is an error.
    """
    path = Path(run_dir) / "metrics.jsonl"
    if not Path(run_dir).is_dir():
        raise ValueError(f"run dir {str(run_dir)!r} does not exist")
    if not path.is_file():
        raise ValueError(f"run dir {str(run_dir)!r} has no metrics.jsonl")
    lines = [(i, line) for i, line in enumerate(path.read_text().splitlines(), 1) if line.strip()]
    rows = []
    for k, (i, line) in enumerate(lines):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as e:
            if k == len(lines) - 1:
                logger.warning("%s:%d: skipping a partial last line (%s)", path, i, e)
                continue
            raise ValueError(f"{path}:{i} is not JSON ({e})") from None
    if not rows:
        raise ValueError(f"{path} is empty")
    return rows


def read_run_info(run_dir: str | Path) -> dict:
    """What the chance line needs: ``loss`` ("clip"/"siglip"), ``contrastive_batch`` (pairs per
    training loss) and ``val_batch`` (pairs per held-out loss: one micro-batch over all ranks,
    no accumulation). summary.json is written when a run ends, args.json when it starts, so a
    run still going has only the latter. Missing values are None."""
    info: dict = {}
    for name in ("summary.json", "args.json"):  # the first file holding a key wins
        p = Path(run_dir) / name
        try:
            d = json.loads(p.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        for k, v in d.items():
            info.setdefault(k, v)
    val_batch = None
    if isinstance(info.get("batch_size"), int) and isinstance(info.get("world_size"), int):
        val_batch = info["batch_size"] * info["world_size"]
    return {"loss": info.get("loss"), "contrastive_batch": info.get("contrastive_batch"), "val_batch": val_batch}


def _chance_lines(ax, info: dict, has_val: bool) -> None:
    if info["loss"] == "siglip":
        # the sigmoid loss is a sum of per-pair binary terms, not a softmax over N: no ln(N) level
        ax.plot([], [], " ", label="sigmoid (siglip) loss: ln(N) chance line does not apply")
        return
    n = info["contrastive_batch"]
    if not isinstance(n, int) or n < 2:
        return
    ax.axhline(math.log(n), color="gray", ls=":", lw=1.2, label=f"chance ln({n}) = {math.log(n):.2f}")
    m = info["val_batch"]
    if has_val and isinstance(m, int) and m >= 2 and m != n:
        # exact accumulation trains on more pairs per loss than a held-out micro-batch holds
        ax.axhline(math.log(m), color="tab:orange", ls=":", lw=1.2, label=f"val chance ln({m}) = {math.log(m):.2f}")


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only, no display (before pyplot picks an interactive one)
    import matplotlib.pyplot as plt

    return plt


def make_figure(run_dir: str | Path):
    """The 2x2 matplotlib Figure of ``run_dir``'s curves (the caller closes it)."""
    plt = _pyplot()
    rows = read_metrics(run_dir)
    info = read_run_info(run_dir)
    fig, axes = plt.subplots(2, 2, figsize=(10, 7))
    for ax, (key, title, ylabel) in zip(axes.flat, PANELS):
        pts = [(r["step"], r[key]) for r in rows if r.get(key) is not None]
        if pts:
            ax.plot(*zip(*pts), label=key)
        if key == "loss":
            val = [(r["step"], r["val_loss"]) for r in rows if r.get("val_loss") is not None]
            if val:
                ax.plot(*zip(*val), "o-", label="val_loss (held out)")
            _chance_lines(ax, info, bool(val))
        if key == "lr":
            sh = [(r["step"], r["lr_share"]) for r in rows if r.get("lr_share") is not None]
            if sh:
                ax.plot(*zip(*sh), "--", label="lr_share")
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=8)
    fig.suptitle(str(run_dir))
    fig.tight_layout()
    return fig


def plot_run(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Write the curves of ``run_dir`` to ``out`` (default ``run_dir/curves.png``); returns its path."""
    out = Path(out) if out else Path(run_dir) / "curves.png"
    fig = make_figure(run_dir)
    try:
        fig.savefig(out, dpi=100)
    finally:
        _pyplot().close(fig)
    return out


def main(argv=None) -> Path:
    p = argparse.ArgumentParser(prog="python -m msclip_fast.plot", description=__doc__.split("\n\n")[0])
    p.add_argument("run_dir", help="a run directory holding metrics.jsonl")
    p.add_argument("--out", default=None, help="PNG path (default RUN_DIR/curves.png)")
    args = p.parse_args(argv)
    out = plot_run(args.run_dir, args.out)
    print(out)
    return out


if __name__ == "__main__":
    sys.exit(run_cli(main))
