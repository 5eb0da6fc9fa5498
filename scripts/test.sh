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
# The pytest script (not `python -m pytest`) keeps the source tree off sys.path, so
# the tests import the installed package: a missing install step fails here.
exec .venv/bin/pytest "$@"
