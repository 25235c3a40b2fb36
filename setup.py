"""Build glimpse-ops: the ``glimpse_ops._C`` extension (C++ CPU kernels always; CUDA kernels
when the installed torch has CUDA and nvcc is found) and the pure-Python package, with the
Triton kernels installed as ``glimpse_ops.triton_kernels``.

Environment:
  GLIMPSE_BUILD_CUDA=auto|0|1   auto (default): CUDA when possible; 0: never; 1: required,
                                the build fails loudly if torch has no CUDA or nvcc is missing.
  TORCH_CUDA_ARCH_LIST          default "9.0a" (Hopper) when building CUDA.
  DEBUG=1                       -O0 -g instead of -O3.
Install with ``pip install --no-build-isolation -e .`` (torch must be installed first).
"""

from __future__ import annotations

import glob
import os
import shutil

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _cuda_wanted() -> bool:
    mode = os.environ.get("GLIMPSE_BUILD_CUDA", "auto").strip().lower()
    if mode not in ("auto", "0", "1"):
        raise SystemExit(f"GLIMPSE_BUILD_CUDA must be auto, 0 or 1, got {mode!r}")
    if mode == "0":
        return False
    import torch
    from torch.utils.cpp_extension import CUDA_HOME

    problems = []
    if torch.version.cuda is None:
        problems.append(f"the installed torch {torch.__version__} has no CUDA")
    nvcc = shutil.which("nvcc") or (CUDA_HOME and os.path.join(CUDA_HOME, "bin", "nvcc"))
    if not CUDA_HOME or not nvcc or not os.path.exists(nvcc):
        problems.append("nvcc / CUDA_HOME was not found")
    if problems:
        if mode == "1":
            raise SystemExit("GLIMPSE_BUILD_CUDA=1 but " + " and ".join(problems))
        print("glimpse-ops: building without CUDA kernels: " + " and ".join(problems))
        return False
    return True


def _extensions():
    from torch.utils.cpp_extension import CppExtension, CUDAExtension

    debug = os.environ.get("DEBUG", "0") == "1"
    opt = ["-O0", "-g"] if debug else ["-O3"]
    cxx_flags = opt + ["-std=c++17"]
    sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp"))
    if not _cuda_wanted():
        return [CppExtension("glimpse_ops._C", sources, extra_compile_args={"cxx": cxx_flags})]
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "9.0a")
    cuda_sources = sorted(glob.glob("csrc/cuda/*.cu") + glob.glob("csrc/cuda/*.cpp"))
    nvcc_flags = opt + ["-std=c++17", "-lineinfo", "--expt-relaxed-constexpr"]
    return [
        CUDAExtension(
            "glimpse_ops._C",
            sources + cuda_sources,
            define_macros=[("GLIMPSE_WITH_CUDA", "1")],
            extra_compile_args={"cxx": cxx_flags + ["-DGLIMPSE_WITH_CUDA=1"], "nvcc": nvcc_flags},
        )
    ]


def _build_ext():
    from torch.utils.cpp_extension import BuildExtension

    return BuildExtension.with_options(use_ninja=True)


packages = find_packages(include=["glimpse_ops", "glimpse_ops.*"])
packages.append("glimpse_ops.triton_kernels")

setup(
    name="glimpse-ops",
    version="0.1.0",
    description="Fast kernels for dynamic visual-token pruning in vision-language models",
    long_description=open(os.path.join(ROOT, "README.md")).read() if os.path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=packages,
    package_dir={"glimpse_ops.triton_kernels": "triton_kernels"},
    ext_modules=_extensions(),
    cmdclass={"build_ext": _build_ext()},
    install_requires=["torch>=2.6", "numpy"],
    extras_require={
        "triton": ["triton>=3.2"],
        "test": ["pytest", "hypothesis", "numpy", "pillow"],
        "demo": ["pillow"],
        "hf": ["transformers>=5.17,<5.24", "safetensors"],
    },
)
