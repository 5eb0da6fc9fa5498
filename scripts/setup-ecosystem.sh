#!/usr/bin/env bash
# Optional: the side environments of the ecosystem tests (tests/test_runtime_ecosystem.py).
# Their packages conflict with the main .venv, so each gets its own venv:
#   .venv-optimum  optimum-onnx 0.1.0 (optimum 2.1, transformers < 4.58) + torch 2.13.0 + onnxruntime 1.31.1
#   .venv-genai    onnxruntime-genai 0.18.0 + onnxruntime 1.31.1, and its model builder's dependencies
#                  (torch 2.13.0, transformers, onnx, onnx-ir: the benchmark builds the dense model users
#                  run today with it)
# The tests find them there (or through DSMOE_OPTIMUM_PYTHON / DSMOE_GENAI_PYTHON) and skip,
# saying why, when they are missing. Usage: bash scripts/setup-ecosystem.sh [optimum] [genai]
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
want=${*:-optimum genai}
for env in $want; do
  case "$env" in
    optimum)
      [ -x .venv-optimum/bin/python ] || "$PYTHON" -m venv .venv-optimum
      # torch first and alone, at the project's version (a CPU build on the dev/CI machines).
      .venv-optimum/bin/python -m pip install --quiet "torch==2.13.0"
      .venv-optimum/bin/python -m pip install --quiet "optimum-onnx==0.1.0" "optimum==2.1.0" \
        "transformers>=4.57,<4.58" "onnxruntime==1.31.1" "onnx==1.23.2" "numpy==2.4.6" ;;
    genai)
      [ -x .venv-genai/bin/python ] || "$PYTHON" -m venv .venv-genai
      .venv-genai/bin/python -m pip install --quiet "torch==2.13.0"
      .venv-genai/bin/python -m pip install --quiet "onnxruntime-genai==0.18.0" "onnxruntime==1.31.1" "numpy==2.4.6" \
        "onnx==1.23.2" "onnx-ir==1.1.0" "transformers==5.23.0" "safetensors==0.8.0" "tqdm==4.70.1" ;;
    *) echo "unknown environment: $env (optimum or genai)" >&2; exit 2 ;;
  esac
done
