// The prefill path of one chunk of pairs, shared by the float32 kernel
// (ffn_cpu.cc) and the quantized one (ffn_cpu_quant.cc). They differ only in
// where a task's weights come from, which the caller passes in:
//
//   gate_up_rows(i, r0, rows) -> std::pair<const float*, const float*>: rows
//       [r0, r0 + rows) of block i's gate and up weights as float32 rows of d
//       values (row stride d): the weights in place, or a per-thread
//       dequantized tile;
//   down_tile(i, c0, width, tile) -> (const float* v, int64_t ld): block i's
//       V[:, c0:c0 + width] as B rows ld floats apart (ld <= 64): in place when
//       the weights are stored in column tiles, else written to `tile` (a
//       per-thread buffer) with ld = width;
//   prefetch: where those weights lie in memory, for the software prefetch of
//       the next task's (cpu/prefetch.h): prefetch.gate_up(i, r0, rows) ->
//       std::pair<PrefetchStream, PrefetchStream> and prefetch.down(i, c0, width)
//       -> PrefetchStream; NoPrefetch where there is nothing to gain.
//
// Plan: per (block, row tile) task the fused gate/up GEMM of every panel of the
// block with act(g) * u * g_i * c in its epilogue, X packed into the block's
// panels (full and narrow, cpu/plan.h) by the thread that runs it (PackedBlock);
// per output column tile the down GEMMs of all panels added into Y, a token's first
// block storing instead, so Y is not zeroed first (each task owns
// its columns: no write conflicts, no reduction, the same order at any thread
// count). While a gate/up task runs it prefetches the weights of the task after it
// (ORT's pool gives each thread a contiguous range of tasks first), a column task
// those of its next block.
#pragma once

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <tuple>
#include <utility>
#include <vector>

#include "cpu/parallel.h"
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

template <typename GateUpRows, typename DownTile, typename Prefetch>
void PrefillChunk(const Ort::KernelContext& ctx, const KernelSet& ks, Activation activation, const FfnDims& dims,
                  const float* x, const Routing& routing, const PairsByBlock& sorted, bool first,
                  const int64_t* first_block, float* y,
                  const GateUpRows& gate_up_rows, const DownTile& down_tile, const Prefetch& prefetch) {
  const int64_t n = dims.num_blocks, d = dims.hidden, B = dims.block_size, N = dims.num_tokens;
  const int64_t* pair_token = sorted.pair_token.get();
  const std::vector<Panel> panels = CutPanels(sorted, n, ks);
  const int64_t slots = PanelSlots(panels);
  const std::vector<int64_t> panel_start = PanelStarts(panels, n);

  // hp: panel q is [B][width] at hp + offset * B: h of the panel's tokens, already scaled by g_i * c.
  auto hp = CallScratch<float>(ctx, slots * B);
  const int64_t task_rows = PrefillRowsPerTask(d);
  const int64_t row_tasks = CeilDiv(B, task_rows);
  const std::vector<int64_t> task_block = BlocksWithPanels(panel_start, n);
  const size_t gate_up_tasks = task_block.size() * static_cast<size_t>(row_tasks);
  const uint64_t chunk_id = NextPrefillChunkId();
  auto task_rows_of = [&](size_t task) {  // (block, first row, rows) of a gate/up task
    const int64_t r0 = static_cast<int64_t>(task % static_cast<size_t>(row_tasks)) * task_rows;
    return std::tuple{task_block[task / static_cast<size_t>(row_tasks)], r0, std::min(task_rows, B - r0)};
  };
  ParallelFor(ctx, gate_up_tasks, [&](size_t task) {
    const auto [i, r0, rows] = task_rows_of(task);
    PrefetchStreams pf;
    if (task + 1 < gate_up_tasks) {
      const auto [i2, r2, rows2] = task_rows_of(task + 1);
      std::tie(pf.gate, pf.up) = prefetch.gate_up(i2, r2, rows2);
    }
    const auto [xb, cb] = PackedBlock(ks, panels, panel_start, i, x, d, pair_token, routing, n, chunk_id);
    const int64_t base = panels[panel_start[i]].offset;
    const auto [gate, up] = gate_up_rows(i, r0, rows);  // once for all the block's panels
    for (int64_t q = panel_start[i]; q < panel_start[i + 1]; ++q) {
      const Panel& pn = panels[q];
      const auto gate_up = pn.width == ks.panel ? ks.panel_gate_up : ks.narrow_panel_gate_up;
      gate_up(activation, gate, up, rows, d, xb + (pn.offset - base) * d, cb + (pn.offset - base),
              hp.get() + pn.offset * B + r0 * pn.width, pf);
    }
  });

  const int64_t cols = PrefillColsPerTask(dims);
  const int64_t col_tasks = CeilDiv(d, cols);
  ParallelFor(ctx, static_cast<size_t>(col_tasks), [&](size_t task) {
    const int64_t c0 = static_cast<int64_t>(task) * cols;
    const int64_t width = std::min(cols, d - c0);
    if (first) {  // the others' first down GEMM stores their outputs (first_block)
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
    for (const Panel& pn : panels) {
      if (pn.block != tile_block) {  // once per block: the panels are in block order
        vp = down_tile(pn.block, c0, width, buffer);
        tile_block = pn.block;
        const size_t next = static_cast<size_t>(panel_start[pn.block + 1]);  // the next block's first panel
        pf.down = next < panels.size() ? prefetch.down(panels[next].block, c0, width) : PrefetchStream{};
      }
      for (int t = 0; t < pn.count; ++t) {
        const int64_t token = pair_token[pn.first + t];
        rows[t] = y + token * d + c0;
        fresh[t] = first_block[token] == pn.block;
      }
      const auto down = pn.width == ks.panel ? ks.panel_down : ks.narrow_panel_down;
      down(hp.get() + pn.offset * B, vp.first, B, vp.second, width, rows, fresh, pn.count, pf);
    }
  });
}

}  // namespace dsmoe::cpu
