// The prefill path of a call, shared by the float32 kernel
// (ffn_cpu.cc) and the quantized one (ffn_cpu_quant.cc). They differ only in
// where a task's weights come from, which the caller passes in:
//
//   gate_up_rows(i, r0, rows) -> std::pair<const float*, const float*>: rows
//       [r0, r0 + rows) of block i's gate and up weights as float32 rows of d
//       values (row stride d): the weights in place, or a per-thread
//       dequantized tile; with gate/up in slabs (dims.gate_up_tile: the float32 op's layout,
//       or the quantized op's dequantized tiles), the slabs from row r0 on (r0 a multiple of
//       kSlabRows, each slab [d][kSlabRows]);
//   down_tile(i, c0, width, tile) -> (const float* v, int64_t ld): block i's
//       V[:, c0:c0 + width] as B rows ld floats apart (ld <= 64): in place when
//       the weights are stored in column tiles, else written to `tile` (a
//       per-thread buffer) with ld = width;
//   prefetch: where those weights lie in memory, for the software prefetch of
//       the next task's (cpu/prefetch.h): prefetch.gate_up(i, r0, rows) ->
//       std::pair<PrefetchStream, PrefetchStream> and prefetch.down(i, c0, width)
//       -> PrefetchStream; NoPrefetch where there is nothing to gain.
//
// Plan, in one pass of ORT's pool (cpu/phases.h): the routing (unless the caller has routed
// already), then per chunk of pairs (PrefillChunking) two phases. Gate/up: per (block, row
// tile) task the fused gate/up GEMM of every panel of the block with act(g) * u * g_i * c in
// its epilogue, X packed into the block's panels (full and narrow, cpu/plan.h) by the thread
// that runs it (PackedBlock), or with gate/up in k-major slabs (dims.gate_up_tile) a slab's
// GEMM over all the block's tokens read in place (SlabGateUpTask); h lands in the panels'
// layout either way. A thread takes a block's row tasks in order (TaskRanges) and
// prefetches the weights of its next task. Down: per output column tile the down GEMMs of all
// panels added into Y, a token's first block storing instead, so Y is not zeroed first (each
// task owns its columns: no write conflicts, no reduction, the same order at any thread
// count); a column task prefetches its next block's tile. The pool's workers wake once a
// call, not twice per chunk plus once for the routing (cpu-kernel-notes #39).
#pragma once

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <memory>
#include <optional>
#include <stdexcept>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#include "cpu/parallel.h"
#include "cpu/phases.h"
#include "cpu/plan.h"
#include "cpu/prefetch.h"

namespace dsmoe::cpu {

// A number no other prefill chunk of the process has had: it tags the per-thread packed panels.
inline uint64_t NextPrefillChunkId() {
  static std::atomic<uint64_t> next{1};
  return next.fetch_add(1, std::memory_order_relaxed);
}

// Block i's panels packed (X as [d][width] per panel, then one coefficient g_i * c per slot),
// in this thread's buffer: packed by the first of the block's gate/up tasks this thread runs
// in chunk `chunk`, reused by the next ones. ORT's pool gives each thread a contiguous range of
// the tasks first, so a block's row tasks mostly run on one thread and it packs the block once;
// the panels stay in its L2 instead of going through a chunk-wide buffer (#29).
inline std::pair<const float*, const float*> PackedBlock(const KernelSet& ks, const std::vector<Panel>& panels,
                                                         const std::vector<int64_t>& panel_start, int64_t i,
                                                         const float* x, int64_t d, const int64_t* pair_token,
                                                         const Routing& routing, int64_t n, uint64_t chunk) {
  thread_local uint64_t packed_chunk = 0;
  thread_local int64_t packed_block = -1;
  const int64_t q0 = panel_start[i], q1 = panel_start[i + 1];
  const int64_t base = panels[q0].offset, block_slots = panels[q1 - 1].offset + panels[q1 - 1].width - base;
  float* xb = ThreadBuffer(ThreadSlot::kPanels, block_slots * (d + 1));
  float* cb = xb + block_slots * d;
  if (packed_chunk != chunk || packed_block != i) {
    for (int64_t q = q0; q < q1; ++q) {
      const Panel& pn = panels[q];
      const auto pack = pn.width == ks.panel ? ks.pack_panel : ks.pack_narrow_panel;
      pack(x, d, pair_token + pn.first, pn.count, xb + (pn.offset - base) * d);
      for (int t = 0; t < pn.width; ++t) {
        cb[pn.offset - base + t] = t < pn.count ? routing.coef[pair_token[pn.first + t] * n + pn.block] : 0.0f;
      }
    }
    packed_chunk = chunk;
    packed_block = i;
  }
  return {xb, cb};
}

struct NoPrefetch {
  std::pair<PrefetchStream, PrefetchStream> gate_up(int64_t, int64_t, int64_t) const { return {}; }
  PrefetchStream down(int64_t, int64_t, int64_t) const { return {}; }
};

// One chunk's panels and h (hp: panel q is [B][width] at hp + offset * B: h of the panel's
// tokens, already scaled by g_i * c); its gate/up tasks are row_tasks per block of task_block.
struct PrefillChunkPlan {
  PrefillChunkPlan(const Ort::KernelContext& ctx, const KernelSet& ks, const FfnDims& dims,
                   const PrefillChunking& chunking, size_t c)
      : pairs(SliceOfPairs(chunking.all, dims.num_blocks, chunking.chunks[c].first, chunking.chunks[c].second)),
        panels(CutPanels(pairs, dims.num_blocks, ks)),
        panel_start(PanelStarts(panels, dims.num_blocks)),
        task_block(BlocksWithPanels(panel_start, dims.num_blocks)),
        hp(CallScratch<float>(ctx, PanelSlots(panels) * dims.block_size)),
        first(c == 0),
        id(NextPrefillChunkId()) {}

  PairsByBlock pairs;
  std::vector<Panel> panels;
  std::vector<int64_t> panel_start, task_block;
  ScratchArray<float> hp;
  bool first;  // the call's first chunk: it zeroes the outputs of tokens with no active block
  uint64_t id;
};

// A gate/up task of the slab layout: one slab, rows [r0, r0 + rows) of block i (rows <= kSlabRows),
// for all the block's tokens in the chunk, up to kGroup tokens a kernel(tokens, xs, cs, m, hs, ld)
// call; h goes to the tokens' columns of their panels as in the rows layout, so the down phase is
// the same.
template <typename Kernel>
void SlabGateUpTask(const PrefillChunkPlan& c, int64_t i, const float* x, int64_t d, const Routing& routing,
                    int64_t n, int64_t B, int64_t r0, const Kernel& kernel) {
  constexpr int kGroup = 96;
  int64_t tokens[kGroup];
  const float* xs[kGroup];
  float* hs[kGroup];
  float cs[kGroup];
  int64_t ld[kGroup];
  int m = 0;
  const int64_t* pair_token = c.pairs.pair_token.get();
  for (int64_t q = c.panel_start[i]; q < c.panel_start[i + 1]; ++q) {
    const Panel& pn = c.panels[q];
    for (int t = 0; t < pn.count; ++t) {
      const int64_t token = pair_token[pn.first + t];
      tokens[m] = token;
      xs[m] = x + token * d;
      cs[m] = routing.coef[token * n + i];
      hs[m] = c.hp.get() + pn.offset * B + r0 * pn.width + t;
      ld[m] = pn.width;
      if (++m == kGroup) {
        kernel(tokens, xs, cs, m, hs, ld);
        m = 0;
      }
    }
  }
  if (m > 0) kernel(tokens, xs, cs, m, hs, ld);
}

// RunPrefill's slab kernel by default: the float32 slab GEMM on gate_up_rows' slabs. Otherwise a
// callable slab_gate_up(i, r0, rows, tokens, cs, m, hs, ld) that writes h = act(g) * u * cs[t] of
// the m tokens (ids `tokens`) for the slab's rows into hs[t][r * ld[t]].
struct FloatSlabGateUp {};

// One prefill call (more tokens than the decode path takes). `routed`: the call's routing
// when the caller has it (then it has written the active output); null: the pass routes
// `route_x` first and writes `active` (when not null). `route_x` is x but at accuracy_level 4,
// where the quantized ops route on X as given and compute on X rounded to int8.
template <typename GateUpRows, typename DownTile, typename Prefetch, typename SlabGateUp = FloatSlabGateUp>
void RunPrefill(const Ort::KernelContext& ctx, const KernelSet& ks, const FfnAttributes& attrs, const FfnDims& dims,
                const float* x, const float* route_x, const float* router, const float* bias, const Routing* routed,
                bool* active, float* y,
                const GateUpRows& gate_up_rows, const DownTile& down_tile, const Prefetch& prefetch,
                const SlabGateUp& slab_gate_up = {}) {
  const int64_t n = dims.num_blocks, d = dims.hidden, B = dims.block_size, N = dims.num_tokens;
  Routing own;
  if (routed == nullptr) own = NewRouting(dims);
  const Routing& routing = routed ? *routed : own;
  const bool slabs = dims.gate_up_tile != 0;  // gate/up in k-major slabs: no packed panels
  const int64_t task_rows = slabs ? kSlabRows : PrefillRowsPerTask(d);
  const int64_t row_tasks = CeilDiv(B, task_rows);
  const int64_t cols = PrefillColsPerTask(dims);
  const int64_t col_tasks = CeilDiv(d, cols);
  std::optional<PrefillChunking> chunking;
  std::optional<PrefillChunkPlan> chunk;
  // Each chunk's gate/up tasks in ranges of one block's row tasks; kept until the pass ends, as
  // a thread done claiming may still read its phase's while the next chunk is planned.
  std::vector<std::unique_ptr<TaskRanges>> ranges;
  size_t next_chunk = 0;

  auto begin_chunk = [&]() -> PhaseTasks {
    if (next_chunk == chunking->chunks.size()) return PhaseTasks::kEndPass;
    chunk.reset();  // its scratch back to the arena first
    chunk.emplace(ctx, ks, dims, *chunking, next_chunk++);
    const int64_t blocks = static_cast<int64_t>(chunk->task_block.size());
    std::vector<int64_t> starts(static_cast<size_t>(blocks + 1));
    for (int64_t j = 0; j <= blocks; ++j) starts[static_cast<size_t>(j)] = j * row_tasks;
    ranges.push_back(std::make_unique<TaskRanges>());
    ranges.back()->Reset(starts);
    return {blocks * row_tasks, ranges.back().get()};
  };
  auto task_rows_of = [&](int64_t task) {  // (block, first row, rows) of a gate/up task
    const int64_t r0 = task % row_tasks * task_rows;
    return std::tuple{chunk->task_block[static_cast<size_t>(task / row_tasks)], r0, std::min(task_rows, B - r0)};
  };
  auto gate_up_task = [&](int64_t task, int64_t next) {
    const PrefillChunkPlan& c = *chunk;
    // Plain variables, not a structured binding: the slab kernels' lambdas capture them (C++17).
    const std::tuple<int64_t, int64_t, int64_t> task_rows = task_rows_of(task);
    const int64_t i = std::get<0>(task_rows), r0 = std::get<1>(task_rows), rows = std::get<2>(task_rows);
    PrefetchStreams pf;
    if (next >= 0) {
      const auto [i2, r2, rows2] = task_rows_of(next);
      std::tie(pf.gate, pf.up) = prefetch.gate_up(i2, r2, rows2);
    }
    const int64_t* pair_token = c.pairs.pair_token.get();
    if (slabs) {
      if constexpr (std::is_same_v<SlabGateUp, FloatSlabGateUp>) {
        const std::pair<const float*, const float*> gate_up = gate_up_rows(i, r0, rows);
        SlabGateUpTask(c, i, x, d, routing, n, B, r0,
                       [&](const int64_t*, const float* const* xs, const float* cs, int m, float* const* hs,
                           const int64_t* ld) {
                         ks.slab_gate_up(attrs.activation, gate_up.first, gate_up.second, rows, d, xs, cs, m, hs,
                                         ld, pf);
                       });
      } else {
        SlabGateUpTask(c, i, x, d, routing, n, B, r0,
                       [&](const int64_t* tokens, const float* const*, const float* cs, int m, float* const* hs,
                           const int64_t* ld) { slab_gate_up(i, r0, rows, tokens, cs, m, hs, ld); });
      }
      return;
    }
    const auto [xb, cb] = PackedBlock(ks, c.panels, c.panel_start, i, x, d, pair_token, routing, n, c.id);
    const int64_t base = c.panels[c.panel_start[i]].offset;
    const auto [gate, up] = gate_up_rows(i, r0, rows);  // once for all the block's panels
    for (int64_t q = c.panel_start[i]; q < c.panel_start[i + 1]; ++q) {
      const Panel& pn = c.panels[q];
      const auto gate_up = pn.width == ks.panel ? ks.panel_gate_up : ks.narrow_panel_gate_up;
      gate_up(attrs.activation, gate, up, rows, d, xb + (pn.offset - base) * d, cb + (pn.offset - base),
              c.hp.get() + pn.offset * B + r0 * pn.width, pf);
    }
  };
  auto down_task = [&](int64_t task) {
    const PrefillChunkPlan& c = *chunk;
    const int64_t* pair_token = c.pairs.pair_token.get();
    const int64_t* first_block = chunking->first_block.get();
    const int64_t c0 = task * cols;
    const int64_t width = std::min(cols, d - c0);
    if (c.first) {  // the others' first down GEMM stores their outputs (first_block)
      for (int64_t t = 0; t < N; ++t) {
        if (first_block[t] < 0) std::fill(y + t * d + c0, y + t * d + c0 + width, 0.0f);
      }
    }
    float* buffer = ThreadBuffer(ThreadSlot::kDownTile, B * width);
    std::pair<const float*, int64_t> vp{buffer, width};
    float* rows[64];  // output rows of a panel's tokens (panel widths <= 64)
    bool fresh[64];   // whether this block is the token's first: store instead of add
    int64_t tile_block = -1;
    PrefetchStreams pf;
    for (const Panel& pn : c.panels) {
      if (pn.block != tile_block) {  // once per block: the panels are in block order
        vp = down_tile(pn.block, c0, width, buffer);
        tile_block = pn.block;
        const size_t next = static_cast<size_t>(c.panel_start[pn.block + 1]);  // the next block's first panel
        pf.down = next < c.panels.size() ? prefetch.down(c.panels[next].block, c0, width) : PrefetchStream{};
      }
      for (int t = 0; t < pn.count; ++t) {
        const int64_t token = pair_token[pn.first + t];
        rows[t] = y + token * d + c0;
        fresh[t] = first_block[token] == pn.block;
      }
      const auto down = pn.width == ks.panel ? ks.panel_down : ks.narrow_panel_down;
      down(c.hp.get() + pn.offset * B, vp.first, B, vp.second, width, rows, fresh, pn.count, pf);
    }
  };

  // Phase 0 routes; then chunk k's gate/up is phase 2k + 1 and its down phase 2k + 2.
  auto task = [&](int phase, int64_t i, int64_t next) {
    if (phase == 0) {
      RouteTask(ks, attrs, dims, route_x, router, bias, i, own);
    } else if (phase % 2 == 1) {
      gate_up_task(i, next);
    } else {
      down_task(i);
    }
  };
  const int64_t max_chunks = MaxPrefillChunks(dims);
  auto after = [&](int phase) -> PhaseTasks {
    if (phase == 0) {
      if (routed == nullptr) WriteActive(own, dims, active);
      chunking.emplace(routing, dims);
      // The pass has room for max_chunks; more would leave chunks unrun.
      if (static_cast<int64_t>(chunking->chunks.size()) > max_chunks) throw std::logic_error("prefill: too many chunks");
      return begin_chunk();
    }
    return phase % 2 == 1 ? PhaseTasks(col_tasks) : begin_chunk();
  };
  const int phases = static_cast<int>(1 + 2 * max_chunks);
  RunPhases(ctx, phases, routed ? 0 : RoutingTasks(dims), task, after);
}

}  // namespace dsmoe::cpu
