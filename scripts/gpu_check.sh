#!/usr/bin/env bash
# GPU check of the CUDA kernels on a GPU machine without network (docs/cuda.md, "GPU check").
# Prepare its inputs first, where there is network: bash scripts/gpu_prepare.sh.
#
#   bash scripts/gpu_check.sh harness   build, the kernels through the test harness: pytest's GPU
#                                       tests, then scripts/gpu_bench.py --part harness
#                                       (correctness of fp32/fp16/bf16 against float64, timing
#                                       against cuBLAS at d=4096/D=11008/n=8, both layouts)
#   bash scripts/gpu_check.sh stash     keep the onnxruntime-gpu parts carried by this call
#                                       (build/ort-gpu/part*) in /tmp/dsmoe-ortgpu for later calls
#   bash scripts/gpu_check.sh ort       stash, then, once all parts are there: install
#                                       onnxruntime-gpu in /tmp/dsmoe-ortgpu/site, the op in CUDA
#                                       EP sessions (pytest -k cuda_ep), op-level timing against
#                                       the dense FFN and com.microsoft.MoE (gpu_bench.py --part
#                                       ort), exported models end to end (scripts/gpu_e2e.py)
#   bash scripts/gpu_check.sh           harness, then ort when the parts are all there
# Results go to $OUT (the device tool's output folder) or gpu-check-out/: gpu-harness.md /.json,
# gpu-ort.md / .json, pytest and build logs.
#   PYTHON       python with torch (CUDA), numpy, onnx, pytest (default: python3)
#   CUDA_ARCHS   default 90 (the H200; pip install . builds 80-real;89-real;90)
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
OUT_DIR=${OUT:-gpu-check-out}
mkdir -p "$OUT_DIR"
PYTHON=${PYTHON:-python3}
STASH=/tmp/dsmoe-ortgpu
stage=${1:-all}
start=$(date +%s)
elapsed() { echo "[$(( $(date +%s) - start ))s]"; }
# Every step's timeout is cut to what is left of BUDGET seconds (the device call's limit).
BUDGET=${BUDGET:-540}
tmo() { local left=$(( BUDGET - ($(date +%s) - start) - 15 )); [ "$left" -lt "$1" ] && echo $(( left > 5 ? left : 5 )) || echo "$1"; }

# dsmoe_export from the checkout, dsmoe_runtime as its package name (runtime/).
mkdir -p /tmp/dsmoe-pp && ln -sfn "$ROOT/runtime" /tmp/dsmoe-pp/dsmoe_runtime
export PYTHONPATH=$ROOT:/tmp/dsmoe-pp${PYTHONPATH:+:$PYTHONPATH}
export PYTHONUNBUFFERED=1
export DSMOE_CUDA_HARNESS=$ROOT/build/gpu/libdsmoe_cuda_harness.so
export DSMOE_OPS_LIBRARY=$ROOT/build/gpu/libdsmoe_ops.so

build() {
  [ -f "$DSMOE_OPS_LIBRARY" ] && [ -f "$DSMOE_CUDA_HARNESS" ] && [ -z "${REBUILD:-}" ] && return 0
  echo "== build (build/gpu) $(elapsed)"
  local headers=${ORT_INCLUDE_DIR:-$ROOT/build/ort-headers} header_arg=()
  # Without them CMake finds a system install or fetches the headers (needs network).
  [ -d "$headers" ] && header_arg=(-DORT_INCLUDE_DIR="$headers")
  if ! { cmake -S . -B build/gpu -DCMAKE_BUILD_TYPE=Release -DDSMOE_WITH_CUDA=ON \
           -DDSMOE_CUDA_ARCHITECTURES="${CUDA_ARCHS:-90}" "${header_arg[@]}" \
         && cmake --build build/gpu -j"$(nproc)"; } >"$OUT_DIR/build.log" 2>&1; then
    tail -30 "$OUT_DIR/build.log"; echo "build failed (log: $OUT_DIR/build.log)"; exit 1
  fi
  echo "built $(elapsed)"
}

harness() {
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader || true
  build
  if ! "$PYTHON" -c "import sys, torch; sys.exit(not torch.cuda.is_available())" 2>/dev/null; then
    echo "no CUDA device visible to torch ($PYTHON): nothing to check"; return 1
  fi
  echo "== smoke: one call of each path $(elapsed)"
  if ! timeout $(tmo 120) "$PYTHON" scripts/gpu_smoke.py 2>&1 | tee "$OUT_DIR/smoke.log"; then
    echo "smoke failed: each case in its own process $(elapsed)"
    for c in $("$PYTHON" -c "import sys; sys.path[:0] = ['scripts']; import gpu_smoke; print(*gpu_smoke.CASES)" \
               2>/dev/null); do
      timeout $(tmo 30) "$PYTHON" scripts/gpu_smoke.py --case "$c" 2>&1 | grep -E "^(ok|FAIL)|Error" | tail -2
    done | tee -a "$OUT_DIR/smoke.log"
    first=$(grep -m1 "^FAIL" "$OUT_DIR/smoke.log" | sed 's/^FAIL \([^ :]*\).*/\1/')
    if [ -n "$first" ] && command -v compute-sanitizer >/dev/null; then
      echo "== compute-sanitizer memcheck on $first $(elapsed)"
      timeout $(tmo 150) compute-sanitizer --tool memcheck --print-limit 8 "$PYTHON" scripts/gpu_smoke.py --case "$first" \
        >"$OUT_DIR/sanitizer.log" 2>&1
      grep -E "=========" "$OUT_DIR/sanitizer.log" | grep -v -E "^=+ *$" | head -40
    fi
  fi
  echo "== gpu_bench.py --part harness $(elapsed)"
  timeout $(tmo 300) "$PYTHON" scripts/gpu_bench.py --part harness --out "$OUT_DIR" 2>&1 | tee "$OUT_DIR/bench-harness.log" \
    | grep -v "^  T=" 
  echo "== pytest tests/test_op_cuda.py (the harness) $(elapsed)"
  timeout $(tmo 300) "$PYTHON" -m pytest -q -p no:cacheprovider --maxfail=30 -k "not cuda_ep" tests/test_op_cuda.py \
    $("$PYTHON" -c "import pytest_timeout" 2>/dev/null && echo "--timeout=60") >"$OUT_DIR/pytest-harness.log" 2>&1
  echo "pytest rc=$? $(elapsed)"
  grep -E "passed|failed|error" "$OUT_DIR/pytest-harness.log" | tail -3
  grep -E "^(FAILED|ERROR)" "$OUT_DIR/pytest-harness.log" | head -20
  echo "harness stage done $(elapsed)"
}

stash() {
  mkdir -p "$STASH"
  for f in build/ort-gpu/part* build/ort-gpu/manifest; do
    [ -f "$f" ] && cp "$f" "$STASH/" && echo "stashed $f"
  done
  ls -la "$STASH"
}

ort_install() {  # 0 when onnxruntime-gpu is importable (installed, or from $STASH/site)
  if "$PYTHON" -c "import onnxruntime as o, sys; sys.exit('CUDAExecutionProvider' not in o.get_available_providers())" \
       2>/dev/null; then
    return 0
  fi
  if [ ! -d "$STASH/site/onnxruntime" ]; then
    [ -f "$STASH/manifest" ] || { echo "no manifest in $STASH"; return 1; }
    (cd "$STASH" && grep part manifest | sha256sum -c --quiet) || { echo "parts missing or corrupt"; return 1; }
    mkdir -p "$STASH/site"
    cat "$STASH"/part* | xz -dc | tar -xf - -C "$STASH/site" || return 1
  fi
  export PYTHONPATH=$STASH/site:$PYTHONPATH
  # onnxruntime-gpu's CUDA EP needs libcublas(Lt).so.13, libcurand, libcudart: torch's nvidia wheels.
  local libs
  libs=$("$PYTHON" -c "import glob, importlib.util as u; \
print(':'.join(sorted({p for d in u.find_spec('nvidia').submodule_search_locations \
for p in glob.glob(d + '/*/lib') + glob.glob(d + '/cu13/lib')})))" 2>/dev/null)
  export LD_LIBRARY_PATH=${libs}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
  "$PYTHON" -c "import onnxruntime as o; print('onnxruntime', o.__version__, o.__file__, o.get_available_providers())"
}

ort_stage() {
  stash
  ort_install || { echo "ORT CUDA EP stage not run"; return 0; }
  build
  echo "== pytest -k cuda_ep $(elapsed)"
  timeout $(tmo 150) "$PYTHON" -m pytest -q -p no:cacheprovider -k cuda_ep tests/test_op_cuda.py >"$OUT_DIR/pytest-ort.log" 2>&1
  echo "pytest rc=$? $(elapsed)"
  grep -E "passed|failed|error" "$OUT_DIR/pytest-ort.log" | tail -3
  grep -E "^(FAILED|ERROR)|Error" "$OUT_DIR/pytest-ort.log" | head -12
  if [ -d build/gpu-models ]; then
    echo "== gpu_e2e.py build/gpu-models $(elapsed)"
    timeout $(tmo 100) "$PYTHON" scripts/gpu_e2e.py build/gpu-models 2>&1 | grep -v -i warn | tee "$OUT_DIR/e2e.log"
  fi
  echo "== gpu_bench.py --part ort $(elapsed)"
  timeout $(tmo 300) "$PYTHON" scripts/gpu_bench.py --part ort --library "$DSMOE_OPS_LIBRARY" --out "$OUT_DIR" 2>&1 \
    | tee "$OUT_DIR/bench-ort.log" | grep -v "^  ORT"
  echo "ort stage done $(elapsed)"
}

case $stage in
  harness) harness ;;
  stash) stash ;;
  ort) ort_stage ;;
  all) harness; ort_stage ;;
  *) echo "unknown stage $stage (harness, stash, ort)"; exit 2 ;;
esac
