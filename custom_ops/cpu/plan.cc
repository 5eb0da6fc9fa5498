#include "cpu/plan.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <thread>
#if defined(__linux__)
#include <sched.h>
#endif

#include "cpu/parallel.h"
#include "cpu/phases.h"

namespace dsmoe::cpu {
namespace {

constexpr int64_t kRoutingTokensPerTask = 16;
// Decode partial sums up to this many floats run on the calling thread.
constexpr int64_t kInlineSumFloats = int64_t{1} << 16;
// Prefill chunks hold at most max(kPrefillMinPairs, kPrefillMaxFloats / max(d, B))
// active pairs: a chunk's h is pairs * B floats and a block's packed X (per thread) at
// most pairs * d, and every down task reads the chunk's h again. 8 MB: at d = 4096 the earlier 32 MB
// chunks (2048 pairs, 4 blocks at 512 tokens) made the 512-token call 6-27 % slower
// than 512-pair chunks, with no change measured at d = 2048 or 576 (cpu-kernel-notes
// #19). Small models get more pairs per chunk (d = 576, n = 16: 3640).
constexpr int64_t kPrefillMinPairs = 256;
constexpr int64_t kPrefillMaxFloats = int64_t{2} << 20;

}  // namespace

int AvailableCpus() {
#if defined(__linux__)
  cpu_set_t set;
  if (sched_getaffinity(0, sizeof(set), &set) == 0) return std::max(1, CPU_COUNT(&set));
#endif
  return std::max(1, static_cast<int>(std::thread::hardware_concurrency()));
}

const OrtMemoryInfo& CpuMemory() {
  // Created once and never released: releasing it at exit could run after ONNX Runtime's teardown.
  static const OrtMemoryInfo* info = Ort::MemoryInfo::CreateCpu(OrtArenaAllocator, OrtMemTypeDefault).release();
  return *info;
}

float* ThreadBuffer(ThreadSlot slot, int64_t count) {
  thread_local std::vector<float> buffers[static_cast<int>(ThreadSlot::kCount)];
  std::vector<float>& b = buffers[static_cast<int>(slot)];
  if (static_cast<int64_t>(b.size()) < count) b.resize(static_cast<size_t>(count));
  return b.data();
}

Routing NewRouting(const FfnDims& dims) {
  const int64_t cells = dims.num_tokens * dims.num_blocks;
  return Routing{HeapArray<float>(cells), HeapArray<bool>(cells)};
}

int64_t RoutingTasks(const FfnDims& dims) { return CeilDiv(dims.num_tokens, kRoutingTokensPerTask); }

void RouteTask(const KernelSet& ks, const FfnAttributes& attrs, const FfnDims& dims, const float* x,
               const float* router, const float* bias, int64_t task, Routing& r) {
  const int64_t n = dims.num_blocks, d = dims.hidden, N = dims.num_tokens;
  float* coef = r.coef.get();
  bool* active = r.active.get();
  const int64_t t0 = task * kRoutingTokensPerTask;
  const int64_t t1 = std::min(N, t0 + kRoutingTokensPerTask);
  // The logits, kMaxDotTokens tokens per pass over the router's rows (dot_rows' sums do not
  // depend on the count: the same bits as one token at a time).
  for (int64_t tb = t0; tb < t1; tb += kMaxDotTokens) {
    const int count = static_cast<int>(std::min<int64_t>(kMaxDotTokens, t1 - tb));
    const float* xs[kMaxDotTokens];
    for (int c = 0; c < count; ++c) xs[c] = x + (tb + c) * d;
    ks.dot_rows(router, d, n, xs, count, d, coef + tb * n, n);  // turned into coefficients in place
  }
  for (int64_t t = t0; t < t1; ++t) {
    float* ct = coef + t * n;
    bool* at = active + t * n;
    int64_t k = 0;
    for (int64_t i = 0; i < n; ++i) {
      const float logit = ct[i] + (bias ? bias[i] : 0.0f);
      const float s = 1.0f / (1.0f + std::exp(-logit));
      at[i] = s > attrs.threshold;  // false for a NaN logit
      ct[i] = attrs.weighting == Weighting::kScore ? s : 1.0f;
      k += at[i];
    }
    const float c = attrs.rescale && k > 0 ? static_cast<float>(n) / static_cast<float>(k) : 1.0f;
    for (int64_t i = 0; i < n; ++i) ct[i] = at[i] ? ct[i] * c : 0.0f;
  }
}

Routing Route(const Ort::KernelContext& ctx, const KernelSet& ks, const FfnAttributes& attrs, const FfnDims& dims,
              const float* x, const float* router, const float* bias) {
  Routing r = NewRouting(dims);
  ParallelFor(ctx, static_cast<size_t>(RoutingTasks(dims)), [&](size_t task) {
    RouteTask(ks, attrs, dims, x, router, bias, static_cast<int64_t>(task), r);
  });
  return r;
}

bool UsesDecodePath(const FfnDims& dims, const Routing& routing, const DecodeBounds& bounds) {
  const int64_t N = dims.num_tokens, n = dims.num_blocks;
  const int64_t max_pairs_per_block = dims.block_size <= kSmallBlockRows ? bounds.small_blocks : bounds.large_blocks;
  if (N <= kDecodeMaxTokens) return true;
  if (!MayUseDecodePath(dims)) return false;
  int64_t pairs = 0, blocks = 0;
  for (int64_t i = 0; i < n; ++i) {
    int64_t count = 0;
    for (int64_t t = 0; t < N; ++t) count += routing.active[t * n + i];
    pairs += count;
    blocks += count > 0;
  }
  return pairs <= max_pairs_per_block * blocks;
}

Outputs GetOutputs(Ort::KernelContext& ctx, const FfnDims& dims) {
  Outputs out{ctx.GetOutput(kY, dims.y_shape).GetTensorMutableData<float>(), nullptr};
  if (ctx.GetOutputCount() > kActive) {
    Ort::UnownedValue active = ctx.GetOutput(kActive, dims.active_shape);
    if (active) out.active = active.GetTensorMutableData<bool>();
  }
  return out;
}

void WriteActive(const Routing& routing, const FfnDims& dims, bool* active) {
  if (active != nullptr) {
    std::memcpy(active, routing.active.get(), static_cast<size_t>(dims.num_tokens * dims.num_blocks));
  }
}

PairsByBlock SortPairsByBlock(const bool* active, int64_t n, int64_t num_tokens) {
  PairsByBlock s{HeapArray<int64_t>(n + 1), nullptr};
  int64_t* start = s.block_start.get();
  std::fill(start, start + n + 1, 0);
  for (int64_t t = 0; t < num_tokens; ++t) {
    for (int64_t i = 0; i < n; ++i) start[i + 1] += active[t * n + i];
  }
  for (int64_t i = 0; i < n; ++i) start[i + 1] += start[i];
  s.pairs = start[n];
  s.pair_token = HeapArray<int64_t>(s.pairs);
  auto fill = HeapArray<int64_t>(n);
  std::copy(start, start + n, fill.get());
  for (int64_t t = 0; t < num_tokens; ++t) {
    for (int64_t i = 0; i < n; ++i) {
      if (active[t * n + i]) s.pair_token[fill[i]++] = t;
    }
  }
  return s;
}

DecodeSums::DecodeSums(const FfnDims& dims, const Routing& routing, const PairsByBlock& sorted, int64_t groups,
                       const float* partial)
    : n(dims.num_blocks), d(dims.hidden), groups(groups), col_tasks(CeilDiv(dims.hidden, kDecodeSumColumns)),
      active(routing.active.get()), partial(partial), pair_of(HeapArray<int64_t>(dims.num_tokens * dims.num_blocks)) {
  for (int64_t i = 0; i < n; ++i) {
    for (int64_t p = sorted.block_start[i]; p < sorted.block_start[i + 1]; ++p) {
      pair_of[sorted.pair_token[p] * n + i] = p;
    }
  }
}

void DecodeSums::Run(size_t task, float* y) const {
  const int64_t t = static_cast<int64_t>(task) / col_tasks;
  const int64_t c0 = static_cast<int64_t>(task) % col_tasks * kDecodeSumColumns;
  const int64_t c1 = std::min(d, c0 + kDecodeSumColumns);
  float* yt = y + t * d;
  std::fill(yt + c0, yt + c1, 0.0f);
  for (int64_t i = 0; i < n; ++i) {
    if (!active[t * n + i]) continue;
    for (int64_t grp = 0; grp < groups; ++grp) {
      const float* src = partial + (pair_of[t * n + i] * groups + grp) * d;
      for (int64_t c = c0; c < c1; ++c) yt[c] += src[c];
    }
  }
}

void SumDecodePartials(const Ort::KernelContext& ctx, const FfnDims& dims, const Routing& routing,
                       const PairsByBlock& sorted, int64_t groups, const float* partial, float* y) {
  const DecodeSums sums(dims, routing, sorted, groups, partial);
  // A small sum (one token at d = 576: 21 partials of 576 floats, ~3 us) costs less than
  // waking the pool's threads for it.
  const size_t tasks = sums.Tasks(dims.num_tokens);
  if (sorted.pairs * groups * dims.hidden <= kInlineSumFloats) {
    for (size_t task = 0; task < tasks; ++task) sums.Run(task, y);
  } else {
    ParallelFor(ctx, tasks, [&](size_t task) { sums.Run(task, y); });
  }
}

namespace {
int64_t MaxChunkPairs(const FfnDims& dims) {
  return std::max(kPrefillMinPairs, kPrefillMaxFloats / std::max<int64_t>(1, std::max(dims.hidden, dims.block_size)));
}
}  // namespace

int64_t MaxPrefillChunks(const FfnDims& dims) {
  return 2 * dims.num_blocks + CeilDiv(dims.num_tokens * dims.num_blocks, MaxChunkPairs(dims)) + 1;
}

PrefillChunking::PrefillChunking(const Routing& routing, const FfnDims& dims)
    : all(SortPairsByBlock(routing.active.get(), dims.num_blocks, dims.num_tokens)),
      first_block(HeapArray<int64_t>(dims.num_tokens)),
      chunks(PrefillChunks(all, dims)) {
  std::fill(first_block.get(), first_block.get() + dims.num_tokens, int64_t{-1});
  for (int64_t i = dims.num_blocks - 1; i >= 0; --i) {  // descending: the lowest block is written last
    for (int64_t p = all.block_start[i]; p < all.block_start[i + 1]; ++p) first_block[all.pair_token[p]] = i;
  }
}

std::vector<std::pair<int64_t, int64_t>> PrefillChunks(const PairsByBlock& sorted, const FfnDims& dims) {
  const int64_t n = dims.num_blocks, total = sorted.pairs;
  const int64_t max_pairs = MaxChunkPairs(dims);
  const int64_t* start = sorted.block_start.get();
  std::vector<std::pair<int64_t, int64_t>> out;
  int64_t p0 = 0;
  do {
    int64_t p1 = total;
    if (total - p0 > max_pairs) {
      // The last block boundary within reach; none: p0's block alone is over the bound.
      const int64_t* b = std::upper_bound(start, start + n + 1, p0 + max_pairs);
      if (*(b - 1) > p0) {
        p1 = *(b - 1);
      } else {
        const int64_t block_end = *b, parts = CeilDiv(block_end - p0, max_pairs);
        p1 = p0 + CeilDiv(block_end - p0, parts);
      }
    }
    out.emplace_back(p0, p1);
    p0 = p1;
  } while (p0 < total);
  return out;
}

PairsByBlock SliceOfPairs(const PairsByBlock& sorted, int64_t n, int64_t p0, int64_t p1) {
  PairsByBlock s{HeapArray<int64_t>(n + 1), HeapArray<int64_t>(p1 - p0), p1 - p0};
  for (int64_t i = 0; i <= n; ++i) s.block_start[i] = std::clamp(sorted.block_start[i], p0, p1) - p0;
  std::copy(sorted.pair_token.get() + p0, sorted.pair_token.get() + p1, s.pair_token.get());
  return s;
}

std::vector<Panel> CutPanels(const PairsByBlock& sorted, int64_t n, const KernelSet& ks) {
  std::vector<Panel> panels;
  int64_t offset = 0;
  for (int64_t i = 0; i < n; ++i) {
    for (int64_t p = sorted.block_start[i]; p < sorted.block_start[i + 1];) {
      const int64_t left = sorted.block_start[i + 1] - p;
      const int width = left > ks.narrow_panel ? ks.panel : ks.narrow_panel;
      const int count = static_cast<int>(std::min<int64_t>(left, width));
      panels.push_back({i, p, offset, count, width});
      offset += width;
      p += count;
    }
  }
  return panels;
}

std::vector<int64_t> PanelStarts(const std::vector<Panel>& panels, int64_t n) {
  std::vector<int64_t> start(static_cast<size_t>(n + 1), 0);
  for (const Panel& pn : panels) ++start[static_cast<size_t>(pn.block + 1)];
  for (int64_t i = 0; i < n; ++i) start[i + 1] += start[i];
  return start;
}

std::vector<int64_t> BlocksWithPanels(const std::vector<int64_t>& panel_start, int64_t n) {
  std::vector<int64_t> blocks;
  for (int64_t i = 0; i < n; ++i) {
    if (panel_start[i + 1] > panel_start[i]) blocks.push_back(i);
  }
  return blocks;
}

}  // namespace dsmoe::cpu
