"""The build step of ``bench/gpu_check.sh``: check the toolchain, build ``msclip_fast._C``, import it.

Fails with one clear line (exit 3), not a traceback, when:
- torch is a CPU-only build, or no nvcc is found (``CUDA_HOME``, ``/usr/local/cuda``, ``PATH``);
- nvcc's CUDA major version differs from torch's (``torch.version.cuda``): the extension would
  not load against that torch;
- headers are missing: ``cuda_runtime.h`` under the toolkit, ``Python.h`` for this Python, or
  the cuBLAS/cuSPARSE headers torch's own headers include (taken from torch's ``nvidia`` wheels
  when the toolkit lacks them, as ENVIRONMENT.md describes).

It never calls pip (the device machine's Python may be externally managed): it runs
``setup.py build_ext --inplace`` in the checkout, which is imported from the tree through
``PYTHONPATH``. ``--dry-run`` (CPU): the same checks, then a CPU-only build into ``--out``
(the tree is left alone) whose module is loaded from there.

    python bench/gpu_build.py [--dry-run --out DIR]
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


class BuildError(RuntimeError):
    """A precondition of the build failed; the message says which and what to do."""


def find_nvcc() -> Path | None:
    for cand in (os.environ.get("CUDA_HOME"), "/usr/local/cuda"):
        if cand and (Path(cand) / "bin" / "nvcc").exists():
            return Path(cand) / "bin" / "nvcc"
    found = shutil.which("nvcc")
    return Path(found) if found else None


def nvcc_version(nvcc: Path) -> str:
    """``"13.0"`` from ``nvcc --version`` ("Cuda compilation tools, release 13.0, V13.0.48")."""
    out = subprocess.run([str(nvcc), "--version"], capture_output=True, text=True, timeout=60).stdout
    m = re.search(r"release (\d+)\.(\d+)", out)
    if not m:
        raise BuildError(f"cannot read the CUDA version from `{nvcc} --version`: {out.strip()[-200:]!r}")
    return f"{m.group(1)}.{m.group(2)}"


def check_versions(torch_cuda: str | None, nvcc_ver: str) -> None:
    """Raise BuildError unless torch is a CUDA build whose major version equals nvcc's."""
    if not torch_cuda:
        raise BuildError("torch is a CPU-only build (torch.version.cuda is None): install a CUDA torch")
    if torch_cuda.split(".")[0] != nvcc_ver.split(".")[0]:
        raise BuildError(f"nvcc is CUDA {nvcc_ver} but torch was built with CUDA {torch_cuda}: the CUDA "
                         f"major versions must match (set CUDA_HOME to a CUDA {torch_cuda.split('.')[0]}.x toolkit)")


def header_env(cuda_home: Path) -> dict[str, str]:
    """Environment additions for the build; raise BuildError naming a missing header."""
    env = {"CUDA_HOME": str(cuda_home)}
    if not (cuda_home / "include" / "cuda_runtime.h").exists():
        raise BuildError(f"cuda_runtime.h not found under {cuda_home / 'include'}: the CUDA toolkit is incomplete")
    py_inc = Path(sysconfig.get_paths()["include"])
    if not (py_inc / "Python.h").exists():
        raise BuildError(f"Python.h not found in {py_inc}: install this Python's development headers")
    if not (cuda_home / "include" / "cublas_v2.h").exists():
        extra = []
        spec = importlib.util.find_spec("nvidia")
        for base in (spec.submodule_search_locations or []) if spec else []:
            extra += [str(p) for p in Path(base).glob("*/include") if (p / "cublas_v2.h").exists()]
        if not extra:
            raise BuildError(f"cublas_v2.h is neither under {cuda_home / 'include'} nor in torch's nvidia wheels")
        env["CPATH"] = os.pathsep.join(extra + [p for p in [os.environ.get("CPATH")] if p])
    return env


def build(dry_run: bool, out: Path | None) -> int:
    import torch

    nvcc = find_nvcc()
    if nvcc is None:
        raise BuildError("nvcc not found (CUDA_HOME, /usr/local/cuda/bin, PATH): install the CUDA toolkit")
    ver = nvcc_version(nvcc)
    print(f"torch {torch.__version__} (CUDA {torch.version.cuda}), nvcc {ver} at {nvcc}")
    check_versions(torch.version.cuda, ver)
    env = {**os.environ, **header_env(nvcc.parent.parent)}
    if dry_run:
        env["MSCLIP_FAST_BUILD_CUDA"] = "0"  # no GPU here: the .cu files are compiled by make nvcc-check
        env["MSCLIP_FAST_BUILD_EXT"] = "1"
        env.setdefault("MSCLIP_FAST_CXX_OPT", "-O0")  # the dry run checks the build, nothing runs on it
        out = (out or ROOT / "build" / "gpu_check_dry_run").resolve()
        cmd = [sys.executable, "setup.py", "-q", "build_ext", "--build-lib", str(out / "lib"),
               "--build-temp", str(out / "tmp")]
    else:
        arch = "{}.{}".format(*torch.cuda.get_device_capability()) if torch.cuda.is_available() else "9.0"
        env.setdefault("TORCH_CUDA_ARCH_LIST", arch)  # one arch keeps the build short
        env.setdefault("MAX_JOBS", str(os.cpu_count() or 4))
        env["MSCLIP_FAST_BUILD_EXT"] = "1"
        cmd = [sys.executable, "setup.py", "-q", "build_ext", "--inplace"]
    print("+", " ".join(cmd), flush=True)
    rc = subprocess.run(cmd, cwd=ROOT, env=env).returncode
    if rc != 0:
        raise BuildError(f"setup.py build_ext failed (exit {rc}); the compiler output is above")
    if dry_run:
        so = sorted((out / "lib" / "msclip_fast").glob("_C*.so"))
        if not so:
            raise BuildError(f"the build wrote no msclip_fast/_C*.so under {out / 'lib'}")
        spec = importlib.util.spec_from_file_location("msclip_fast._C", so[0])
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
    else:
        import msclip_fast._C as mod
    print(f"extension {mod.__file__}: with_cuda={getattr(mod, 'with_cuda', None)}")
    if not dry_run and not getattr(mod, "with_cuda", False):
        raise BuildError("msclip_fast._C was built without CUDA (see the build log above)")
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dry-run", action="store_true")
    p.add_argument("--out", type=Path, default=None, help="dry run: build directory")
    a = p.parse_args(argv)
    try:
        return build(a.dry_run, a.out)
    except BuildError as e:
        print(f"BUILD ERROR: {e}", file=sys.stderr)
        return 3
    except ImportError as e:
        print(f"BUILD ERROR: the built extension does not import: {e}", file=sys.stderr)
        return 3


if __name__ == "__main__":
    sys.exit(main())
