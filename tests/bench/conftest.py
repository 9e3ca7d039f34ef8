"""Shared by the bench/*.py tests: the script under test loaded as a module, a results
document builder for report tests, and a Python that cannot import the packages the GPU
machine lacks."""
import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BENCH_DIR = ROOT / "bench"

# What the device machine lacks (DESIGN §8): the bench scripts must run without them.
MISSING_ON_GPU_MACHINE = ("open_clip", "deepspeed", "nvidia.dali", "webdataset", "PIL", "matplotlib",
                          "torchvision", "ftfy")

_BLOCKER = '''
import sys
BLOCKED = {blocked!r}

class _Blocker:
    """Import finder that makes the blocked packages look uninstalled."""
    def find_spec(self, name, path=None, target=None):
        if any(name == b or name.startswith(b + ".") for b in BLOCKED):
            raise ModuleNotFoundError(f"No module named {{name!r}} (blocked by the bench tests)", name=name)
        return None

sys.meta_path.insert(0, _Blocker())
'''


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


def write_blocker(d: Path, blocked) -> Path:
    """Make ``d`` a PYTHONPATH entry whose sitecustomize.py makes ``blocked`` unimportable,
    in the process and in every child it starts; returns ``d``."""
    d.mkdir(parents=True, exist_ok=True)
    (d / "sitecustomize.py").write_text(_BLOCKER.format(blocked=tuple(blocked)))
    return d


@pytest.fixture
def import_blocker(tmp_path):
    """``import_blocker(("pkg", ...))`` -> a PYTHONPATH entry (see :func:`write_blocker`)."""
    return lambda blocked: write_blocker(tmp_path / "blocker_custom", blocked)


@pytest.fixture
def without_gpu_machine_packages(tmp_path):
    """A PYTHONPATH entry that makes the packages the GPU machine lacks unimportable."""
    return write_blocker(tmp_path / "blocker", MISSING_ON_GPU_MACHINE)
