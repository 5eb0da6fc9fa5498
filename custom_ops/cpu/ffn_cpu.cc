// CPU kernel of org.dsmoe::GatedBlockSparseFFN: only active (token, block)
// pairs are computed (docs/op-spec.md).
//
// Cost per active pair (d = hidden, B = block size): 6*B*d FLOPs (gate, up,
// down: 2*B*d each); routing adds 2*n*d FLOPs per token. Weight bytes: 12*B*d
// per active block, read once per token in the decode regime and once per
// chunk of tokens in the prefill regime (each weight tile is reused across
// all of the chunk's tokens routed to that block).
//
//   decode  (N <= kDecodeMaxTokens): per token, gate/up rows of each active
//           block as GEMVs (rows of length d, contiguous), parallel over
//           (pair, row chunk); then the down projection parallel over output
//           column chunks, each task summing over the token's active blocks.
//   prefill (more tokens): per chunk of tokens, a counting sort of the active
//           pairs by block, X rows packed into panels of kPanel tokens, then
//           H_i = act(X_i G_i^T) * (X_i U_i^T) scaled by g*c, parallel over
//           (block, row tile), and Y += H_i V_i parallel over output column
//           tiles (each task loops over all blocks: no write conflicts).
// Every output element is produced by one task in a fixed order, so results
// do not depend on the number of threads.
#include "cpu/ffn_cpu.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <memory>

#include "common/ffn_op.h"
#include "cpu/ffn_cpu_kernels.h"
#include "cpu/parallel.h"

static_assert(sizeof(bool) == 1, "the active output (ONNX bool) is copied from a bool array");

namespace dsmoe::cpu {
namespace {

// Up to this many tokens per call, weights are streamed per token (GEMV);
// above, per-block GEMMs reuse each weight tile across tokens. Measured
// break-even of the portable build: about 3 tokens (d = 2048, B = 704).
constexpr int64_t kDecodeMaxTokens = 3;
// Prefill works on chunks of at most this many active pairs (plus one token),
// which bounds the scratch memory (packed X: pairs * d floats) while keeping
// hundreds of tokens per block tile.
constexpr int64_t kPrefillMaxPairs = 2048;
constexpr int64_t kRoutingTokensPerTask = 16;
constexpr int64_t kDecodeRowsPerTask = 32;  // gate/up rows of one block per decode task
constexpr int64_t kPrefillRowsPerTask = 32;  // gate + up tile: 2 * 32 * d floats, L2-resident
constexpr int64_t kPrefillColsPerTask = 64;  // down tile: B x 64 floats of V_i, reused by all panels

template <typename T>
std::unique_ptr<T[]> Scratch(int64_t count) {  // uninitialised: every element is written before it is read
  return std::unique_ptr<T[]>(new T[static_cast<size_t>(std::max<int64_t>(count, 1))]);
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

Routing Route(const Ort::KernelContext& ctx, const FfnAttributes& attrs, const FfnDims& dims, const Weights& w) {
  const int64_t n = dims.num_blocks, d = dims.hidden, N = dims.num_tokens;
  Routing r{Scratch<float>(N * n), Scratch<bool>(N * n)};
  float* coef = r.coef.get();
  bool* active = r.active.get();
  ParallelFor(ctx, static_cast<size_t>(CeilDiv(N, kRoutingTokensPerTask)), [&](size_t task) {
    const int64_t t0 = static_cast<int64_t>(task) * kRoutingTokensPerTask;
    const int64_t t1 = std::min(N, t0 + kRoutingTokensPerTask);
    for (int64_t t = t0; t < t1; ++t) {
      float* ct = coef + t * n;
      bool* at = active + t * n;
      DotRows(w.router, d, n, w.x + t * d, d, ct);  // logits, turned into coefficients in place
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

void ComputeDecode(const Ort::KernelContext& ctx, const FfnAttributes& attrs, const FfnDims& dims,
                   const Weights& w, const Routing& routing, float* y) {
  const int64_t n = dims.num_blocks, d = dims.hidden, B = dims.block_size, N = dims.num_tokens;
  // Active pairs, token-major: pair_block[p], per-token ranges [pair_start[t], pair_start[t + 1]).
  auto pair_block = Scratch<int64_t>(N * n);
  auto pair_token = Scratch<int64_t>(N * n);
  auto pair_start = Scratch<int64_t>(N + 1);
  int64_t pairs = 0;
  for (int64_t t = 0; t < N; ++t) {
    pair_start[t] = pairs;
    for (int64_t i = 0; i < n; ++i) {
      if (routing.active[t * n + i]) {
        pair_block[pairs] = i;
        pair_token[pairs++] = t;
      }
    }
  }
  pair_start[N] = pairs;

  auto h = Scratch<float>(pairs * B);  // h[p, :] = act(G_i x) * (U_i x) * g_i * c
  const int64_t row_tasks = CeilDiv(B, kDecodeRowsPerTask);
  ParallelFor(ctx, static_cast<size_t>(pairs * row_tasks), [&](size_t task) {
    const int64_t p = static_cast<int64_t>(task) / row_tasks;
    const int64_t r0 = static_cast<int64_t>(task) % row_tasks * kDecodeRowsPerTask;
    const int64_t rows = std::min(kDecodeRowsPerTask, B - r0);
    const int64_t i = pair_block[p], t = pair_token[p];
    const int64_t offset = (i * B + r0) * d;
    const float* x = w.x + t * d;
    float g[kDecodeRowsPerTask], u[kDecodeRowsPerTask];
    DotRows(w.gate + offset, d, rows, x, d, g);
    DotRows(w.up + offset, d, rows, x, d, u);
    GatedActivation(attrs.activation, g, u, routing.coef[t * n + i], rows, 1, h.get() + p * B + r0);
  });

  // Output column chunks: ~16 per token, at least 64 columns (long contiguous
  // row segments of V), multiples of 16.
  const int64_t chunk = std::clamp<int64_t>(CeilDiv(CeilDiv(d, 16), 16) * 16, 64, 512);
  const int64_t col_tasks = CeilDiv(d, chunk);
  ParallelFor(ctx, static_cast<size_t>(N * col_tasks), [&](size_t task) {
    const int64_t t = static_cast<int64_t>(task) / col_tasks;
    const int64_t c0 = static_cast<int64_t>(task) % col_tasks * chunk;
    const int64_t width = std::min(chunk, d - c0);
    float* yt = y + t * d + c0;
    std::fill(yt, yt + width, 0.0f);  // k = 0 stays exactly 0
    for (int64_t p = pair_start[t]; p < pair_start[t + 1]; ++p) {
      AccumulateRows(h.get() + p * B, w.down + pair_block[p] * B * d + c0, B, d, width, yt);
    }
  });
}

// Prefill on tokens [t0, t1).
void ComputePrefillChunk(const Ort::KernelContext& ctx, const FfnAttributes& attrs, const FfnDims& dims,
                         const Weights& w, const Routing& routing, int64_t t0, int64_t t1, float* y) {
  const int64_t n = dims.num_blocks, d = dims.hidden, B = dims.block_size;
  const bool* active = routing.active.get();
  const float* coef = routing.coef.get();

  // Counting sort of the active pairs by block (tokens ascending within a block).
  auto block_start = Scratch<int64_t>(n + 1);     // pairs of block i: [block_start[i], block_start[i + 1])
  auto panel_start = Scratch<int64_t>(n + 1);     // panels of block i: [panel_start[i], panel_start[i + 1])
  std::fill(block_start.get(), block_start.get() + n + 1, 0);
  for (int64_t t = t0; t < t1; ++t) {
    for (int64_t i = 0; i < n; ++i) block_start[i + 1] += active[t * n + i];
  }
  panel_start[0] = 0;
  for (int64_t i = 0; i < n; ++i) {
    panel_start[i + 1] = panel_start[i] + CeilDiv(block_start[i + 1], kPanel);
    block_start[i + 1] += block_start[i];
  }
  const int64_t pairs = block_start[n], panels = panel_start[n];
  auto pair_token = Scratch<int64_t>(pairs);
  {
    auto fill = Scratch<int64_t>(n);
    std::copy(block_start.get(), block_start.get() + n, fill.get());
    for (int64_t t = t0; t < t1; ++t) {
      for (int64_t i = 0; i < n; ++i) {
        if (active[t * n + i]) pair_token[fill[i]++] = t;
      }
    }
  }
  // Panel q of block i holds the block's pairs [block_start[i] + (q - panel_start[i]) * kPanel, ...).
  auto panel_block = Scratch<int64_t>(panels);
  for (int64_t i = 0; i < n; ++i) {
    for (int64_t q = panel_start[i]; q < panel_start[i + 1]; ++q) panel_block[q] = i;
  }
  auto panel_pairs = [&](int64_t q, int64_t& first, int& count) {
    const int64_t i = panel_block[q];
    first = block_start[i] + (q - panel_start[i]) * kPanel;
    count = static_cast<int>(std::min<int64_t>(kPanel, block_start[i + 1] - first));
  };

  auto xp = Scratch<float>(panels * d * kPanel);  // packed X: panel q is [d][kPanel]
  ParallelFor(ctx, static_cast<size_t>(panels), [&](size_t task) {
    const int64_t q = static_cast<int64_t>(task);
    int64_t first;
    int count;
    panel_pairs(q, first, count);
    PackPanel(w.x, d, pair_token.get() + first, count, xp.get() + q * d * kPanel);
  });

  // hp: panel q is [B][kPanel]: h of the panel's tokens, scaled by g * c.
  auto hp = Scratch<float>(panels * B * kPanel);
  const int64_t row_tasks = CeilDiv(B, kPrefillRowsPerTask);
  // Tasks (block, row tile) of the blocks that have tokens.
  auto task_block = Scratch<int64_t>(n);
  int64_t used_blocks = 0;
  for (int64_t i = 0; i < n; ++i) {
    if (block_start[i + 1] > block_start[i]) task_block[used_blocks++] = i;
  }
  ParallelFor(ctx, static_cast<size_t>(used_blocks * row_tasks), [&](size_t task) {
    const int64_t i = task_block[static_cast<int64_t>(task) / row_tasks];
    const int64_t r0 = static_cast<int64_t>(task) % row_tasks * kPrefillRowsPerTask;
    const int64_t rows = std::min(kPrefillRowsPerTask, B - r0);
    const float* gate = w.gate + (i * B + r0) * d;
    const float* up = w.up + (i * B + r0) * d;
    float g[kPrefillRowsPerTask * kPanel], u[kPrefillRowsPerTask * kPanel];
    for (int64_t q = panel_start[i]; q < panel_start[i + 1]; ++q) {
      const float* panel = xp.get() + q * d * kPanel;
      PanelRowsProduct(gate, rows, d, panel, g);
      PanelRowsProduct(up, rows, d, panel, u);
      int64_t first;
      int count;
      panel_pairs(q, first, count);
      float* h = hp.get() + (q * B + r0) * kPanel;
      for (int t = 0; t < kPanel; ++t) {
        const float scale = t < count ? coef[pair_token[first + t] * n + i] : 0.0f;
        GatedActivation(attrs.activation, g + t, u + t, scale, rows, kPanel, h + t);
      }
    }
  });

  const int64_t col_tasks = CeilDiv(d, kPrefillColsPerTask);
  ParallelFor(ctx, static_cast<size_t>(col_tasks), [&](size_t task) {
    const int64_t c0 = static_cast<int64_t>(task) * kPrefillColsPerTask;
    const int64_t width = std::min(kPrefillColsPerTask, d - c0);
    for (int64_t t = t0; t < t1; ++t) std::fill(y + t * d + c0, y + t * d + c0 + width, 0.0f);
    float acc[kPanel * kPrefillColsPerTask];
    for (int64_t q = 0; q < panels; ++q) {
      const int64_t i = panel_block[q];
      std::fill(acc, acc + kPanel * width, 0.0f);
      PanelAccumulateRows(hp.get() + q * B * kPanel, w.down + i * B * d + c0, B, d, width, acc);
      int64_t first;
      int count;
      panel_pairs(q, first, count);
      for (int t = 0; t < count; ++t) {
        float* yt = y + pair_token[first + t] * d + c0;
        const float* at = acc + t * width;
        for (int64_t c = 0; c < width; ++c) yt[c] += at[c];
      }
    }
  });
}

void ComputePrefill(const Ort::KernelContext& ctx, const FfnAttributes& attrs, const FfnDims& dims,
                    const Weights& w, const Routing& routing, float* y) {
  const int64_t n = dims.num_blocks, N = dims.num_tokens;
  for (int64_t t0 = 0; t0 < N;) {
    int64_t t1 = t0, pairs = 0;
    do {
      pairs += std::count(routing.active.get() + t1 * n, routing.active.get() + (t1 + 1) * n, true);
      ++t1;
    } while (t1 < N && pairs < kPrefillMaxPairs);
    ComputePrefillChunk(ctx, attrs, dims, w, routing, t0, t1, y);
    t0 = t1;
  }
}

Ort::ConstValue RequiredInput(const Ort::KernelContext& ctx, size_t index) {
  Ort::ConstValue v = ctx.GetInput(index);
  if (!v) ThrowInvalidArgument("input " + std::to_string(index) + " is required");
  return v;
}

Shape ShapeOf(const Ort::ConstValue& v) { return v.GetTensorTypeAndShapeInfo().GetShape(); }

}  // namespace

void FfnCpuKernel::Compute(Ort::KernelContext& ctx) const {
  const Ort::ConstValue x = RequiredInput(ctx, kX), router = RequiredInput(ctx, kRouterWeight),
                        gate = RequiredInput(ctx, kGateWeight), up = RequiredInput(ctx, kUpWeight),
                        down = RequiredInput(ctx, kDownWeight);
  Ort::ConstValue bias{nullptr};
  if (ctx.GetInputCount() > kRouterBias) bias = ctx.GetInput(kRouterBias);
  const Shape bias_shape = bias ? ShapeOf(bias) : Shape{};
  const FfnDims dims = CheckShapes(attrs_, ShapeOf(x), ShapeOf(router), ShapeOf(gate), ShapeOf(up), ShapeOf(down),
                                   bias ? &bias_shape : nullptr);

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
  const Routing routing = Route(ctx, attrs_, dims, w);
  if (active_out) {
    std::memcpy(active_out, routing.active.get(), static_cast<size_t>(dims.num_tokens * dims.num_blocks));
  }
  if (dims.num_tokens <= kDecodeMaxTokens) {
    ComputeDecode(ctx, attrs_, dims, w, routing, y);
  } else {
    ComputePrefill(ctx, attrs_, dims, w, routing, y);
  }
}

void RegisterOps(Ort::CustomOpDomain& domain) {
  static const GatedBlockSparseFfnOp<FfnCpuKernel> op;
  domain.Add(&op);
}

}  // namespace dsmoe::cpu
