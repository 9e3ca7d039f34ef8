"""Smoke test of bench/bench_data.py on tiny digits shards (make_shards --source digits --limit
80): 1-2 batches per measurement; the JSON follows the schema, both backends have rows (DALI's
are not_run where it is not importable), the report renders the file; without DALI the torch
rows still run, and without the GPU machine's missing packages everything is not_run, exit 0."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]  # as tests/bench/conftest.py (a module named conftest is ambiguous)
BENCH_DIR = ROOT / "bench"
BENCH_SCRIPT = "bench_data"  # the `bench` fixture (conftest.py) loads bench/bench_data.py
SMALL = ["--batch-size", "8", "--warmup", "1", "--batches", "2", "--repeats", "1"]

sys.path.insert(0, str(BENCH_DIR))
import report  # noqa: E402


def _dali() -> bool:
    try:
        import nvidia.dali  # noqa: F401
        from nvidia.dali.plugin.pytorch import DALIGenericIterator  # noqa: F401
    except Exception:
        return False
    return True


pytest.importorskip("PIL")
pytest.importorskip("sklearn")  # the digits source


@pytest.fixture(scope="module")
def digits_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("digits")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    subprocess.run([sys.executable, "-m", "msclip_fast.data.make_shards", "--source", "digits", "--out", str(out),
                    "--limit", "80", "--workers", "1"], check=True, cwd=ROOT, env=env, capture_output=True)
    return out


def test_make_shards_run_writes_json(bench, tmp_path, capsys):
    out = tmp_path / "data.json"
    doc = bench.main(["--make-shards", "80", "--source", "digits", "--threads", "2", *SMALL, "--json", str(out)])
    assert json.loads(out.read_text()) == doc
    report.validate(doc, str(out))
    assert doc["schema"] == 1 and doc["benchmark"] == "data" and doc["meta"]["device"] in ("cpu", "cuda")
    assert doc["status"] == "ok" and "failures" not in doc
    s = doc["settings"]
    assert s["shards"] == 1 and s["samples"] == 80 and s["threads"] == 2 and s["image_size"] == 224
    assert s["shard_image_size"] == 256 and s["make_shards_s"] > 0 and s["torch_decoder"] == "PIL"
    rows = {(r["backend"], r["mode"]): r for r in doc["rows"]}
    assert set(rows) == {(b, m) for b in ("torch", "dali") for m in ("train", "eval")}
    for m in ("train", "eval"):
        t = rows[("torch", m)]
        assert t["status"] == "ok" and t["images_per_s"] > 0 and t["images_timed"] == 16 and t["threads"] == 2
        assert len(t["runs_images_per_s"]) == 1 and t["startup_s"] > 0 and t["ratio"] is None
        d = rows[("dali", m)]
        if _dali():
            assert s["dali_version"] and s["dali_device"] in ("cpu", "mixed")
            assert d["status"] == "ok" and d["images_per_s"] > 0 and d["decoder"] == f"dali-{s['dali_device']}"
            assert d["ratio"] == pytest.approx(d["images_per_s"] / t["images_per_s"])
            assert doc["headline"][f"data_dali_vs_torch_images_per_s_{m}"] == pytest.approx(d["ratio"], rel=1e-2)
        else:
            assert d["status"] == "not_run" and "nvidia-dali is not importable" in d["reason"]
            assert "dali" in doc["not_run"]
    idx = {x["kind"]: x for x in doc["index"]}
    assert idx["trusted"]["status"] == idx["validating"]["status"] == "ok"
    for x in idx.values():
        assert x["shards"] == 1 and x["samples"] == 80 and x["good"] == 80 and x["seconds"] > 0
        assert x["samples_per_s"] == pytest.approx(80 / x["seconds"], rel=1e-6)
    assert doc["headline"]["data_index_build_samples_per_s"] == pytest.approx(idx["validating"]["samples_per_s"],
                                                                               rel=1e-3)
    printed = capsys.readouterr().out
    assert "### Input pipeline: DALI vs torch DataLoader" in printed and "| torch | train | PIL |" in printed
    # the report renders the file, with its chart
    md = report.render_doc(doc, source="data-cpu.json")
    assert "Index build, validating" in md and "Index build, trusted" in md and "ratio DALI/torch" in md
    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "data-cpu.json").write_text(out.read_text())
    assert report.main(["--results-dir", str(tmp_path / "results"), "--write", str(tmp_path / "R.md")]) == 0
    text = (tmp_path / "R.md").read_text()
    assert "Input pipeline: DALI vs torch DataLoader (CPU, 2 threads)" in text or doc["meta"]["device"] == "cuda"
    if report._plt() is not None:
        assert (tmp_path / "charts" / "data-cpu.png").stat().st_size > 1000


def test_data_dir_rebuilds_a_validated_index(bench, digits_dir, capsys):
    doc = bench.main(["--data", str(digits_dir), "--threads", "1", "--modes", "eval", *SMALL])
    assert doc["settings"]["shards"] == 2 and doc["settings"]["samples"] == 80  # train/ and val/
    idx = {x["kind"]: x for x in doc["index"]}
    assert idx["trusted"]["status"] == "not_run" and "make_shards" in idx["trusted"]["reason"]
    assert idx["validating"]["status"] == "ok" and idx["validating"]["samples"] == 80
    for tar in (digits_dir / "train" / "000000.tar", digits_dir / "val" / "000000.tar"):
        assert json.loads(tar.with_suffix(".idx.json").read_text())["trusted"] is False  # validated, in place
    assert [(r["backend"], r["mode"]) for r in doc["rows"]] == [("torch", "eval"), ("dali", "eval")]
    assert "Not run: index trusted" in report.render_doc(doc)


def _run(args, env_extra, tmp_path):
    env = {**os.environ, **env_extra}
    return subprocess.run([sys.executable, str(BENCH_DIR / "bench_data.py"), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)


def test_without_dali_the_torch_rows_still_run(digits_dir, tmp_path, import_blocker):
    out = tmp_path / "nodali.json"
    p = _run(["--data", str(digits_dir), "--threads", "1", "--modes", "train", *SMALL, "--json", str(out)],
             {"PYTHONPATH": str(import_blocker(("nvidia.dali", "webdataset"))) + os.pathsep + str(ROOT)}, tmp_path)
    assert p.returncode == 0, p.stderr[-2000:]
    doc = report.validate(json.loads(out.read_text()))
    rows = {r["backend"]: r for r in doc["rows"]}
    assert rows["torch"]["status"] == "ok" and rows["torch"]["images_per_s"] > 0  # no webdataset needed
    assert rows["dali"]["status"] == "not_run" and "nvidia-dali is not importable" in rows["dali"]["reason"]
    assert doc["settings"]["dali_version"] is None and "dali" in doc["not_run"]
    assert set(doc["headline"]) == {"data_torch_images_per_s_train", "data_index_build_samples_per_s"}
    assert "Not run: dali: nvidia-dali is not importable" in report.render_doc(doc)


def test_gpu_machine_packages_missing_is_not_run_not_failure(without_gpu_machine_packages, tmp_path):
    out = tmp_path / "gpu.json"
    p = _run(["--make-shards", "80", "--source", "digits", *SMALL, "--json", str(out)],
             {"PYTHONPATH": str(without_gpu_machine_packages) + os.pathsep + str(ROOT)}, tmp_path)
    assert p.returncode == 0, p.stderr[-2000:]
    doc = report.validate(json.loads(out.read_text()))
    assert doc["status"] == "ok" and doc["headline"] == {}
    assert {r["status"] for r in doc["rows"]} == {"not_run"} and len(doc["rows"]) == 4
    assert "Pillow is not installed" in doc["not_run"]["all"] and "nvidia-dali" in doc["not_run"]["dali"]
    assert {x["status"] for x in doc["index"]} == {"not_run"}
    md = report.render_doc(doc)
    assert "Not run: everything: Pillow is not installed" in md and "| torch | train | PIL | not run |" in md
    assert md.count("Pillow is not installed") == 1 and md.count("nvidia-dali is not importable") == 1
