"""The README stays true: its test command is what CI runs, its example runs."""

from __future__ import annotations

import re

import pytest
from helpers import REPO_ROOT

ROOT = REPO_ROOT
README = (ROOT / "README.md").read_text()


def code_blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", README, flags=re.S)


def test_ci_runs_the_readme_test_command():
    commands = code_blocks("bash")
    test_command = next(c.strip() for c in commands if "pytest" in c)
    assert test_command in (ROOT / ".ci" / "run").read_text()
    assert any("python bench/run.py" in c for c in commands)


def test_ci_runs_the_readme_gpu_install_command():
    """The GPU install line is what CI runs on the GPU machines' stack (torch 2.11 + cu130)."""
    gpu_install = next(c.strip() for c in code_blocks("bash") if "--no-deps" in c)
    ci = (ROOT / ".ci" / "run").read_text()
    marker = "# --- README GPU install command: keep identical to README.md ---"
    assert marker in ci
    assert ci.split(marker, 1)[1].strip().splitlines()[0].strip() == gpu_install


def test_readme_layout_matches_the_tree():
    """Every top-level entry the layout names exists, and every tracked module and folder of the
    product (top level, glimpse_ops/, its sub-packages, bench/, tests/) is named in it."""
    layout = README.split("## Layout", 1)[1].split("```", 2)[1]
    named = set(re.findall(r"[\w.<>-]+(?:/[\w.<>-]+)*/?", layout))
    for line in layout.splitlines():
        head = line.split(" ", 1)[0]
        if head:
            assert (ROOT / head.rstrip("/")).exists(), f"README layout names {head}, which does not exist"
    expected = {"csrc/", "triton_kernels/", "glimpse_ops/", "bench/", "tests/", "docs/DESIGN.md", "setup.py"}
    folders = ("glimpse_ops", "glimpse_ops/glimpseprune", "glimpse_ops/hf", "glimpse_ops/lvlm", "glimpse_ops/vllm")
    for folder in (*folders, "bench", "tests"):
        for path in (ROOT / folder).iterdir():
            if path.name.startswith(("__", ".")) or path.suffix not in (".py", ".sh", ""):
                continue
            if path.name in ("__init__.py",) or (path.is_dir() and not any(path.glob("*.py"))):
                continue
            expected.add(path.stem if path.suffix else path.name)
    words = " ".join(named)
    missing = sorted(e for e in expected if e.rstrip("/") not in words)
    assert not missing, f"README layout does not mention {missing}"


def test_readme_example_runs():
    example = code_blocks("python")[0]
    namespace: dict = {}
    exec(compile(example, "README.md", "exec"), namespace)
    assert namespace["hidden"].shape[1] == namespace["index"].shape[1]
    assert bool((namespace["lengths"] == 256 + namespace["max_keep"]).all())


def test_every_op_in_the_table_links_to_its_module():
    import glimpse_ops

    for op in glimpse_ops.OPS:
        assert f"[`{op}`](glimpse_ops/ops/{op}.py)" in README, op
        assert (ROOT / "glimpse_ops" / "ops" / f"{op}.py").exists()


def test_readme_hf_example_runs_on_a_tiny_model(capsys):
    """The HF section's pruning lines, with the checkpoint and processor swapped for the tiny
    random Qwen2.5-VL and its input builder."""
    pytest.importorskip("transformers")
    from glimpse_ops.hf import testing

    example = code_blocks("python")[1]
    pruning = example[example.index("with glimpse_ops.hf.pruned") :]
    namespace = {"model": testing.tiny_qwen2_5_vl(), "inputs": testing.qwen_inputs(batch=2, text_lengths=[2, 3])}
    exec(
        compile(
            "import glimpse_ops.hf\n" + pruning.replace("max_new_tokens=64", "max_new_tokens=2"), "README.md", "exec"
        ),
        namespace,
    )
    assert namespace["out"].shape[0] == 2
    assert "tensor([2, 2])" in capsys.readouterr().out


def test_readme_predictor_example_runs_on_a_tiny_model(tmp_path):
    """The trained-predictor lines, with the release folder swapped for a tiny saved predictor."""
    pytest.importorskip("transformers")
    from glimpse_ops.glimpseprune import GlimpsePredictor
    from glimpse_ops.hf import testing

    model = testing.tiny_qwen2_5_vl()
    path = tmp_path / "predictor.safetensors"
    GlimpsePredictor.for_model(model, 3, (1, 0), width=32, cond=32, fuse_heads=2).save(path)
    example = (
        code_blocks("python")[2]
        .replace("/models/GlimpsePrune-Qwen2.5-VL-7B", str(path))
        .replace("max_new_tokens=64", "max_new_tokens=2")
    )
    namespace = {"model": model, "inputs": testing.qwen_inputs(batch=2, text_lengths=[2, 3])}
    exec(compile("import glimpse_ops.hf\n" + example, "README.md", "exec"), namespace)
    assert namespace["out"].shape[0] == 2
    assert not hasattr(model, "_glimpse_ops_patch")


def test_readme_training_example_runs_on_a_tiny_model(tmp_path):
    pytest.importorskip("transformers")
    from glimpse_ops.hf import testing

    example = code_blocks("python")[3]
    example = example.replace(
        "score_layer=18, vit_layers=(31, 23, 15, 7)",
        "score_layer=3, vit_layers=(1, 0), width=32, cond=32, fuse_heads=2",
    )
    example = example.replace('"glimpse.safetensors"', repr(str(tmp_path / "glimpse.safetensors")))
    namespace = {"model": testing.tiny_qwen2_5_vl(), "batches": [testing.qwen_training_batch()]}
    exec(compile("import glimpse_ops.hf\n" + example, "README.md", "exec"), namespace)
    assert (tmp_path / "glimpse.safetensors").exists()
