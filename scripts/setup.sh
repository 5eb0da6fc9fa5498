#!/usr/bin/env bash
# Creates .venv (if missing) and installs the package with its test extras at the
# tested versions. `pip install .` compiles the op library (custom_ops/) with CMake.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
# torch first and alone: pinned to 2.13.0, a CPU build on these machines, so that the
# resolver never reaches for a multi-GB CUDA build of a newer release.
.venv/bin/python -m pip install --quiet -c requirements/constraints.txt torch
.venv/bin/python -m pip install --quiet -c requirements/constraints.txt ".[test,bench]"
