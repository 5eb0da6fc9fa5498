#!/usr/bin/env bash
# GPU check of the CUDA kernel, in one call on a GPU machine (docs/cuda.md): build,
# correctness against the float64 reference, timing against dense (cuBLAS through
# torch), the ORT CUDA EP path when onnxruntime-gpu is there; a table last.
# Results go to $OUT (the device tool's output folder) or gpu-check-out/:
# gpu-benchmarks.md (paste into docs/benchmarks.md), gpu-benchmarks.json, build.log.
#   ORT_INCLUDE_DIR   ONNX Runtime headers (default: build/ort-headers if present; the
#                     GPU machine has no network, so bring them: docs/cuda.md)
#   PYTHON            python with torch (CUDA), numpy, onnx (default: python3)
#   CUDA_ARCHS        default 90 (the H200; the full build does 80-real;89-real;90)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT_DIR=${OUT:-gpu-check-out}
mkdir -p "$OUT_DIR"
PYTHON=${PYTHON:-python3}
ORT_INCLUDE_DIR=${ORT_INCLUDE_DIR:-$PWD/build/ort-headers}
start=$(date +%s)
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true

echo "== build (build/gpu)"
cmake_args=(-S . -B build/gpu -DCMAKE_BUILD_TYPE=Release -DDSMOE_WITH_CUDA=ON
            -DDSMOE_CUDA_ARCHITECTURES="${CUDA_ARCHS:-90}" -DORT_INCLUDE_DIR="$ORT_INCLUDE_DIR")
if ! { cmake "${cmake_args[@]}" && cmake --build build/gpu -j"$(nproc)"; } >"$OUT_DIR/build.log" 2>&1; then
  tail -30 "$OUT_DIR/build.log"; echo "build failed (log: $OUT_DIR/build.log)"; exit 1
fi
echo "built in $(( $(date +%s) - start ))s"
export DSMOE_CUDA_HARNESS=$PWD/build/gpu/libdsmoe_cuda_harness.so
export DSMOE_OPS_LIBRARY=$PWD/build/gpu/libdsmoe_ops.so

if "$PYTHON" -c "import pytest" 2>/dev/null; then
  echo "== pytest tests/test_op_cuda.py"
  timeout 240 "$PYTHON" -m pytest -q -x -p no:cacheprovider tests/test_op_cuda.py 2>&1 | tail -15 \
    | tee "$OUT_DIR/pytest.log" || echo "pytest: failures or timeout (see $OUT_DIR/pytest.log)"
else
  echo "== pytest not installed: the correctness pass of gpu_bench.py covers the kernels"
fi

echo "== correctness + timing"
timeout 300 "$PYTHON" scripts/gpu_bench.py --out "$OUT_DIR" --library "$DSMOE_OPS_LIBRARY"
echo "total $(( $(date +%s) - start ))s"
