"""Build glimpse-ops: the ``glimpse_ops._C`` extension (C++ CPU kernels always; CUDA kernels
only when ``csrc/cuda/`` holds CUDA sources, the installed torch has CUDA and nvcc is found)
and the pure-Python package, with the Triton kernels installed as ``glimpse_ops.triton_kernels``.

Today the GPU kernels are all Triton: ``csrc/cuda/`` holds no source, so every install builds
the CPU extension only and links nothing from CUDA.

Environment:
  GLIMPSE_BUILD_CUDA=auto|0|1   auto (default): CUDA kernels when there are any and they can be
                                built; 0: never; 1: required, fail loudly when they cannot be.
  CUDA_HOME                     the CUDA toolkit root; found from nvcc when unset (also when
                                nvcc on PATH is a wrapper script outside the toolkit).
  TORCH_CUDA_ARCH_LIST          default "9.0a" (Hopper) when building CUDA.
  DEBUG=1                       -O0 -g instead of -O3 -g0.
Install with ``pip install --no-build-isolation -e .`` (torch must be installed first).
"""

from __future__ import annotations

import glob
import os
import re
import shutil
import subprocess
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))
SKIP_CUDA = "set GLIMPSE_BUILD_CUDA=0 to build without the CUDA kernels (the Triton kernels still run on GPUs)"


def cuda_sources(root: str = ROOT) -> list[str]:
    found = glob.glob(os.path.join(root, "csrc", "cuda", "*.cu")) + glob.glob(
        os.path.join(root, "csrc", "cuda", "*.cpp")
    )
    return sorted(os.path.relpath(path, root) for path in found)


def build_mode() -> str:
    mode = os.environ.get("GLIMPSE_BUILD_CUDA", "auto").strip().lower()
    if mode not in ("auto", "0", "1"):
        raise SystemExit(f"GLIMPSE_BUILD_CUDA must be auto, 0 or 1, got {mode!r}")
    return mode


def toolkit_root(nvcc: str) -> str | None:
    """The toolkit folder an nvcc really runs from (``nvcc --dryrun`` prints it as TOP), so a
    wrapper script on PATH (e.g. /usr/local/bin/nvcc) does not make /usr/local the toolkit."""
    try:
        printed = subprocess.run(
            [nvcc, "--dryrun", "-E", "-x", "cu", "-", "-o", os.devnull],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=60,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    match = re.search(r"^#\$ TOP=(.+)$", printed.stdout + printed.stderr, re.MULTILINE)
    return os.path.realpath(match[1].strip()) if match else None


def cudart_link(cuda_home: str | None, site_dirs: list[str]) -> tuple[list[str], list[str]] | None:
    """(library_dirs, extra_link_args) that link the CUDA runtime, looked for as torch itself
    does: the toolkit's lib64 (or targets/*/lib), else the runtime that torch's wheels bring
    (site-packages/nvidia/cu13/lib, nvidia/cuda_runtime/lib). None when neither has it."""
    if cuda_home:
        for lib in [os.path.join(cuda_home, "lib64"), os.path.join(cuda_home, "lib")] + sorted(
            glob.glob(os.path.join(cuda_home, "targets", "*", "lib"))
        ):
            if os.path.exists(os.path.join(lib, "libcudart.so")):
                return [lib], []
    for site in site_dirs:
        for lib in sorted(glob.glob(os.path.join(site, "nvidia", "*", "lib"))):
            versioned = sorted(glob.glob(os.path.join(lib, "libcudart.so.*")))
            if versioned:
                return [lib], [f"-l:{os.path.basename(versioned[0])}", f"-Wl,-rpath,{lib}"]
    return None


def _cuda_build_problem() -> str | None:
    """Why the CUDA kernels cannot be built here, or None. Sets CUDA_HOME from nvcc when unset."""
    import torch

    if torch.version.cuda is None:
        return f"the installed torch {torch.__version__} has no CUDA"
    if not os.environ.get("CUDA_HOME") and not os.environ.get("CUDA_PATH"):
        nvcc = shutil.which("nvcc")
        root = toolkit_root(nvcc) if nvcc else None
        if root is None and os.path.exists("/usr/local/cuda/bin/nvcc"):
            root = "/usr/local/cuda"
        if root is None:
            return "nvcc was not found (put it on PATH or set CUDA_HOME)"
        os.environ["CUDA_HOME"] = root  # before torch.utils.cpp_extension reads it
    return None


def _extensions():
    from torch.utils.cpp_extension import CppExtension

    debug = os.environ.get("DEBUG", "0") == "1"
    opt = ["-O0", "-g"] if debug else ["-O3"]
    # -g0: Python's CFLAGS carry -g, and debug info for torch's headers doubles each file's compile
    host_opt = opt if debug else opt + ["-g0"]
    # at::parallel_for is a header template: without OpenMP in *this* build it runs every
    # CPU kernel on one thread. Torch's own libgomp.so.1 is loaded first and serves it.
    openmp = ["-fopenmp"] if sys.platform.startswith("linux") else []
    # the kernels include per-operator headers (ATen/ops/<op>.h), not ATen/ATen.h: a third of the
    # compile time; this macro turns an accidental include of the monolithic headers into an error
    cxx_flags = host_opt + ["-std=c++17", "-DTORCH_ASSERT_ONLY_METHOD_OPERATORS"] + openmp
    sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp"))
    cpu_only = [CppExtension("glimpse_ops._C", sources, extra_compile_args={"cxx": cxx_flags}, extra_link_args=openmp)]
    mode, gpu_sources = build_mode(), cuda_sources()
    if mode == "0":
        return cpu_only
    if not gpu_sources:
        if mode == "1":
            raise SystemExit(
                "GLIMPSE_BUILD_CUDA=1, but csrc/cuda/ holds no CUDA source: the GPU kernels are Triton "
                "(glimpse_ops.triton_kernels) and there is no CUDA extension to build"
            )
        return cpu_only
    problem = _cuda_build_problem()
    if problem is not None:
        if mode == "1":
            raise SystemExit(f"GLIMPSE_BUILD_CUDA=1 but {problem}")
        print(f"glimpse-ops: building without CUDA kernels: {problem}")
        return cpu_only

    import site

    from torch.utils.cpp_extension import CUDA_HOME, CUDAExtension

    link = cudart_link(CUDA_HOME, site.getsitepackages() + [site.getusersitepackages()] + sys.path)
    if link is None:
        raise SystemExit(
            f"glimpse-ops: the CUDA kernels need the CUDA runtime library libcudart, found neither in "
            f"CUDA_HOME={CUDA_HOME} (lib64/) nor in torch's nvidia runtime packages; set CUDA_HOME to the "
            f"toolkit root, or {SKIP_CUDA}"
        )
    library_dirs, link_args = link
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "9.0a")
    extension = CUDAExtension(
        "glimpse_ops._C",
        sources + gpu_sources,
        define_macros=[("GLIMPSE_WITH_CUDA", "1")],
        library_dirs=library_dirs,
        extra_link_args=link_args + openmp,
        extra_compile_args={"cxx": cxx_flags, "nvcc": opt + ["-std=c++17", "-lineinfo", "--expt-relaxed-constexpr"]},
    )
    if link_args:  # a versioned runtime only (libcudart.so.13): link it by file name
        extension.libraries = [lib for lib in extension.libraries if lib != "cudart"]
    return [extension]


WHEEL_COMMANDS = ("bdist_wheel", "editable_wheel", "dist_info")


def missing_wheel_message(argv: list[str]) -> str | None:
    """Why the command in ``argv`` cannot run here, when it needs setuptools' ``bdist_wheel``
    and neither setuptools (>= 70.1 ships it) nor the ``wheel`` package provides it. Without
    this, ``pip install --no-build-isolation`` with an older setuptools and no ``wheel``
    stops at ``invalid command 'bdist_wheel'``."""
    import importlib.util

    if not any(command in argv for command in WHEEL_COMMANDS):
        return None
    if importlib.util.find_spec("setuptools.command.bdist_wheel") or importlib.util.find_spec("wheel"):
        return None
    return (
        "glimpse-ops: building a wheel (pip install, also editable) needs setuptools' bdist_wheel: "
        "this setuptools is older than 70.1 and the `wheel` package is not installed. "
        'Run `pip install "setuptools>=70.1"` (or `pip install wheel`), then install again.'
    )


def delegated_develop_message(argv: list[str], setuptools_version: str) -> str | None:
    """Why ``setup.py develop`` cannot work here: setuptools >= 80 runs it as ``pip install -e .
    --use-pep517`` in an isolated build (which compiles against a freshly fetched torch, not the
    installed one), and a pip older than 21.3 answers that by calling ``setup.py develop``
    again, which fails. pip >= 21.3 installs editable through PEP 660 and never gets here."""
    if "develop" not in argv or int(setuptools_version.split(".")[0]) < 80:
        return None
    return (
        f"glimpse-ops: `setup.py develop` (what pip < 21.3 runs for `pip install -e .`) is handed back to "
        f"pip by setuptools {setuptools_version} in an isolated build. Upgrade pip (`pip install -U pip`; "
        'any pip >= 21.3) and run `pip install --no-build-isolation -e .`, or keep this pip with "setuptools<80".'
    )


if __name__ == "__main__":  # pip runs this file as __main__; tests import its helpers
    import setuptools

    for message in (missing_wheel_message(sys.argv), delegated_develop_message(sys.argv, setuptools.__version__)):
        if message is not None:
            raise SystemExit(message)
    from torch.utils.cpp_extension import BuildExtension

    setup(ext_modules=_extensions(), cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)})
