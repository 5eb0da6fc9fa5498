// The decode path's scaffolding, shared by the float32 kernel (ffn_cpu.cc) and the
// quantized one (ffn_cpu_quant.cc); they differ only in how a task reads its weights.
//
// The pairs are sorted by block. Each active block's rows are cut into at most
// kDecodeGroups groups of slabs (work for every thread even when k = 1), and only
// the active blocks' (block, group) tasks go to the pool. When the blocks have
// several tokens each, a block gets only as many groups as it takes to make
// kDecodeMinTasks tasks: every group adds a partial of d floats per pair that is
// zeroed, written and summed (DecodeGroups). A task owns one partial
// output per (pair, group), zeroed here before it runs, so there are no write
// conflicts. A second pass sums the partials per token in a fixed order
// (SumDecodePartials), so the result does not depend on the thread count.
#pragma once

#include <algorithm>
#include <cstdint>
#include <utility>
#include <vector>

#include "cpu/parallel.h"
#include "cpu/plan.h"

namespace dsmoe::cpu {

struct DecodeTask {
  int64_t block, group;            // block i, its row group
  int64_t first_pair, last_pair;   // block i's pairs [first, last) in the sorted order
  int64_t slab_begin, slab_end;    // the group's slabs of slab_rows rows
  const int64_t* pair_token;       // token of each sorted pair
  float* partial;                  // [pairs, groups, d]
  int64_t groups, d;
  float* out(int64_t pair) const { return partial + (pair * groups + group) * d; }
};

// Row groups per active block. Measured (30 layers from DRAM, Intel Xeon, 2 threads), against
// min(slabs, kDecodeGroups) for every call: d = 576, n = 16, 16 tokens 1.07-1.09 -> 0.93-0.99
// of dense, 8 tokens 0.93 -> 0.85, 4 tokens 0.91 -> 0.87; d = 576, n = 8, 16 tokens 1.09 -> 1.03;
// d = 2048, 16 tokens 1.30 -> 1.26. One token (one pair per block) keeps the finer cut while fewer
// than kDecodeRunsMinActive blocks are active (two a thread on two threads); from there on a task
// takes enough consecutive slabs of its block to read kDecodeTaskRunBytes of each matrix, in turn.
// Short slabs gain: int4 at d = 576 (9 KB a matrix, so a task is a whole block of 96 rows) took
// 3-6 % less time a call than slabs claimed apart by the two threads (quant-kernel-notes #20).
// Slabs of 24 KB or more stay one a task: float32 from d = 192 on (73 KB at d = 576, where whole
// blocks measured no different) and int4 at d = 2048 (32 KB), whose fine cut also evens out the
// threads' shares of a few large blocks.
inline constexpr int64_t kDecodeRunsMinActive = 4;
inline constexpr int64_t kDecodeTaskRunBytes = 24 * 1024;
inline int64_t DecodeGroups(const PairsByBlock& sorted, int64_t n, int64_t slabs, int64_t slab_bytes) {
  int64_t active = 0;
  for (int64_t i = 0; i < n; ++i) active += sorted.block_start[i + 1] > sorted.block_start[i];
  const int64_t most = std::min(slabs, kDecodeGroups);
  if (sorted.pairs <= active) {
    if (active < kDecodeRunsMinActive) return most;
    return std::min(most, CeilDiv(slabs, CeilDiv(kDecodeTaskRunBytes, std::max<int64_t>(slab_bytes, 1))));
  }
  return std::clamp<int64_t>(CeilDiv(kDecodeMinTasks, active), 1, most);
}

// The tasks of one decode call: the active blocks' (block, row group) pairs and the partial
// outputs they write. Plan, run every task (here through one ParallelFor; ProjectedSparseFFN
// runs them inside its own pass of the pool), then SumDecodePartials.
struct DecodePlan {
  PairsByBlock sorted;
  int64_t slabs = 0, groups = 1, slabs_per_group = 1, d = 0;
  std::vector<int64_t> tasks;  // i * groups + group, active blocks only: the pool's chunks of work stay even
  ScratchArray<float> partial;  // [pairs, groups, d]

  // Zeroes task `index`'s partial outputs, then runs task(const DecodeTask&) on them.
  template <typename Task>
  void Run(size_t index, const Task& task) const {
    const int64_t i = tasks[index] / groups, grp = tasks[index] % groups;
    const int64_t s_begin = grp * slabs_per_group;
    const DecodeTask t{i, grp, sorted.block_start[i], sorted.block_start[i + 1], s_begin,
                       std::min(slabs, s_begin + slabs_per_group), sorted.pair_token.get(), partial.get(), groups, d};
    for (int64_t p = t.first_pair; p < t.last_pair; ++p) std::fill(t.out(p), t.out(p) + d, 0.0f);
    if (t.slab_begin < t.slab_end) task(t);
  }
};

// row_bytes: the bytes of one of a block's gate (or up, or down) rows as the task reads them.
inline DecodePlan PlanDecode(const Ort::KernelContext& ctx, const FfnDims& dims, const Routing& routing,
                             int64_t slab_rows, int64_t row_bytes) {
  const int64_t n = dims.num_blocks, d = dims.hidden, B = dims.block_size;
  PairsByBlock sorted = SortPairsByBlock(routing.active.get(), n, dims.num_tokens);
  const int64_t slabs = CeilDiv(B, slab_rows);
  const int64_t groups = DecodeGroups(sorted, n, slabs, slab_rows * row_bytes);
  auto partial = CallScratch<float>(ctx, sorted.pairs * groups * d);
  std::vector<int64_t> tasks;
  tasks.reserve(static_cast<size_t>(n * groups));
  for (int64_t i = 0; i < n; ++i) {
    if (sorted.block_start[i] == sorted.block_start[i + 1]) continue;
    for (int64_t grp = 0; grp < groups; ++grp) tasks.push_back(i * groups + grp);
  }
  return {std::move(sorted), slabs, groups, CeilDiv(slabs, groups), d, std::move(tasks), std::move(partial)};
}

// task(const DecodeTask&) accumulates h . V over its slabs into out(p) of each of its pairs.
template <typename Task>
void DecodeSlabs(const Ort::KernelContext& ctx, const FfnDims& dims, const Routing& routing, int64_t slab_rows,
                 int64_t row_bytes, const Task& task, float* y) {
  const DecodePlan plan = PlanDecode(ctx, dims, routing, slab_rows, row_bytes);
  ParallelFor(ctx, plan.tasks.size(), [&](size_t index) { plan.Run(index, task); });
  SumDecodePartials(ctx, dims, routing, plan.sorted, plan.groups, plan.partial.get(), y);
}

}  // namespace dsmoe::cpu
