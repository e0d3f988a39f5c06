"""Builds the optional C++/CUDA extension ``advcal._C`` and maps ``kernels/`` to ``advcal.kernels``.

Knobs (environment):
  ADVCAL_BUILD_EXT=0        skip the extension entirely (pure Python install)
  ADVCAL_BUILD_CUDA=auto|0|1  CUDA sources: auto = when torch has CUDA and nvcc is found
  TORCH_CUDA_ARCH_LIST      defaults to "8.0;9.0" (A100, H100/H200)
Install with ``pip install --no-build-isolation -e .`` so the build uses the installed torch.
"""

import os
import shutil
import sys
from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).parent
# every advcal.* package with an __init__.py, the data folders of the tokenizer vocabulary and
# of the benchmarks' class names and templates, and
# kernels/ installed as advcal.kernels (tests/test_packaging.py checks the list is complete)
PACKAGES = [
    *find_packages(include=["advcal", "advcal.*"]),
    "advcal.backbones.assets",
    "advcal.data.assets",
    "advcal.kernels",
]
PACKAGE_DIR = {"advcal": "advcal", "advcal.kernels": "kernels"}


def _extensions():
    # validated first, so a typo fails every build, not only those that reach the CUDA choice
    want = os.environ.get("ADVCAL_BUILD_CUDA", "auto").strip().lower() or "auto"
    if want not in ("auto", "0", "1"):
        raise ValueError(
            f"ADVCAL_BUILD_CUDA={os.environ['ADVCAL_BUILD_CUDA']!r} is not a valid value; "
            "use auto (CUDA sources when torch has CUDA and nvcc is found), 0 (CPU only) "
            "or 1 (CUDA required)"
        )
    if os.environ.get("ADVCAL_BUILD_EXT", "1") == "0":
        return [], {}
    cpp = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "csrc").glob("*.cpp"))
    if not cpp:
        return [], {}
    try:
        import torch
        from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension
    except ImportError:
        print("advcal: torch not importable at build time; building without advcal._C")
        return [], {}

    nvcc = shutil.which("nvcc") or (
        os.environ.get("CUDA_HOME") and Path(os.environ["CUDA_HOME"], "bin", "nvcc").exists()
    )
    has_cuda = torch.version.cuda is not None and bool(nvcc)
    if want == "1" and not has_cuda:
        raise RuntimeError(
            "ADVCAL_BUILD_CUDA=1 but torch has no CUDA or nvcc is not found "
            f"(torch.version.cuda={torch.version.cuda}, nvcc={nvcc})"
        )
    use_cuda = has_cuda and want != "0"
    # -ffp-contract=off: no fused multiply-adds the reference's separate ops don't make, so the
    # fp32 kernels are bit-identical to advcal.ops.*_ref (see csrc/pgd_step.cpp).
    cxx = ["-O3", "-std=c++17", "-ffp-contract=off"]
    # -fopenmp: ATen's parallel_for is inline in its headers and runs on torch's OpenMP pool
    # (the libgomp torch ships, same soname) only when the including file is compiled with it;
    # without it csrc/pgd_step.cpp runs on one thread (see the note there).
    omp = ["-fopenmp"] if sys.platform.startswith("linux") else []
    cxx += omp
    if use_cuda:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
        # kernels use explicit __fadd_rn/__fmul_rn (no fast-math: bit-exact with the reference)
        cu = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "csrc").glob("*.cu"))
        ext = CUDAExtension(
            "advcal._C",
            cpp + cu,
            define_macros=[("ADVCAL_WITH_CUDA", "1")],
            extra_compile_args={"cxx": cxx, "nvcc": ["-O3", "-std=c++17", "-lineinfo"]},
            extra_link_args=omp,
        )
    else:
        ext = CppExtension("advcal._C", cpp, extra_compile_args={"cxx": cxx}, extra_link_args=omp)
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _extensions()
setup(
    packages=PACKAGES,
    package_dir=PACKAGE_DIR,
    package_data={
        "advcal": ["py.typed"],
        "advcal.backbones.assets": ["*.gz", "*.txt"],
        "advcal.data.assets": ["*.txt", "*.json"],  # ImageNet wnids/names, prompt templates
    },
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
