#!/usr/bin/env bash
# Set-up, then the main job on the built-in default model (see README).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m dsmoe_export.demo "$@"
