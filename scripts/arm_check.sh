#!/usr/bin/env bash
# The CPU kernels on 64-bit ARM, without an ARM machine: installs qemu's user-mode emulator and
# the aarch64 cross compilers (scripts/arm_tools.sh), then runs tests/test_cross_arm.py, which
# cross-builds the op library and a small ONNX Runtime driver, fetches ONNX Runtime's aarch64
# wheel from PyPI and checks the NEON kernels against the float64 reference inside that ONNX
# Runtime. Correctness only: emulated time says nothing about speed. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
bash scripts/arm_tools.sh
exec .venv/bin/pytest tests/test_cross_arm.py -rs "$@"
