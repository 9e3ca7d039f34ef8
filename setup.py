"""Build script for msclip_fast.

``kernels/`` is installed under the import name ``msclip_fast.kernels``.  The C++/CUDA
extension ``msclip_fast._C`` is built from ``csrc/`` once it holds sources; the switch
``MSCLIP_FAST_BUILD_EXT=auto|0|1`` selects it (auto: build when a compiler exists).
"""
import os
from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).parent


def _ext_modules():
    mode = os.environ.get("MSCLIP_FAST_BUILD_EXT", "auto").lower()
    if mode not in ("auto", "0", "1"):
        raise ValueError(f"MSCLIP_FAST_BUILD_EXT must be auto, 0 or 1, got {mode!r}")
    sources = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "csrc").rglob("*.cpp"))
    if mode == "0" or not sources:
        if mode == "1" and not sources:
            raise RuntimeError("MSCLIP_FAST_BUILD_EXT=1 but csrc/ holds no C++ sources")
        return [], {}
    from torch.utils.cpp_extension import BuildExtension, CppExtension

    ext = CppExtension(
        "msclip_fast._C",
        sources,
        include_dirs=[str(ROOT / "csrc")],
        extra_compile_args=["-O3", "-std=c++20", "-fopenmp"],
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
