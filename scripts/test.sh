#!/usr/bin/env bash
# Set-up, then the test suite. Extra arguments go to pytest (e.g. --runslow, -k export).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# Side venvs for the optimum and onnxruntime-genai tests (their pins conflict with .venv);
# DSMOE_SKIP_ECOSYSTEM=1 skips them (those tests then skip, saying why).
if [ "${DSMOE_SKIP_ECOSYSTEM:-0}" != "1" ]; then
  bash scripts/setup-ecosystem.sh
fi
# The aarch64 check (tests/test_cross_arm.py) needs qemu and the aarch64 cross compilers: installed
# where apt-get may (root or sudo), else those tests skip, saying why. DSMOE_SKIP_ARM=1 skips it.
if [ "${DSMOE_SKIP_ARM:-0}" != "1" ]; then
  bash scripts/arm_tools.sh || echo "test.sh: the aarch64 tools are missing; tests/test_cross_arm.py will skip" >&2
fi
# The pytest script (not `python -m pytest`) keeps the source tree off sys.path, so
# the tests import the installed package: a missing install step fails here.
exec .venv/bin/pytest "$@"
