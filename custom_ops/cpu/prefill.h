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
// Plan: X rows packed into panels (full and narrow, cpu/plan.h); per (block,
// row tile) task the fused gate/up GEMM of every panel of the block with
// act(g) * u * g_i * c in its epilogue; per output column tile the down GEMMs
// of all panels added into Y (each task owns its columns: no write conflicts,
// no reduction, the same order at any thread count). While a gate/up task runs it
// prefetches the weights of the task after it (the pool hands tasks out in
// order), a column task those of its next block.
#pragma once

#include <algorithm>
#include <cstdint>
#include <tuple>
#include <utility>
#include <vector>

#include "cpu/parallel.h"
#include "cpu/plan.h"
#include "cpu/prefetch.h"

namespace dsmoe::cpu {

struct NoPrefetch {
  std::pair<PrefetchStream, PrefetchStream> gate_up(int64_t, int64_t, int64_t) const { return {}; }
  PrefetchStream down(int64_t, int64_t, int64_t) const { return {}; }
};

template <typename GateUpRows, typename DownTile, typename Prefetch>
void PrefillChunk(const Ort::KernelContext& ctx, const KernelSet& ks, Activation activation, const FfnDims& dims,
                  const float* x, const Routing& routing, const PairsByBlock& sorted, bool first, float* y,
                  const GateUpRows& gate_up_rows, const DownTile& down_tile, const Prefetch& prefetch) {
  const int64_t n = dims.num_blocks, d = dims.hidden, B = dims.block_size, N = dims.num_tokens;
  const int64_t* pair_token = sorted.pair_token.get();
  const std::vector<Panel> panels = CutPanels(sorted, n, ks);
  const int64_t slots = PanelSlots(panels);
  const std::vector<int64_t> panel_start = PanelStarts(panels, n);

  // Packed X (panel q is [d][width] at xp + offset * d) and per-slot coefficients g_i * c.
  auto xp = CallScratch<float>(ctx, slots * d);
  auto cp = CallScratch<float>(ctx, slots);
  PackPanels(ctx, ks, panels, x, d, sorted, routing, n, xp.get(), cp.get());

  // hp: panel q is [B][width] at hp + offset * B: h of the panel's tokens, already scaled by g_i * c.
  auto hp = CallScratch<float>(ctx, slots * B);
  const int64_t task_rows = PrefillRowsPerTask(d);
  const int64_t row_tasks = CeilDiv(B, task_rows);
  const std::vector<int64_t> task_block = BlocksWithPanels(panel_start, n);
  const size_t gate_up_tasks = task_block.size() * static_cast<size_t>(row_tasks);
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
    const auto [gate, up] = gate_up_rows(i, r0, rows);  // once for all the block's panels
    for (int64_t q = panel_start[i]; q < panel_start[i + 1]; ++q) {
      const Panel& pn = panels[q];
      const auto gate_up = pn.width == ks.panel ? ks.panel_gate_up : ks.narrow_panel_gate_up;
      gate_up(activation, gate, up, rows, d, xp.get() + pn.offset * d, cp.get() + pn.offset,
              hp.get() + pn.offset * B + r0 * pn.width, pf);
    }
  });

  const int64_t cols = PrefillColsPerTask(dims);
  const int64_t col_tasks = CeilDiv(d, cols);
  ParallelFor(ctx, static_cast<size_t>(col_tasks), [&](size_t task) {
    const int64_t c0 = static_cast<int64_t>(task) * cols;
    const int64_t width = std::min(cols, d - c0);
    if (first) {
      for (int64_t t = 0; t < N; ++t) std::fill(y + t * d + c0, y + t * d + c0 + width, 0.0f);
    }
    float* buffer = ThreadBuffer(ThreadSlot::kDownTile, B * width);
    std::pair<const float*, int64_t> vp{buffer, width};
    float* rows[64];  // output rows of a panel's tokens (panel widths <= 64)
    int64_t tile_block = -1;
    PrefetchStreams pf;
    for (const Panel& pn : panels) {
      if (pn.block != tile_block) {  // once per block: the panels are in block order
        vp = down_tile(pn.block, c0, width, buffer);
        tile_block = pn.block;
        const size_t next = static_cast<size_t>(panel_start[pn.block + 1]);  // the next block's first panel
        pf.down = next < panels.size() ? prefetch.down(panels[next].block, c0, width) : PrefetchStream{};
      }
      for (int t = 0; t < pn.count; ++t) rows[t] = y + pair_token[pn.first + t] * d + c0;
      const auto down = pn.width == ks.panel ? ks.panel_down : ks.narrow_panel_down;
      down(hp.get() + pn.offset * B, vp.first, B, vp.second, width, rows, pn.count, pf);
    }
  });
}

}  // namespace dsmoe::cpu
