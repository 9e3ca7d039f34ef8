"""Build script for msclip_fast.

``kernels/`` is installed under the import name ``msclip_fast.kernels``.  The C++/CUDA
extension ``msclip_fast._C`` is built from ``csrc/`` once it holds sources; the switch
``MSCLIP_FAST_BUILD_EXT=auto|0|1`` selects it (auto: build when a compiler exists); the CUDA
kernels join it when a CUDA torch, nvcc and a GPU exist (see ``_want_cuda``).
"""
import os
from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).parent


def _want_cuda(mode: str) -> tuple[bool, str]:
    """Whether to build the CUDA kernels (csrc/**/*.cu) into the extension, and why (not).

    Needs a CUDA build of torch and nvcc under CUDA_HOME, and either a visible GPU or an explicit
    ``MSCLIP_FAST_BUILD_EXT=1`` with ``CUDA_HOME`` set (building for a GPU elsewhere; on a
    CPU-only machine that also needs CPATH and TORCH_CUDA_ARCH_LIST, see ENVIRONMENT.md).
    ``MSCLIP_FAST_BUILD_CUDA=0`` forces a CPU-only extension.
    """
    if os.environ.get("MSCLIP_FAST_BUILD_CUDA", "auto").lower() == "0":
        return False, "MSCLIP_FAST_BUILD_CUDA=0"
    import torch
    from torch.utils.cpp_extension import CUDA_HOME

    if not torch.version.cuda:
        return False, "torch is a CPU-only build"
    if not CUDA_HOME or not (Path(CUDA_HOME) / "bin" / "nvcc").exists():
        return False, f"no nvcc under CUDA_HOME={CUDA_HOME!r}"
    if torch.cuda.is_available():
        return True, "CUDA device visible"
    if mode == "1" and os.environ.get("CUDA_HOME"):
        return True, "MSCLIP_FAST_BUILD_EXT=1 with CUDA_HOME set"
    return False, "no CUDA device (set MSCLIP_FAST_BUILD_EXT=1 and CUDA_HOME to build anyway)"


def _ext_modules():
    mode = os.environ.get("MSCLIP_FAST_BUILD_EXT", "auto").lower()
    if mode not in ("auto", "0", "1"):
        raise ValueError(f"MSCLIP_FAST_BUILD_EXT must be auto, 0 or 1, got {mode!r}")
    sources = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "csrc").rglob("*.cpp")
                     if "tests" not in p.relative_to(ROOT / "csrc").parts)
    if mode == "0" or not sources:
        if mode == "1" and not sources:
            raise RuntimeError("MSCLIP_FAST_BUILD_EXT=1 but csrc/ holds no C++ sources")
        return [], {}
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    # -fno-trapping-math: lets GCC turn the tile math's float selects into vector blends (no FP
    # exceptions are used anywhere); see csrc/common/tile_math.h
    # MSCLIP_FAST_CXX_OPT: the optimization level (default -O3; gpu_build.py's CPU dry run, which
    # only checks that the build works, uses -O0). No debug info unless MSCLIP_FAST_DEBUG=1:
    # Python's -g costs ~30 s per torch-including file, most of this build's time.
    opt = os.environ.get("MSCLIP_FAST_CXX_OPT", "-O3")
    if opt not in ("-O0", "-O1", "-O2", "-O3"):
        raise ValueError(f"MSCLIP_FAST_CXX_OPT must be -O0, -O1, -O2 or -O3, got {opt!r}")
    debug = os.environ.get("MSCLIP_FAST_DEBUG", "0") == "1"
    cxx = [opt, "-g" if debug else "-g0", "-std=c++20", "-fopenmp", "-fno-trapping-math"]
    use_cuda, why = _want_cuda(mode)
    print(f"msclip_fast._C: {'CUDA+CPU' if use_cuda else 'CPU-only'} build ({why})")
    if use_cuda:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
        cu = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "csrc").rglob("*.cu"))
        ext = CUDAExtension(
            "msclip_fast._C",
            sources + cu,
            include_dirs=[str(ROOT / "csrc")],
            extra_compile_args={
                "cxx": cxx + ["-DMSCLIP_FAST_WITH_CUDA"],
                "nvcc": ["-O3", "-std=c++17", "-DMSCLIP_FAST_WITH_CUDA"],
            },
            extra_link_args=["-fopenmp"],
        )
    else:
        ext = CppExtension(
            "msclip_fast._C",
            sources,
            include_dirs=[str(ROOT / "csrc")],
            extra_compile_args=cxx,
            extra_link_args=["-fopenmp"],
        )
    return [ext], {"build_ext": BuildExtension}


ext_modules, cmdclass = _ext_modules()

setup(
    name="msclip_fast",
    version="0.1.0",
    description="Custom-kernel training engine for modality-shared CLIP (MS-CLIP)",
    python_requires=">=3.10",
    packages=find_packages(include=["msclip_fast", "msclip_fast.*"]) + ["msclip_fast.kernels"],
    package_dir={"msclip_fast.kernels": "kernels"},
    package_data={"msclip_fast.models": ["configs/*.json"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
