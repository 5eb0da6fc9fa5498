// CPU kernel of org.dsmoe::GatedBlockSparseFFN: only active (token, block)
// pairs are computed (docs/op-spec.md).
//
// Cost per active pair (d = hidden, B = block size): 6*B*d FLOPs (gate, up,
// down: 2*B*d each); routing adds 2*n*d FLOPs per token. Weight bytes: 12*B*d
// per active block, read once per token in the decode regime and once per
// chunk of tokens in the prefill regime.
//
//   decode  (N <= kDecodeMaxTokens): memory-bound. Tasks are (block, slab of
//           kDecodeRows rows): each streams its slab of gate, up and down
//           (3 * kDecodeRows * d contiguous floats) once for the block's tokens,
//           computes h for those rows and a partial output h . V_slab per token.
//           A second pass sums the partials per token in a fixed order.
//   prefill (more tokens): compute-bound. Per chunk of tokens, a counting sort
//           of the active pairs by block, X rows packed into panels of P tokens
//           (P = two vector registers; a block's last <= P/2 tokens go to a
//           narrow panel of one register), then per (block, row tile) the fused
//           gate/up GEMM with act(g) * u * g_i * c in its epilogue, and per
//           output column tile the down GEMMs of all panels added into Y (each
//           task owns its columns: no write conflicts, no reduction).
// Every output element is produced by one task in a fixed order, so results
// do not depend on the number of threads.
#include "cpu/ffn_cpu.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <memory>
#include <vector>

#include "common/ffn_op.h"
#include "common/scratch.h"
#include "cpu/parallel.h"

static_assert(sizeof(bool) == 1, "the active output (ONNX bool) is copied from a bool array");

namespace dsmoe::cpu {
namespace {

// Up to this many tokens per call, the GEMV path (weights streamed once per
// kMaxDotTokens tokens of a block); above, the GEMM path, whose panels of 16-32
// tokens waste work on small buckets. Measured crossover, d = 2048, B = 704,
// all 8 blocks active, AVX-512: about 8 tokens.
constexpr int64_t kDecodeMaxTokens = 6;
// Prefill works on chunks of about equal pairs, at most this many (plus one token),
// which bounds the scratch memory (packed X: pairs * d floats) while keeping
// hundreds of tokens per block tile.
constexpr int64_t kPrefillMaxPairs = 2048;
constexpr int64_t kRoutingTokensPerTask = 16;
constexpr int64_t kDecodeRows = 32;    // decode slab: gate, up and down rows, 3 * 32 * d floats, L2-resident
constexpr int64_t kDecodeGroups = 8;   // row groups per block in the decode path
constexpr int64_t kPrefillRowsPerTask = 24;  // gate + up tile: 2 * 24 * d floats, L2-resident
constexpr int64_t kPrefillColsPerTask = 64;  // down tile: B x 64 floats of V_i, reused by all panels

template <typename T>
std::unique_ptr<T[]> HeapArray(int64_t count) {  // uninitialised: every element is written before it is read
  return std::unique_ptr<T[]>(new T[static_cast<size_t>(std::max<int64_t>(count, 1))]);
}

// Large per-call buffers (packed X, h, partial sums) come from the session's
// CPU allocator (common/scratch.h). The memory description is created once and
// never released: releasing it at exit could run after ONNX Runtime's teardown.
const OrtMemoryInfo& CpuMemory() {
  static const OrtMemoryInfo* info = Ort::MemoryInfo::CreateCpu(OrtArenaAllocator, OrtMemTypeDefault).release();
  return *info;
}

template <typename T>
ScratchArray<T> CallScratch(const Ort::KernelContext& ctx, int64_t count) {
  return ScratchArray<T>(ctx, CpuMemory(), count, "CPU");
}

int64_t CeilDiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

struct Weights {
  const float* x;       // [N, d]
  const float* router;  // [n, d]
  const float* bias;    // [n] or nullptr
  const float* gate;    // [n, B, d]
  const float* up;      // [n, B, d]
  const float* down;    // [n, B, d]
};

// Routing of one call: for token t and block i, coef[t * n + i] = g_i * c
// (0 when inactive) and active[t * n + i]; logits in float32.
struct Routing {
  std::unique_ptr<float[]> coef;
  std::unique_ptr<bool[]> active;
};

Routing Route(const Ort::KernelContext& ctx, const KernelSet& ks, const FfnAttributes& attrs, const FfnDims& dims,
              const Weights& w) {
  const int64_t n = dims.num_blocks, d = dims.hidden, N = dims.num_tokens;
  Routing r{HeapArray<float>(N * n), HeapArray<bool>(N * n)};
  float* coef = r.coef.get();
  bool* active = r.active.get();
  ParallelFor(ctx, static_cast<size_t>(CeilDiv(N, kRoutingTokensPerTask)), [&](size_t task) {
    const int64_t t0 = static_cast<int64_t>(task) * kRoutingTokensPerTask;
    const int64_t t1 = std::min(N, t0 + kRoutingTokensPerTask);
    for (int64_t t = t0; t < t1; ++t) {
      float* ct = coef + t * n;
      bool* at = active + t * n;
      const float* xt = w.x + t * d;
      ks.dot_rows(w.router, d, n, &xt, 1, d, ct, n);  // logits, turned into coefficients in place
      int64_t k = 0;
      for (int64_t i = 0; i < n; ++i) {
        const float logit = ct[i] + (w.bias ? w.bias[i] : 0.0f);
        const float s = 1.0f / (1.0f + std::exp(-logit));
        at[i] = s > attrs.threshold;  // false for a NaN logit
        ct[i] = attrs.weighting == Weighting::kScore ? s : 1.0f;
        k += at[i];
      }
      const float c = attrs.rescale && k > 0 ? static_cast<float>(n) / static_cast<float>(k) : 1.0f;
      for (int64_t i = 0; i < n; ++i) ct[i] = at[i] ? ct[i] * c : 0.0f;
    }
  });
  return r;
}

// Active pairs sorted by block (tokens ascending within a block): pairs of block i
// are [block_start[i], block_start[i + 1]), pair_token[p] is the token of pair p.
struct PairsByBlock {
  std::unique_ptr<int64_t[]> block_start, pair_token;
  int64_t pairs = 0;
};

PairsByBlock SortPairsByBlock(const bool* active, int64_t n, int64_t t0, int64_t t1) {
  PairsByBlock s{HeapArray<int64_t>(n + 1), nullptr};
  int64_t* start = s.block_start.get();
  std::fill(start, start + n + 1, 0);
  for (int64_t t = t0; t < t1; ++t) {
    for (int64_t i = 0; i < n; ++i) start[i + 1] += active[t * n + i];
  }
  for (int64_t i = 0; i < n; ++i) start[i + 1] += start[i];
  s.pairs = start[n];
  s.pair_token = HeapArray<int64_t>(s.pairs);
  auto fill = HeapArray<int64_t>(n);
  std::copy(start, start + n, fill.get());
  for (int64_t t = t0; t < t1; ++t) {
    for (int64_t i = 0; i < n; ++i) {
      if (active[t * n + i]) s.pair_token[fill[i]++] = t;
    }
  }
  return s;
}

// dst[j * width + c] = src[j * ld + c]: the rows are a page apart (ld = d), which
// the hardware prefetchers do not follow, so the rows ahead are prefetched here.
void CopyTile(const float* src, int64_t ld, int64_t rows, int64_t width, float* dst) {
  constexpr int64_t kAhead = 8;
  for (int64_t j = 0; j < rows; ++j) {
    if (j + kAhead < rows) {
      for (int64_t c = 0; c < width; c += 16) __builtin_prefetch(src + (j + kAhead) * ld + c);
    }
    if (width == kPrefillColsPerTask) {
      std::memcpy(dst + j * width, src + j * ld, sizeof(float) * kPrefillColsPerTask);  // inlined: fixed size
    } else {
      std::copy(src + j * ld, src + j * ld + width, dst + j * width);
    }
  }
}

// A panel: `count` consecutive pairs of one block (from pair `first`), packed
// `width` tokens wide (full or narrow panel; count <= width, the rest padding);
// `offset` counts the token slots of the panels before it.
struct Panel {
  int64_t block, first, offset;
  int count, width;
};

// Each block's pairs in full panels of P tokens; a last part of at most Pn
// tokens goes to a narrow panel of Pn (a full one would pad it up to P).
std::vector<Panel> CutPanels(const int64_t* block_start, int64_t n, int P, int Pn) {
  std::vector<Panel> panels;
  int64_t offset = 0;
  for (int64_t i = 0; i < n; ++i) {
    for (int64_t p = block_start[i]; p < block_start[i + 1];) {
      const int64_t left = block_start[i + 1] - p;
      const int width = left > Pn ? P : Pn;
      const int count = static_cast<int>(std::min<int64_t>(left, width));
      panels.push_back({i, p, offset, count, width});
      offset += width;
      p += count;
    }
  }
  return panels;
}

void ComputeDecode(const Ort::KernelContext& ctx, const KernelSet& ks, const FfnAttributes& attrs,
                   const FfnDims& dims, const Weights& w, const Routing& routing, float* y) {
  const int64_t n = dims.num_blocks, d = dims.hidden, B = dims.block_size, N = dims.num_tokens;
  const PairsByBlock sorted = SortPairsByBlock(routing.active.get(), n, 0, N);
  const int64_t* block_start = sorted.block_start.get();
  const int64_t* pair_token = sorted.pair_token.get();

  // Tasks (block, group of rows): a block's rows are cut into at most kDecodeGroups
  // groups (work for every thread even when k = 1), each walked in slabs of
  // kDecodeRows rows; a slab's gate and up rows are read once for up to
  // kMaxDotTokens tokens, its down rows once per token (from L2). Each task owns
  // one partial output per (pair, group): no write conflicts.
  const int64_t slabs = CeilDiv(B, kDecodeRows);
  const int64_t groups = std::min(slabs, kDecodeGroups);
  const int64_t slabs_per_group = CeilDiv(slabs, groups);
  auto partial = CallScratch<float>(ctx, sorted.pairs * groups * d);  // partial[(p * groups + g) * d + c]
  ParallelFor(ctx, static_cast<size_t>(n * groups), [&](size_t task) {
    const int64_t i = static_cast<int64_t>(task) / groups, grp = static_cast<int64_t>(task) % groups;
    const int64_t first_pair = block_start[i], last_pair = block_start[i + 1];
    for (int64_t p = first_pair; p < last_pair; ++p) {
      float* out = partial.get() + (p * groups + grp) * d;
      std::fill(out, out + d, 0.0f);
    }
    float g[kMaxDotTokens * kDecodeRows], u[kMaxDotTokens * kDecodeRows], h[kDecodeRows];
    const int64_t s_end = std::min(slabs, (grp + 1) * slabs_per_group);
    for (int64_t s = grp * slabs_per_group; s < s_end; ++s) {
      const int64_t r0 = s * kDecodeRows, rows = std::min(kDecodeRows, B - r0);
      const int64_t offset = (i * B + r0) * d;
      for (int64_t p0 = first_pair; p0 < last_pair; p0 += kMaxDotTokens) {
        const int count = static_cast<int>(std::min<int64_t>(kMaxDotTokens, last_pair - p0));
        const float* xs[kMaxDotTokens];
        for (int c = 0; c < count; ++c) xs[c] = w.x + pair_token[p0 + c] * d;
        ks.dot_rows(w.gate + offset, d, rows, xs, count, d, g, kDecodeRows);
        ks.dot_rows(w.up + offset, d, rows, xs, count, d, u, kDecodeRows);
        for (int c = 0; c < count; ++c) {
          const int64_t p = p0 + c;
          ks.gated_activation(attrs.activation, g + c * kDecodeRows, u + c * kDecodeRows,
                              routing.coef[pair_token[p] * n + i], rows, h);
          ks.accumulate_rows(h, w.down + offset, rows, d, d, partial.get() + (p * groups + grp) * d);
        }
      }
    }
  });

  // pair_of[t * n + i]: the pair of (token t, block i) when active.
  auto pair_of = HeapArray<int64_t>(N * n);
  for (int64_t i = 0; i < n; ++i) {
    for (int64_t p = block_start[i]; p < block_start[i + 1]; ++p) pair_of[pair_token[p] * n + i] = p;
  }
  // Sum each token's partials (blocks, then groups, ascending), column chunks in
  // parallel; k = 0 stays exactly 0.
  const int64_t chunk = 256, col_tasks = CeilDiv(d, chunk);
  ParallelFor(ctx, static_cast<size_t>(N * col_tasks), [&](size_t task) {
    const int64_t t = static_cast<int64_t>(task) / col_tasks;
    const int64_t c0 = static_cast<int64_t>(task) % col_tasks * chunk, c1 = std::min(d, c0 + chunk);
    float* yt = y + t * d;
    std::fill(yt + c0, yt + c1, 0.0f);
    for (int64_t i = 0; i < n; ++i) {
      if (!routing.active[t * n + i]) continue;
      for (int64_t grp = 0; grp < groups; ++grp) {
        const float* src = partial.get() + (pair_of[t * n + i] * groups + grp) * d;
        for (int64_t c = c0; c < c1; ++c) yt[c] += src[c];
      }
    }
  });
}

// Prefill on tokens [t0, t1).
void ComputePrefillChunk(const Ort::KernelContext& ctx, const KernelSet& ks, const FfnAttributes& attrs,
                         const FfnDims& dims, const Weights& w, const Routing& routing, int64_t t0, int64_t t1,
                         float* y) {
  const int64_t n = dims.num_blocks, d = dims.hidden, B = dims.block_size;
  const bool* active = routing.active.get();
  const float* coef = routing.coef.get();

  const PairsByBlock sorted = SortPairsByBlock(active, n, t0, t1);
  const int64_t* block_start = sorted.block_start.get();
  const int64_t* pair_token = sorted.pair_token.get();
  const std::vector<Panel> panels = CutPanels(block_start, n, ks.panel, ks.narrow_panel);
  const int64_t num_panels = static_cast<int64_t>(panels.size());
  const int64_t slots = panels.empty() ? 0 : panels.back().offset + panels.back().width;
  std::vector<int64_t> panel_start(n + 1, 0);  // panels of block i: [panel_start[i], panel_start[i + 1])
  for (const Panel& pn : panels) ++panel_start[pn.block + 1];
  for (int64_t i = 0; i < n; ++i) panel_start[i + 1] += panel_start[i];

  // Packed X (panel q is [d][width] at xp + offset * d) and the per-slot
  // coefficients g_i * c (0 for padding).
  auto xp = CallScratch<float>(ctx, slots * d);
  auto cp = CallScratch<float>(ctx, slots);
  ParallelFor(ctx, static_cast<size_t>(num_panels), [&](size_t task) {
    const Panel& pn = panels[task];
    const auto pack = pn.width == ks.panel ? ks.pack_panel : ks.pack_narrow_panel;
    pack(w.x, d, pair_token + pn.first, pn.count, xp.get() + pn.offset * d);
    for (int t = 0; t < pn.width; ++t) {
      cp[pn.offset + t] = t < pn.count ? coef[pair_token[pn.first + t] * n + pn.block] : 0.0f;
    }
  });

  // hp: panel q is [B][width] at hp + offset * B: h of the panel's tokens, already scaled by g_i * c.
  auto hp = CallScratch<float>(ctx, slots * B);
  const int64_t row_tasks = CeilDiv(B, kPrefillRowsPerTask);
  std::vector<int64_t> task_block;  // the blocks that have tokens
  for (int64_t i = 0; i < n; ++i) {
    if (panel_start[i + 1] > panel_start[i]) task_block.push_back(i);
  }
  ParallelFor(ctx, task_block.size() * static_cast<size_t>(row_tasks), [&](size_t task) {
    const int64_t i = task_block[task / static_cast<size_t>(row_tasks)];
    const int64_t r0 = static_cast<int64_t>(task % static_cast<size_t>(row_tasks)) * kPrefillRowsPerTask;
    const int64_t rows = std::min(kPrefillRowsPerTask, B - r0);
    for (int64_t q = panel_start[i]; q < panel_start[i + 1]; ++q) {
      const Panel& pn = panels[q];
      const auto gate_up = pn.width == ks.panel ? ks.panel_gate_up : ks.narrow_panel_gate_up;
      gate_up(attrs.activation, w.gate + (i * B + r0) * d, w.up + (i * B + r0) * d, rows, d,
              xp.get() + pn.offset * d, cp.get() + pn.offset, hp.get() + pn.offset * B + r0 * pn.width);
    }
  });

  const int64_t col_tasks = CeilDiv(d, kPrefillColsPerTask);
  ParallelFor(ctx, static_cast<size_t>(col_tasks), [&](size_t task) {
    const int64_t c0 = static_cast<int64_t>(task) * kPrefillColsPerTask;
    const int64_t width = std::min(kPrefillColsPerTask, d - c0);
    for (int64_t t = t0; t < t1; ++t) std::fill(y + t * d + c0, y + t * d + c0 + width, 0.0f);
    // V_i[:, c0:c0 + width] copied to a contiguous [B][width] tile once per block:
    // read in place, every row of the tile would start a new page (stride d).
    auto vp = HeapArray<float>(B * width);
    float* rows[64];  // output rows of a panel's tokens (panel widths <= 64)
    int64_t packed_block = -1;
    for (const Panel& pn : panels) {
      if (pn.block != packed_block) {
        const float* src = w.down + pn.block * B * d + c0;
        CopyTile(src, d, B, width, vp.get());
        packed_block = pn.block;
      }
      for (int t = 0; t < pn.count; ++t) rows[t] = y + pair_token[pn.first + t] * d + c0;
      const auto down = pn.width == ks.panel ? ks.panel_down : ks.narrow_panel_down;
      down(hp.get() + pn.offset * B, vp.get(), B, width, width, rows, pn.count);
    }
  });
}

void ComputePrefill(const Ort::KernelContext& ctx, const KernelSet& ks, const FfnAttributes& attrs,
                    const FfnDims& dims, const Weights& w, const Routing& routing, float* y) {
  const int64_t n = dims.num_blocks, N = dims.num_tokens;
  const bool* active = routing.active.get();
  const int64_t total = std::count(active, active + N * n, true);
  // Chunks of about equal pairs: every chunk reads the weights of its active
  // blocks once, so a small last chunk would cost a full weight read for a few tokens.
  const int64_t chunks = std::max<int64_t>(1, CeilDiv(total, kPrefillMaxPairs));
  const int64_t per_chunk = CeilDiv(std::max<int64_t>(total, 1), chunks);
  for (int64_t t0 = 0; t0 < N;) {
    int64_t t1 = t0, pairs = 0;
    do {
      pairs += std::count(active + t1 * n, active + (t1 + 1) * n, true);
      ++t1;
    } while (t1 < N && pairs < per_chunk);
    ComputePrefillChunk(ctx, ks, attrs, dims, w, routing, t0, t1, y);
    t0 = t1;
  }
}

}  // namespace

void FfnCpuKernel::Compute(Ort::KernelContext& ctx) const {
  const FfnInputs in = GetInputs(ctx, attrs_);
  const FfnDims& dims = in.dims;
  const Ort::ConstValue &x = in.x, &router = in.router_weight, &gate = in.gate_weight, &up = in.up_weight,
                        &down = in.down_weight, &bias = in.router_bias;

  float* y = ctx.GetOutput(kY, dims.y_shape).GetTensorMutableData<float>();
  bool* active_out = nullptr;
  if (ctx.GetOutputCount() > kActive) {
    Ort::UnownedValue active = ctx.GetOutput(kActive, dims.active_shape);
    if (active) active_out = active.GetTensorMutableData<bool>();
  }
  if (dims.num_tokens == 0) return;

  const Weights w{x.GetTensorData<float>(),  router.GetTensorData<float>(),
                  bias ? bias.GetTensorData<float>() : nullptr,
                  gate.GetTensorData<float>(), up.GetTensorData<float>(), down.GetTensorData<float>()};
  const Routing routing = Route(ctx, kernels_, attrs_, dims, w);
  if (active_out) {
    std::memcpy(active_out, routing.active.get(), static_cast<size_t>(dims.num_tokens * dims.num_blocks));
  }
  if (dims.num_tokens <= kDecodeMaxTokens) {
    ComputeDecode(ctx, kernels_, attrs_, dims, w, routing, y);
  } else {
    ComputePrefill(ctx, kernels_, attrs_, dims, w, routing, y);
  }
}

void RegisterOps(Ort::CustomOpDomain& domain) {
  static const GatedBlockSparseFfnOp<FfnCpuKernel> op;
  domain.Add(&op);
}

}  // namespace dsmoe::cpu
