"""How the package is found and built: the source checkout maps its own Triton kernels, the
repository root never shadows upstream Triton's ``triton_kernels``, setup.py links nothing from
CUDA without CUDA sources and finds the CUDA runtime as torch does when there are some."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import REPO_ROOT

ROOT = REPO_ROOT


def _load_setup():
    spec = importlib.util.spec_from_file_location("glimpse_setup", ROOT / "setup.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # __name__ is not "__main__": setup() does not run
    return module


def _python(code: str, cwd: Path, extra_path: list[str] | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "TRITON_INTERPRET")}
    if extra_path:
        env["PYTHONPATH"] = os.pathsep.join(extra_path)
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def test_source_checkout_maps_its_own_triton_kernels():
    """Run from the checkout (its root first on sys.path), the kernels come from this checkout."""
    done = _python(
        "import glimpse_ops, glimpse_ops.triton_kernels.compact_kv as m; print(m.__file__)",
        cwd=ROOT,
        extra_path=[str(ROOT)],
    )
    assert done.returncode == 0, done.stderr
    assert Path(done.stdout.strip()).resolve() == (ROOT / "triton_kernels" / "compact_kv.py").resolve()


def test_repository_root_does_not_shadow_upstream_triton_kernels(tmp_path):
    """vLLM imports upstream Triton's top-level ``triton_kernels``: with our repository root
    first on sys.path, a regular package of that name later on the path still wins."""
    upstream = tmp_path / "site" / "triton_kernels"
    upstream.mkdir(parents=True)
    (upstream / "__init__.py").write_text("UPSTREAM = True\n")
    done = _python(
        "import triton_kernels; print(getattr(triton_kernels, 'UPSTREAM', False))",
        cwd=ROOT,
        extra_path=[str(ROOT), str(tmp_path / "site")],
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "True"
    assert not (ROOT / "triton_kernels" / "__init__.py").exists()


def test_missing_triton_kernels_is_a_clear_runtime_error(tmp_path):
    """A copy of the package without its kernel folder: backend='triton' raises the contract's
    RuntimeError naming what to do, and the env report still prints."""
    import shutil

    shutil.copytree(ROOT / "glimpse_ops", tmp_path / "glimpse_ops", ignore=shutil.ignore_patterns("__pycache__"))
    code = (
        "import os; os.environ['TRITON_INTERPRET'] = '1'\n"
        "import torch, glimpse_ops as g\n"
        "from glimpse_ops.env import env_report; env_report()\n"
        "try:\n"
        "    g.keep_index(torch.ones(1, 4, dtype=torch.bool), backend='triton')\n"
        "except RuntimeError as e:\n"
        "    print('RuntimeError:', e)\n"
    )
    done = _python(code, cwd=tmp_path, extra_path=[str(tmp_path)])
    assert done.returncode == 0, done.stderr
    assert "RuntimeError: glimpse.keep_index: backend 'triton' is not available" in done.stdout
    assert "glimpse_ops.triton_kernels" in done.stdout and "reinstall with" in done.stdout


def test_pyproject_lists_every_package():
    tomllib = pytest.importorskip("tomllib")
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    listed = set(config["tool"]["setuptools"]["packages"])
    found = {".".join(p.relative_to(ROOT).parts[:-1]) for p in (ROOT / "glimpse_ops").rglob("__init__.py")}
    assert found | {"glimpse_ops.triton_kernels"} == listed
    assert config["tool"]["setuptools"]["package-dir"] == {"glimpse_ops.triton_kernels": "triton_kernels"}


def test_setup_names_the_fix_when_bdist_wheel_is_missing(monkeypatch):
    """setuptools < 70.1 without the wheel package: pip's metadata step would stop at
    ``invalid command 'bdist_wheel'``; setup.py says what to install instead."""
    import importlib.util

    setup = _load_setup()
    real_find_spec = importlib.util.find_spec
    assert setup.missing_wheel_message(["setup.py", "develop"]) is None  # legacy develop needs no wheel
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name in ("wheel", "setuptools.command.bdist_wheel") else real_find_spec(name, *a),
    )
    for command in ("dist_info", "editable_wheel", "bdist_wheel"):
        message = setup.missing_wheel_message(["setup.py", command, "--output-dir", "x"])
        assert message is not None and "setuptools>=70.1" in message and "pip install wheel" in message
    assert setup.missing_wheel_message(["setup.py", "develop"]) is None
    monkeypatch.setattr(importlib.util, "find_spec", real_find_spec)
    assert setup.missing_wheel_message(["setup.py", "dist_info"]) is None  # this environment can build


def test_setup_refuses_develop_that_setuptools_hands_back_to_pip():
    setup = _load_setup()
    assert setup.delegated_develop_message(["setup.py", "develop", "--no-deps"], "79.0.1") is None
    assert setup.delegated_develop_message(["setup.py", "editable_wheel"], "80.9.0") is None
    message = setup.delegated_develop_message(["setup.py", "develop", "--no-deps"], "80.9.0")
    assert message is not None and "pip install -U pip" in message and "setuptools<80" in message


def test_setup_builds_no_cuda_extension_without_cuda_sources(monkeypatch):
    setup = _load_setup()
    assert setup.cuda_sources() == [], "csrc/cuda has sources: update this test and the README"
    monkeypatch.setenv("GLIMPSE_BUILD_CUDA", "auto")
    monkeypatch.chdir(ROOT)
    (extension,) = setup._extensions()
    assert "cudart" not in extension.libraries
    assert not any(source.endswith(".cu") for source in extension.sources)
    monkeypatch.setenv("GLIMPSE_BUILD_CUDA", "1")
    with pytest.raises(SystemExit, match="no CUDA source"):
        setup._extensions()
    monkeypatch.setenv("GLIMPSE_BUILD_CUDA", "yes")
    with pytest.raises(SystemExit, match="must be auto, 0 or 1"):
        setup._extensions()


def test_setup_finds_the_cuda_runtime_like_torch(tmp_path):
    setup = _load_setup()
    toolkit = tmp_path / "cuda-13.0"
    (toolkit / "targets" / "x86_64-linux" / "lib").mkdir(parents=True)
    (toolkit / "targets" / "x86_64-linux" / "lib" / "libcudart.so").touch()
    assert setup.cudart_link(str(toolkit), []) == ([str(toolkit / "targets" / "x86_64-linux" / "lib")], [])
    # A toolkit without the runtime (e.g. CUDA_HOME guessed from a wrapper script's folder):
    # the runtime that torch's wheels bring, linked by its versioned name.
    wheel_lib = tmp_path / "site" / "nvidia" / "cu13" / "lib"
    wheel_lib.mkdir(parents=True)
    (wheel_lib / "libcudart.so.13").touch()
    dirs, args = setup.cudart_link(str(tmp_path / "usr-local"), [str(tmp_path / "site")])
    assert dirs == [str(wheel_lib)] and args[0] == "-l:libcudart.so.13"
    assert setup.cudart_link(str(tmp_path / "nothing"), [str(tmp_path / "empty")]) is None


@pytest.mark.skipif(
    not Path("/usr/local/bin/nvcc").exists()
    and not any((Path(p) / "nvcc").exists() for p in os.environ.get("PATH", "").split(os.pathsep)),
    reason="no nvcc",
)
def test_setup_reads_the_toolkit_root_through_an_nvcc_wrapper():
    import shutil

    root = _load_setup().toolkit_root(shutil.which("nvcc"))
    assert root is not None and (Path(root) / "bin" / "nvcc").exists()
    assert (Path(root) / "include" / "cuda_runtime.h").exists()


def _imports_of(path: Path, package: str) -> set[str]:
    """Absolute names of the glimpse_ops modules a file imports (any nesting level), except
    under ``if __name__ == "__main__":`` (run as a script, not when imported)."""
    import ast

    tree = ast.parse(path.read_text())
    main_guard = [
        n for n in tree.body
        if isinstance(n, ast.If) and isinstance(n.test, ast.Compare) and isinstance(n.test.left, ast.Name)
        and n.test.left.id == "__name__" and ast.literal_eval(n.test.comparators[0]) == "__main__"
    ]  # fmt: skip
    for guard in main_guard:
        tree.body.remove(guard)
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module or ""
            if name.startswith("glimpse_ops"):
                found.add(name)
                found.update(f"{name}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("glimpse_ops"))
    return found


def test_hf_integration_does_not_depend_on_the_reference_lvlm():
    for path in (ROOT / "glimpse_ops" / "hf").glob("*.py"):
        imported = _imports_of(path, "glimpse_ops.hf")
        assert not any(name.startswith("glimpse_ops.lvlm") for name in imported), path.name


def test_hf_modules_have_no_import_cycle():
    modules = {p.stem: p for p in (ROOT / "glimpse_ops" / "hf").glob("*.py") if p.stem != "__init__"}
    graph = {
        name: {m.rsplit(".", 1)[-1] for m in _imports_of(path, "glimpse_ops.hf") if m.startswith("glimpse_ops.hf.")}
        & set(modules)
        for name, path in modules.items()
    }
    seen, stack = set(), []

    def visit(node):
        assert node not in stack, f"import cycle: {' -> '.join(stack + [node])}"
        if node in seen:
            return
        stack.append(node)
        for nxt in graph[node]:
            visit(nxt)
        stack.pop()
        seen.add(node)

    for name in graph:
        visit(name)


def test_the_vllm_plugin_entry_point_is_declared_and_imports_without_vllm():
    import importlib

    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    target = project["entry-points"]["vllm.general_plugins"]["glimpse_prune"]
    module, function = target.split(":")
    assert callable(getattr(importlib.import_module(module), function))  # importing it needs no vLLM
    assert "vllm" in project["optional-dependencies"]


def test_triton_kernels_import_nothing_of_the_package_but_its_leaf():
    """The kernels sit below the routers that call them: of glimpse_ops they import only the
    leaf ``glimpse_ops._env`` (no backend table, no validation, no extension)."""
    for path in sorted((ROOT / "triton_kernels").glob("*.py")):
        outside = {m for m in _imports_of(path, "glimpse_ops.triton_kernels") if not m.startswith("glimpse_ops.triton")}
        assert outside <= {"glimpse_ops._env", "glimpse_ops._env.triton_interpreting"}, (path.name, outside)


def test_glimpseprune_and_vllm_import_no_hf_module():
    """GlimpsePrune's rules live below both integrations: neither glimpse_ops.glimpseprune nor
    the vLLM plugin imports glimpse_ops.hf."""
    for folder in ("glimpseprune", "vllm"):
        for path in sorted((ROOT / "glimpse_ops" / folder).glob("*.py")):
            hf = {m for m in _imports_of(path, f"glimpse_ops.{folder}") if m.startswith("glimpse_ops.hf")}
            assert not hf, (f"{folder}/{path.name}", hf)
