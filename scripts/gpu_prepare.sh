#!/usr/bin/env bash
# Prepares, on this (networked, GPU-less) machine, what scripts/gpu_check.sh needs on a GPU
# machine that has no network (docs/cuda.md, "GPU check"). Everything goes under build/
# (git-ignored), to be carried by the device tool:
#   build/ort-headers/  ONNX Runtime's C/C++ headers (the op library's build needs them)
#   build/gpu-models/   small exports for the end-to-end CUDA EP check (scripts/gpu_e2e.py):
#                       sparse.onnx (float32, tiled down layout), sparse_rows.onnx,
#                       sparse_fp16.onnx, dense.onnx, dense_fp16.onnx
#   build/ort-gpu/      onnxruntime-gpu (pinned) repacked as tar.xz parts of at most
#                       PART_MIB MiB (default 62), one part per device call, with a manifest
#                       (sha256 of each part and of the whole)
# Usage: bash scripts/gpu_prepare.sh [headers] [models] [ort]   (default: all three)
set -euo pipefail
cd "$(dirname "$0")/.."
ORT_GPU_VERSION=${ORT_GPU_VERSION:-1.31.1}
PART_MIB=${PART_MIB:-62}
PYTHON=${PYTHON:-.venv/bin/python}
stages=("$@")
[ ${#stages[@]} -eq 0 ] && stages=(headers models ort)

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
    for spec in "sparse:" "sparse_rows:--down-layout rows" "sparse_fp16:--dtype float16" "dense:--dense" \
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
  *) echo "unknown stage $stage (headers, models, ort)"; exit 2 ;;
  esac
done
