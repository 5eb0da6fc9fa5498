#!/usr/bin/env bash
# Prepares, on this (networked, GPU-less) machine, what scripts/gpu_check.sh needs on a GPU
# machine that has no network (docs/cuda.md, "GPU check"). Everything goes under build/
# (git-ignored), to be carried by the device tool:
#   build/ort-headers/  ONNX Runtime's C/C++ headers (the op library's build needs them)
#   build/gpu-models/   small exports for the end-to-end CUDA EP check (scripts/gpu_e2e.py):
#                       sparse.onnx (float32, gate/up in rows), sparse_rows.onnx,
#                       sparse_fp16.onnx, dense.onnx, dense_fp16.onnx
#   build/ort-gpu/      onnxruntime-gpu (pinned) repacked as tar.xz parts of at most
#                       PART_MIB MiB (default 44: the first call also carries the two
#                       libraries, about 14 MiB with the CUTLASS GEMMs), one part per device
#                       call, with a manifest
#                       (sha256 of each part and of the whole)
#   build/gpu/          the op library and the test harness for sm_90, with the CUTLASS
#                       grouped GEMMs (sm_90a and sm_80; their headers fetched from PyPI here: the device has
#                       no network; nvcc here: the device call then skips its build)
# and prints the device calls that use them.
# Usage: bash scripts/gpu_prepare.sh [headers] [models] [ort] [lib]   (default: all four)
set -euo pipefail
cd "$(dirname "$0")/.."
ORT_GPU_VERSION=${ORT_GPU_VERSION:-1.31.1}
PART_MIB=${PART_MIB:-44}
PYTHON=${PYTHON:-.venv/bin/python}
stages=("$@")
[ ${#stages[@]} -eq 0 ] && stages=(headers models ort lib)

for stage in "${stages[@]}"; do
  case $stage in
  headers)
    src=$("$PYTHON" -c "from pathlib import Path; import glob; \
print(sorted(glob.glob(str(Path.home() / '.cache/dsmoe-export/ort-headers-*')))[-1])")
    rm -rf build/ort-headers && mkdir -p build && cp -r "$src" build/ort-headers
    echo "headers: $src -> build/ort-headers"
    ;;
  models)
    rm -rf build/gpu-models && mkdir -p build/gpu-models
    "$PYTHON" - <<'EOF'
from dsmoe_export.synthetic import TinySpec, make_model_folder
# d % 8 == 0 (the float16 tensor-core path); B = 88; 2 layers.
make_model_folder("build/gpu-models/src", TinySpec(vocab_size=512, hidden_size=256, intermediate_size=704,
                                                   num_attention_heads=8, num_key_value_heads=4))
EOF
    # float32 graphs for the CUDA EP store gate/up in rows (the exporter's default is the CPU's slabs)
    for spec in "sparse:--gate-up-layout rows" "sparse_rows:--down-layout rows --gate-up-layout rows" \
                "sparse_fp16:--dtype float16" "dense:--dense" \
                "dense_fp16:--dense --dtype float16"; do
      name=${spec%%:*}; flags=${spec#*:}
      # shellcheck disable=SC2086
      "$PYTHON" -m dsmoe_export build/gpu-models/src "build/gpu-models/$name.onnx" -q --no-tokenizer $flags
    done
    rm -rf build/gpu-models/src
    du -sh build/gpu-models
    ;;
  ort)
    work=$(mktemp -d)
    trap 'rm -rf "$work"' EXIT
    "$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
      --platform manylinux_2_28_x86_64 -d "$work" "onnxruntime-gpu==$ORT_GPU_VERSION"
    (cd "$work" && unzip -q onnxruntime_gpu-*.whl \
      && rm -f onnxruntime/capi/libonnxruntime.so.* onnxruntime/capi/libonnxruntime_providers_tensorrt.so \
      && tar -cf - onnxruntime onnxruntime_gpu-*.dist-info | xz -T0 -6 > ort.tar.xz)
    rm -rf build/ort-gpu && mkdir -p build/ort-gpu
    split -b "${PART_MIB}m" -d -a 1 "$work/ort.tar.xz" build/ort-gpu/part
    (cd build/ort-gpu && sha256sum part* > manifest && sha256sum < "$work/ort.tar.xz" | sed 's/ .*/  whole/' >> manifest)
    cat build/ort-gpu/manifest
    ls -la build/ort-gpu
    ;;
  lib)
    [ -d build/ort-headers ] || { echo "lib needs build/ort-headers (the headers stage)"; exit 2; }
    cmake -S . -B build/gpu -DCMAKE_BUILD_TYPE=Release -DDSMOE_WITH_CUDA=ON -DDSMOE_CUDA_ARCHITECTURES=90 -DDSMOE_WITH_CUTLASS=ON \
      -DORT_INCLUDE_DIR="$PWD/build/ort-headers" > /dev/null
    cmake --build build/gpu -j"$(nproc)" > /dev/null
    ls -la build/gpu/*.so
    ;;
  *) echo "unknown stage $stage (headers, models, ort, lib)"; exit 2 ;;
  esac
done

# The calls: the smallest part travels with the first, the others one per call, the last with
# the ort stage.
mapfile -t parts < <(ls -S build/ort-gpu/part* 2>/dev/null)  # largest first
echo "Device calls (docs/cuda.md, \"GPU check\"), each within 30 s of the last:"
first='"build/ort-headers", "build/gpu/libdsmoe_ops.so", "build/gpu/libdsmoe_cuda_harness.so", "build/gpu-models"'
if [ ${#parts[@]} -eq 0 ]; then
  echo "  1. command \"bash scripts/gpu_check.sh harness\"  carry [$first]  (no onnxruntime-gpu parts: no ort stage)"
  exit 0
fi
n=${#parts[@]}
echo "  1. command \"bash scripts/gpu_check.sh stash; bash scripts/gpu_check.sh harness\""
echo "     carry [$first, \"${parts[n-1]}\", \"build/ort-gpu/manifest\"]"
for ((c = 0; c < n - 2; c++)); do
  echo "  $((c + 2)). command \"bash scripts/gpu_check.sh stash\"  carry [\"${parts[c]}\"]"
done
[ "$n" -ge 2 ] && echo "  $n. command \"bash scripts/gpu_check.sh ort\"  carry [\"${parts[n-2]}\"]"
[ "$n" -eq 1 ] && echo "  (the one part went with call 1: then run \"bash scripts/gpu_check.sh ort\" with no carry)"
true
