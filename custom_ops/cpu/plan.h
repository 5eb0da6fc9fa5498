// The steps both CPU kernels (float32: ffn_cpu.cc; quantized: ffn_cpu_quant.cc)
// share: routing, the pairs sorted by block, the prefill's chunks and panels,
// the decode path's final sum, and per-call memory.
#pragma once

#include <algorithm>
#include <cstdint>
#include <memory>
#include <vector>

#include "common/ffn_params.h"
#include "common/scratch.h"
#include "cpu/kernels.h"

namespace dsmoe::cpu {

// The GEMV path (weights streamed from memory once, reused from L2 for every
// kMaxDotTokens tokens of a block) or the GEMM path, whose panels waste work on
// small buckets and whose tiles small blocks feed poorly (UsesDecodePath). Calls of
// up to kDecodeMaxTokens tokens always take the GEMV path; up to
// kDecodeRoutedMaxTokens, when the active blocks have at most a kernel's DecodeBounds
// tokens each on average (one bound for blocks of at most kSmallBlockRows rows, one for
// larger ones). Float32 kernel, measured (2 threads, AVX-512, Intel Xeon): op level with the
// caches flushed, 8 tokens, about 4 a block: 0.82-0.94 of the dense FFN against
// 0.89-1.11 on the GEMM path (d = 576-2048; int4 0.76 / 0.52 against 0.88 / 1.10 at
// d = 576 / 2048); 16 tokens, about 8 a block: 0.89 / 1.90 / 7.69 ms against 0.98 /
// 2.47 / 8.20 at d = 576 / 1024 / 2048. 30 layers from DRAM, 16 tokens, 9-10 a block:
// 1.07 / 1.12 of dense against 1.22 / 1.22 at d = 576 (B = 96), but 1.42 against 1.30
// at d = 2048 (B = 704). The token bound caps the partial outputs' scratch (pairs x
// kDecodeGroups x d floats, as for kDecodeMaxTokens tokens).
inline constexpr int64_t kDecodeMaxTokens = 6;
inline constexpr int64_t kDecodeRoutedMaxTokens = 16;
inline constexpr int64_t kSmallBlockRows = 128;
struct DecodeBounds {
  int64_t small_blocks, large_blocks;  // mean tokens a block, blocks of <= / > kSmallBlockRows rows
};
inline constexpr DecodeBounds kFloatDecodeBounds{12, 8};
// The quantized kernel dequantizes the gate/up rows again for every kMaxQuantDotTokens
// tokens of a block, while its GEMM path dequantizes each tile once, then runs the float32
// GEMM: the GEMV path wins up to about 8 tokens a block at d = 576 (B = 96; quant-kernel-notes
// #9: 30 layers from DRAM, int4, 7.3 a block: 0.83 of the GEMM path's time, 9.7 a block
// 1.00-1.07) and 9 at d = 2048 (B = 704; since the GEMM path reads slabs, #14: 8 layers, int4,
// 5.9 / 7.9 / 8.2 a block 0.70 / 0.99 / 0.97 of its time, 9.8 / 10.2 / 10.5 a block 1.06 / 1.16 /
// 1.12; it was 12 before).
inline constexpr DecodeBounds kQuantDecodeBounds{8, 9};

// Task tiling of both kernels (the quantized one rounds decode slabs up to whole scale groups).
inline constexpr int64_t kDecodeRows = 32;          // decode slab: gate, up and down rows, 3 * 32 * d floats, L2-resident
inline constexpr int64_t kDecodeGroups = 8;         // row groups per block in the decode path, at most
inline constexpr int64_t kDecodeMinTasks = 16;      // (block, group) tasks a multi-token decode call aims for
// Rows of gate + up per prefill task: 2 * rows * d floats stay in L2 (24 rows at
// d = 2048, 393 KB) while the block's panels stream past them; a multiple of the
// register tiles' 6 (AVX-512) and 3 rows.
inline int64_t PrefillRowsPerTask(int64_t d) {
  constexpr int64_t kTileFloats = 2 * 24 * 2048;
  return std::min<int64_t>(24, std::max<int64_t>(6, kTileFloats / (2 * std::max<int64_t>(d, 1)) / 6 * 6));
}
inline constexpr int64_t kPrefillColsPerTask = 64;  // down tile: B x 64 floats of V_i, reused by all panels
// Weight rows shorter than a page (d < 1024): several of a prefill tile's row streams share
// each page, which the hardware prefetchers do not follow; the prefill prefetches the next
// task's weights itself (cpu/prefetch.h, cpu-kernel-notes #27).
inline bool PrefillShortRows(int64_t d) { return d * static_cast<int64_t>(sizeof(float)) < 4096; }
// Output columns per prefill column task: half tiles in the rows layout at short rows (the
// tile is copied per task either way), so that d = 576 makes 18 tasks, which split 9 / 9 over
// two threads, not 9 (5 / 4; #28). The tiled layout's tasks read whole tiles.
inline int64_t PrefillColsPerTask(const FfnDims& dims) {
  return dims.down_tile == 0 && PrefillShortRows(dims.hidden) ? kPrefillColsPerTask / 2 : kPrefillColsPerTask;
}


template <typename T>
std::unique_ptr<T[]> HeapArray(int64_t count) {  // uninitialised: every element is written before it is read
  return std::unique_ptr<T[]>(new T[static_cast<size_t>(count > 1 ? count : 1)]);
}

// Large per-call buffers (packed X, h, decode partials) come from the session's
// CPU allocator (common/scratch.h): ORT's arena hands out cached chunks, where
// fresh allocations would be mapped, page-faulted and zeroed at every call.
const OrtMemoryInfo& CpuMemory();

template <typename T>
ScratchArray<T> CallScratch(const Ort::KernelContext& ctx, int64_t count) {
  return ScratchArray<T>(ctx, CpuMemory(), count, "CPU");
}

// Per-pool-thread scratch that only grows, for one task's own tiles: dequantized
// weights, copied down tiles. (Buffers that tasks share come from CallScratch.)
// Fresh allocations of these sizes would be mmap'ed and page-faulted in at every
// call: 15 % of an int4 decode call's samples were the kernel zeroing pages.
enum class ThreadSlot { kGateTile, kUpTile, kDownTile, kPanels, kCount };
float* ThreadBuffer(ThreadSlot slot, int64_t count);

// Routing of one call: for token t and block i, coef[t * n + i] = g_i * c
// (0 when inactive) and active[t * n + i]; logits in float32.
struct Routing {
  std::unique_ptr<float[]> coef;
  std::unique_ptr<bool[]> active;
};

Routing Route(const Ort::KernelContext& ctx, const KernelSet& ks, const FfnAttributes& attrs, const FfnDims& dims,
              const float* x, const float* router, const float* bias);
// The same in parts, for a pass of several phases (cpu/prefill.h): a routing to fill, and its
// RoutingTasks(dims) tasks of consecutive tokens.
Routing NewRouting(const FfnDims& dims);
int64_t RoutingTasks(const FfnDims& dims);
void RouteTask(const KernelSet& ks, const FfnAttributes& attrs, const FfnDims& dims, const float* x,
               const float* router, const float* bias, int64_t task, Routing& r);

// Whether the call takes the GEMV (decode) path, from its token count and routing (above);
// bounds: the kernel's bound on the active blocks' mean tokens (kFloatDecodeBounds,
// kQuantDecodeBounds).
bool UsesDecodePath(const FfnDims& dims, const Routing& routing, const DecodeBounds& bounds);
// Whether UsesDecodePath can be true for a call of this many tokens (else the prefill path
// routes in its own pass).
inline bool MayUseDecodePath(const FfnDims& dims) { return dims.num_tokens <= kDecodeRoutedMaxTokens; }

// The op's outputs: Y, and `active` where the node has that optional output (else nullptr).
struct Outputs {
  float* y;
  bool* active;
};
Outputs GetOutputs(Ort::KernelContext& ctx, const FfnDims& dims);

// Copies the routing's active flags into `active` when it is given.
void WriteActive(const Routing& routing, const FfnDims& dims, bool* active);

// The active pairs of a call sorted by block (tokens ascending within a
// block): pairs of block i are [block_start[i], block_start[i + 1]), pair_token[p]
// is the token of pair p.
struct PairsByBlock {
  std::unique_ptr<int64_t[]> block_start, pair_token;
  int64_t pairs = 0;
};

PairsByBlock SortPairsByBlock(const bool* active, int64_t n, int64_t num_tokens);

// Decode's second pass: y[t] = the sum of token t's partial outputs
// partial[(pair * groups + g) * d + c] over its active blocks (ascending) and
// the groups (ascending), in tasks of (token, chunk of kDecodeSumColumns columns);
// k = 0 gives exact zeros.
inline constexpr int64_t kDecodeSumColumns = 256;
struct DecodeSums {
  DecodeSums(const FfnDims& dims, const Routing& routing, const PairsByBlock& sorted, int64_t groups,
             const float* partial);
  size_t Tasks(int64_t num_tokens) const { return static_cast<size_t>(num_tokens * col_tasks); }
  void Run(size_t task, float* y) const;  // writes y[t][c0, c1) of the task's token and chunk

  int64_t n, d, groups, col_tasks;
  const bool* active;
  const float* partial;
  std::unique_ptr<int64_t[]> pair_of;  // [t * n + i]: the pair of (token t, block i) when active
};
// All of them: on the calling thread when small, else in parallel.
void SumDecodePartials(const Ort::KernelContext& ctx, const FfnDims& dims, const Routing& routing,
                       const PairsByBlock& sorted, int64_t groups, const float* partial, float* y);

// Prefill chunks: ranges [p0, p1) of the pairs of all tokens sorted by block,
// each at most max(256, 2M / max(d, B)) pairs (a chunk's h is pairs * B floats, a
// block's packed X, in the buffer of each thread that runs it, at most pairs * d: at
// most 8 MB each). Chunks hold whole blocks
// where they fit, so that every block's weights are read once per call and its
// tokens fill full panels; only a block with more pairs than the bound is cut,
// into about equal parts. At least one chunk (empty when no pair is active).
std::vector<std::pair<int64_t, int64_t>> PrefillChunks(const PairsByBlock& sorted, const FfnDims& dims);

// Pairs [p0, p1) of `sorted` as a PairsByBlock of their own.
PairsByBlock SliceOfPairs(const PairsByBlock& sorted, int64_t n, int64_t p0, int64_t p1);

// A prefill call's pairs sorted by block and cut into chunks (PrefillChunks), which run in
// order; first_block[t]: the lowest active block of token t (-1: none), whose down GEMM
// stores token t's output instead of adding to it, so the output needs no zeroing pass
// (chunks run in block order; the first chunk zeroes the outputs of tokens with no block).
struct PrefillChunking {
  PrefillChunking(const Routing& routing, const FfnDims& dims);
  PairsByBlock all;
  std::unique_ptr<int64_t[]> first_block;
  std::vector<std::pair<int64_t, int64_t>> chunks;
};

// At most this many chunks for a call of these dimensions (sizes a pass before routing): at
// most one ending at each block's end, plus the cuts of the blocks over the chunk bound.
int64_t MaxPrefillChunks(const FfnDims& dims);

// A panel: `count` consecutive pairs of one block (from pair `first`), packed
// `width` tokens wide (full or narrow panel; count <= width, the rest padding);
// `offset` counts the token slots of the panels before it.
struct Panel {
  int64_t block, first, offset;
  int count, width;
};

// Each block's pairs in full panels of ks.panel tokens; a last part of at most
// ks.narrow_panel tokens goes to a narrow panel (a full one would pad it up).
std::vector<Panel> CutPanels(const PairsByBlock& sorted, int64_t n, const KernelSet& ks);

// The panels' total width in token slots (packed X holds slots * d floats).
inline int64_t PanelSlots(const std::vector<Panel>& panels) {
  return panels.empty() ? 0 : panels.back().offset + panels.back().width;
}

// Panels of block i: [start[i], start[i + 1]) in CutPanels' order.
std::vector<int64_t> PanelStarts(const std::vector<Panel>& panels, int64_t n);

// The blocks that have panels, ascending.
std::vector<int64_t> BlocksWithPanels(const std::vector<int64_t>& panel_start, int64_t n);

}  // namespace dsmoe::cpu
