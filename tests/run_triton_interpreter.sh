#!/usr/bin/env bash
# Runs the Triton kernels on CPU tensors under TRITON_INTERPRET=1 (set before triton is
# imported). Fails if Triton kernels exist but no interpreter test ran (pytest exit 5).
set -uo pipefail
cd "$(dirname "$0")/.."
kernels=$(ls triton_kernels/*.py 2>/dev/null | grep -v '__init__\|_utils' || true)
if [ -z "$kernels" ]; then
  echo "no Triton kernels yet: nothing to run under the interpreter"
  exit 0
fi
TRITON_INTERPRET=1 python -m pytest -q -m triton_interpreter "$@"
status=$?
if [ $status -eq 5 ]; then
  echo "Triton kernels exist but no triton_interpreter test was collected" >&2
  exit 1
fi
exit $status
