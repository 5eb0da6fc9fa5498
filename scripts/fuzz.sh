#!/usr/bin/env bash
# Coverage-guided fuzzing of the op's CPU kernel (tests/fuzz/, docs/reliability.md): builds
# tests/fuzz/fuzz_ffn with AddressSanitizer + UndefinedBehaviorSanitizer and runs it.
#
#   bash scripts/fuzz.sh [SECONDS]      default 120; corpus kept in build/fuzz/corpus,
#                                       crash inputs written to build/fuzz/artifacts/
#
# With clang (clang++, or clang++-NN found on PATH; Debian: apt-get install clang
# libclang-rt-14-dev) the target is a libFuzzer binary; otherwise it is built with the default
# C++ compiler as a standalone driver that runs random inputs for the same time budget.
# Replay a crash: build/fuzz/fuzz_ffn build/fuzz/artifacts/crash-...
set -euo pipefail
cd "$(dirname "$0")/.."
seconds="${1:-120}"
build="${DSMOE_FUZZ_BUILD:-build/fuzz}"

cxx="${CXX:-}"
if [[ -z "$cxx" ]]; then
  for c in clang++ clang++-19 clang++-18 clang++-17 clang++-16 clang++-15 clang++-14; do
    if command -v "$c" >/dev/null; then cxx="$c"; break; fi
  done
fi
cxx="${cxx:-c++}"

cmake -S tests/fuzz -B "$build" -DCMAKE_CXX_COMPILER="$cxx" >/dev/null
cmake --build "$build" -j"$(nproc 2>/dev/null || echo 2)" >/dev/null
engine=$(grep -E '^DSMOE_FUZZ_ENGINE:' "$build/CMakeCache.txt" | cut -d= -f2)
mkdir -p "$build/corpus" "$build/artifacts"
echo "fuzz_ffn ($engine, $cxx): ${seconds}s" >&2
export DSMOE_FUZZ_STATS=1
if [[ "$engine" == libfuzzer ]]; then
  "$build/fuzz_ffn" -max_total_time="$seconds" -max_len=4096 -timeout=30 -print_final_stats=1 \
    -artifact_prefix="$build/artifacts/" "$build/corpus"
else
  # The standalone driver: batches of random inputs until the time is up.
  end=$(( $(date +%s) + seconds )); seed=1
  while (( $(date +%s) < end )); do
    "$build/fuzz_ffn" -runs=2000 -seed="$seed" -max_len=4096
    seed=$((seed + 1))
  done
fi
