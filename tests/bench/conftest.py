"""Shared by the bench/*.py smoke tests: the script under test loaded as a module, and the
check that a script's RESULTS.md section is replaced in place."""
import importlib.util
import sys
from pathlib import Path

import pytest

BENCH_DIR = Path(__file__).resolve().parents[2] / "bench"


@pytest.fixture(scope="module")
def bench(request):
    """The module ``bench/<BENCH_SCRIPT>.py``, where the test module sets ``BENCH_SCRIPT``."""
    name = request.module.BENCH_SCRIPT
    spec = importlib.util.spec_from_file_location(name, BENCH_DIR / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(mod)
    yield mod
    sys.modules.pop(spec.name, None)


@pytest.fixture
def check_section_replaced(bench, tmp_path):
    """``check(other)``: with RESULTS.md holding ``other`` (which has ``keep me`` in another
    section), write ``bench``'s section twice: the second write replaces the first in place."""

    def check(other: str) -> None:
        out = tmp_path / "RESULTS.md"
        out.write_text(other)
        bench.write_results(out, f"{bench.BEGIN}\nfirst\n{bench.END}\n")
        bench.write_results(out, f"{bench.BEGIN}\nsecond\n{bench.END}\n")
        text = out.read_text()
        assert "keep me" in text and "second" in text and "first" not in text
        assert text.count(bench.BEGIN) == 1

    return check
