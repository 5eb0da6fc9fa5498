// Software prefetch of the weights the prefill reads next (docs/cpu-kernel-notes.md #27).
//
// In a model the FFN weights come from DRAM (each layer's are evicted by the
// layers between two calls). The gate/up tiles read 12 weight rows at once and
// the down tiles a block's tile row by row; the hardware prefetchers follow
// neither well, so the first pass over a task's weights stalls on demand
// misses. A task therefore streams the weights of the task after it into L2
// while it computes: the kernels call Step() at a fixed rate inside their
// loops (cpu/kernels_isa.cc), one row of the region at a time.
#pragma once

#include <cstdint>

namespace dsmoe::cpu {

// `rows` rows of `row_bytes` bytes, `stride` bytes apart, prefetched one row per
// Step() until the region is done; an empty stream (the default) does nothing.
// Rows should span a few cache lines (256 bytes: 4 lines a step).
struct PrefetchStream {
  const char* next = nullptr;
  int64_t rows_left = 0, stride = 0;
  int lines = 0;  // cache lines per row

  static PrefetchStream Rows(const void* base, int64_t rows, int64_t row_bytes, int64_t stride) {
    return {static_cast<const char*>(base), rows, stride, static_cast<int>((row_bytes + kLine - 1) / kLine)};
  }
  // A contiguous range, in rows of kContiguousRow bytes.
  static PrefetchStream Range(const void* base, int64_t bytes) {
    return Rows(base, (bytes + kContiguousRow - 1) / kContiguousRow, kContiguousRow, kContiguousRow);
  }

  void Step() {
    if (rows_left <= 0) return;
    for (int l = 0; l < lines; ++l) __builtin_prefetch(next + l * kLine, 0, 1);  // into L2 (prefetcht2)
    if (--rows_left > 0) next += stride;  // never past the region's last row
  }

  static constexpr int64_t kLine = 64;
  static constexpr int64_t kContiguousRow = 4 * kLine;
};

// The streams of one prefill task: gate and up rows of the next (block, row tile)
// task, or the next block's down tile in a column task.
struct PrefetchStreams {
  PrefetchStream gate, up, down;
};

}  // namespace dsmoe::cpu
