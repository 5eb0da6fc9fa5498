#!/usr/bin/env bash
# Set-up, then the test suite. Extra arguments go to pytest (e.g. --runslow, -k export).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# The pytest script (not `python -m pytest`) keeps the source tree off sys.path, so
# the tests import the installed package: a missing install step fails here.
exec .venv/bin/pytest "$@"
