"""The gpu-marked test modules of the op layer import with torch and pytest alone (issue 7: the
device machine has no deepspeed, open_clip, DALI, webdataset or ftfy, and numpy/pillow are not
to be relied on; Triton is imported lazily, by the kernels, on first use). A module that fails
to import there fails the whole GPU step, so this is checked here, on the CPU, in a subprocess
that refuses those imports."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
MODULES = [
    "test_cuda_contrastive.py",
    "test_cuda_sigmoid.py",
    "test_sigmoid_triton.py",
    "test_ops_attention_sync.py",
    "test_ops_contrastive_scale.py",
    "test_ops_layer_norm_mixed.py",
]
BLOCKED = ("numpy", "PIL", "open_clip", "deepspeed", "ftfy", "webdataset", "nvidia", "triton", "regex")

SCRIPT = r"""
import importlib.abc, importlib.machinery, importlib.util, sys
BLOCKED = set(sys.argv[1].split(","))

class RefuseLoader(importlib.abc.Loader):
    def create_module(self, spec):
        return None

    def exec_module(self, module):
        raise ModuleNotFoundError(f"refused import of {module.__name__}", name=module.__name__)

class Refuse(importlib.abc.MetaPathFinder):
    # the module "exists" for importlib.util.find_spec (skip markers may ask), but importing it fails
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in BLOCKED:
            return importlib.machinery.ModuleSpec(name, RefuseLoader())
        return None

sys.meta_path.insert(0, Refuse())
import warnings
warnings.simplefilter("ignore")  # torch warns that NumPy is missing
sys.path.insert(0, sys.argv[2])
for path in sys.argv[3:]:
    spec = importlib.util.spec_from_file_location("m_" + path.rsplit("/", 1)[-1][:-3], path)
    spec.loader.exec_module(importlib.util.module_from_spec(spec))
    print("ok", path)
leaked = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)
assert not leaked, leaked
"""


@pytest.mark.parametrize("module", MODULES)
def test_gpu_test_module_imports_with_torch_and_pytest_only(module):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    env.pop("TRITON_INTERPRET", None)
    p = subprocess.run([sys.executable, "-c", SCRIPT, ",".join(BLOCKED), str(HERE), str(HERE / module)],
                       capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-4000:]
    assert f"ok {HERE / module}" in p.stdout
