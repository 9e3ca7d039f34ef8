"""msclip_fast.plot on hand-written run directories (no training: the rows are what
training/loop.py logs, the run files what training/main.py writes)."""
import json
import math
import subprocess
import sys

import pytest

from msclip_fast.plot import main, make_figure, read_run_info


def _run_dir(tmp_path, *, loss="clip", summary=True, args=True, batch=8, world=2, accum=1, mode="exact",
             val=True, tail=""):
    run = tmp_path / "run"
    run.mkdir()
    rows = []
    for s in range(1, 11):
        rows.append({"step": s, "epoch": 0, "loss": 3.0 - 0.1 * s, "lr": 1e-4 * s, "lr_share": 5e-5 * s,
                     "scale": 14.0 + s, "samples_per_s": 100.0 + s})
        if val and s % 5 == 0:
            rows.append({"step": s, "epoch": 0, "val_loss": 3.1 - 0.1 * s})
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + tail)
    contrastive = batch * world * (accum if mode == "exact" else 1)
    if args:
        (run / "args.json").write_text(json.dumps({"batch_size": batch, "world_size": world, "accum_steps": accum,
                                                   "accum_mode": mode, "loss": loss,
                                                   "contrastive_batch": contrastive}))
    if summary:
        (run / "summary.json").write_text(json.dumps({"status": "finished", "loss": loss,
                                                      "contrastive_batch": contrastive}))
    return run


def _loss_axis(fig):
    ax = fig.axes[0]
    assert ax.get_title() == "loss"
    return ax


def _labels(ax):
    return [line.get_label() for line in ax.lines]


def test_png_val_curve_labels_and_chance_line(tmp_path, capsys):
    run = _run_dir(tmp_path)
    png = main([str(run)])
    assert png == run / "curves.png" and png.stat().st_size > 1000
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert capsys.readouterr().out.strip() == str(png)

    fig = make_figure(run)
    try:
        assert all(ax.get_ylabel() for ax in fig.axes), [ax.get_ylabel() for ax in fig.axes]
        ax = _loss_axis(fig)
        labels = _labels(ax)
        val = ax.lines[labels.index("val_loss (held out)")]
        assert list(val.get_xdata()) == [5, 10]
        assert list(val.get_ydata()) == pytest.approx([2.6, 2.1])
        chance = [line for line in ax.lines if line.get_label().startswith("chance ln(16)")]
        assert len(chance) == 1 and list(chance[0].get_ydata()) == pytest.approx([math.log(16)] * 2)
        assert not [lb for lb in labels if lb.startswith("val chance")]  # same pairs per loss
        assert [t.get_text() for t in ax.get_legend().get_texts()] == labels
    finally:
        import matplotlib.pyplot as plt

        plt.close(fig)


def test_exact_accumulation_gets_a_val_chance_line_too(tmp_path):
    run = _run_dir(tmp_path, summary=False, batch=4, world=1, accum=4)  # a run still going: args.json only
    assert read_run_info(run) == {"loss": "clip", "contrastive_batch": 16, "val_batch": 4}
    fig = make_figure(run)
    labels = _labels(_loss_axis(fig))
    assert any(lb.startswith("chance ln(16)") for lb in labels)
    assert any(lb.startswith("val chance ln(4)") for lb in labels)


def test_siglip_says_chance_does_not_apply(tmp_path):
    fig = make_figure(_run_dir(tmp_path, loss="siglip"))
    ax = _loss_axis(fig)
    labels = _labels(ax)
    assert not [lb for lb in labels if "chance ln(" in lb]
    assert [lb for lb in labels if "does not apply" in lb]
    assert not [y for line in ax.lines for y in line.get_ydata() if y == pytest.approx(math.log(16))]


def test_no_run_files_no_val(tmp_path):
    """Metrics alone (an old run, or one without --val-data): curves, no chance line."""
    run = _run_dir(tmp_path, summary=False, args=False, val=False, tail='{"step": 11, "lo')
    fig = make_figure(run)
    assert _labels(_loss_axis(fig)) == ["loss"]  # the partial last line was skipped
    assert main([str(run)]).is_file()


def test_user_errors_are_one_line_exit_2(tmp_path):
    def cli(*args):
        return subprocess.run([sys.executable, "-m", "msclip_fast.plot", *args], capture_output=True, text=True,
                              timeout=120)

    r = cli(str(tmp_path / "nope"))
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [f"error: run dir {str(tmp_path / 'nope')!r} "
                                                                   "does not exist"]
    (tmp_path / "empty").mkdir()
    r = cli(str(tmp_path / "empty"))
    assert r.returncode == 2 and "has no metrics.jsonl" in r.stderr and "Traceback" not in r.stderr
    run = _run_dir(tmp_path)
    r = cli(str(run), "--out", str(tmp_path / "no" / "such" / "dir.png"))
    assert r.returncode == 2 and r.stderr.startswith("error: ") and len(r.stderr.strip().splitlines()) == 1
    r = cli(str(run))
    assert r.returncode == 0 and r.stdout.strip() == str(run / "curves.png")


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    import matplotlib.pyplot as plt

    plt.close("all")
