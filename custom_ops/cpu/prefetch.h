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
// Rows should span a few cache lines (256 bytes: 4 lines a step). No address
// outside the region is formed: the last row of a range takes only its own lines.
struct PrefetchStream {
  const char* next = nullptr;
  int64_t rows_left = 0, stride = 0;
  int lines = 0, last_lines = 0;  // cache lines per row, and in the last row

  static PrefetchStream Rows(const void* base, int64_t rows, int64_t row_bytes, int64_t stride) {
    const int lines = static_cast<int>(Lines(row_bytes));
    return {static_cast<const char*>(base), rows, stride, lines, lines};
  }
  // A contiguous range, in rows of kContiguousRow bytes.
  static PrefetchStream Range(const void* base, int64_t bytes) {
    const int64_t rows = (bytes + kContiguousRow - 1) / kContiguousRow;
    if (rows <= 0) return {};
    PrefetchStream s = Rows(base, rows, kContiguousRow, kContiguousRow);
    s.last_lines = static_cast<int>(Lines(bytes - (rows - 1) * kContiguousRow));
    return s;
  }

  void Step() {
    if (rows_left <= 0) return;
    const int count = rows_left == 1 ? last_lines : lines;
    for (int l = 0; l < count; ++l) __builtin_prefetch(next + l * kLine, 0, 1);  // into L2 (prefetcht2)
    if (--rows_left > 0) next += stride;  // never past the region's last row
  }

  static constexpr int64_t kLine = 64;
  static constexpr int64_t kContiguousRow = 4 * kLine;

 private:
  static int64_t Lines(int64_t bytes) { return (bytes + kLine - 1) / kLine; }
};

// Every cache line of [base, base + bytes) into L2 now, for a short region that the code reads
// next: its demand misses would otherwise come one page at a time before the hardware
// prefetchers follow (cpu/ffn_cpu_quant.cc, the decode's slabs). The region's last byte is
// prefetched too: an unaligned region ends in a line that the steps from base skip.
inline void PrefetchWhole(const void* base, int64_t bytes) {
  if (bytes <= 0) return;
  const char* p = static_cast<const char*>(base);
  for (int64_t offset = 0; offset < bytes; offset += PrefetchStream::kLine) __builtin_prefetch(p + offset, 0, 1);
  __builtin_prefetch(p + bytes - 1, 0, 1);
}

// The streams of one prefill task: gate and up rows of the next (block, row tile)
// task, or the next block's down tile in a column task.
struct PrefetchStreams {
  PrefetchStream gate, up, down;
};

}  // namespace dsmoe::cpu
