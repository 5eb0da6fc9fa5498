// CPU kernels of org.dsmoe::ProjectedSparseFFN (float32) and ProjectedSparseFFNInt4, docs/op-spec.md:
//
//   S  = A . in_proj^T + skip            X  = RMSNorm(S) * norm_weight
//   S2 = GatedBlockSparseFFN(X) + S      Y  = (RMSNorm(S2) * out_norm_weight) . out_proj^T
//
// Why one node: at one token every parallel node of a decode step pays the pool's wake-up of
// its sleeping worker (~40 us on the development VM) and ORT's float32 MatMul splits its
// columns into two fixed halves, so the thread that wakes late delays the node by that much.
// Measured on the converted SmolLM2 (cpu-kernel-notes #37): as one node, o_proj, the two
// SkipSimplifiedLayerNormalization nodes, the op and the next layer's QKV projection decode in
// 0.90-0.97 of the plain graph's step while idle workers sleep, but 0.95-1.04x (int4: 1.10-1.21x)
// with onnxruntime's default spinning, where the workers are awake between nodes anyway.
//
//   up to kOnePassMaxTokens tokens (decode): one pass of the pool in four phases
//     (cpu/phases.h): the input projection's row slabs, the FFN's decode tasks (cpu/decode.h),
//     the FFN's partial sums with the residual add, the output projection's row slabs; the
//     serial steps between them (residual add, RMSNorm, routing; the second RMSNorm) run on
//     the thread that finishes a phase.
//   longer calls: projections, norms (per token, in parallel) and the FFN step by step.
//
// The two variants differ in their projections and FFN only (FloatParts, Int4Parts below):
//   float32: GEMV by dot_rows (the FFN's kernel) up to kProjectionGemvMaxTokens tokens, then
//     ONNX Runtime's own Gemm (MLAS, invoked from the kernel, so its weights are packed at every
//     call: prefill 2-6 % slower than the unfused graph at 16-128 tokens); the FFN through the
//     float32 op's kernel.
//   int4: the projections in MatMulNBits' layout, read as they are. MatMulNBits packs a
//     32-weight chunk as (2j, 2j+1) nibble pairs, the quantized kernel's rows as (m, m + 16):
//     with x permuted within each 32-chunk (x'[m] = x[2m], x'[m + 16] = x[2m + 1]; group sums
//     unchanged) its lookup GEMV reads MatMulNBits bytes, and so does its row dequantizer for
//     longer calls, whose projections run as float GEMM tiles (panel_dot) over dequantized rows.
#include "cpu/projected_cpu.h"

#include <algorithm>
#include <cmath>
#include <optional>
#include <utility>
#include <vector>

#include "cpu/decode.h"
#include "cpu/ffn_cpu.h"
#include "cpu/ffn_cpu_quant.h"
#include "cpu/hugepages.h"
#include "cpu/parallel.h"
#include "cpu/phases.h"
#include "cpu/plan.h"

namespace dsmoe::cpu {
namespace {

// Calls of up to this many tokens take the one pass: the FFN's decode path is certain for
// them (kDecodeMaxTokens), and the projections' GEMVs read their rows once or twice.
constexpr int64_t kOnePassMaxTokens = kDecodeMaxTokens;
// Rows of a projection per task: 32 rows of k floats (74 KB at k = 576).
constexpr int64_t kProjectionRows = 32;
// Longer float32 calls up to this many tokens project with dot_rows too (each slab's rows read
// once per kMaxDotTokens tokens); beyond, ORT's Gemm, which packs the weights at every call
// (converted SmolLM2, prefill of 16 tokens: 1.065 of the unfused graph's time through Gemm,
// 1.023 through dot_rows; equal at 32; 64: 1.063 against 1.105).
constexpr int64_t kProjectionGemvMaxTokens = 2 * kMaxDotTokens;
// Longer int4 calls up to this many tokens project with the GEMV, beyond with GEMM tiles over
// dequantized rows (converted SmolLM2's int4 export, prefill against the plain graph: 16 tokens
// 1.057-1.071 through the GEMV, 1.089 through the tiles; 32 tokens 1.071 against 0.963-0.967).
constexpr int64_t kInt4GemvMaxTokens = 16;
// Tokens per task of the longer calls' residual adds and norms.
constexpr int64_t kNormTokens = 16;

// out = s / sqrt(mean(s^2) + eps) * gamma, the sum in double.
void RmsNorm(const float* s, const float* gamma, int64_t d, float eps, float* out) {
  double sum = 0.0;
  for (int64_t c = 0; c < d; ++c) sum += static_cast<double>(s[c]) * s[c];
  const float inv = 1.0f / std::sqrt(static_cast<float>(sum / static_cast<double>(d)) + eps);
  for (int64_t c = 0; c < d; ++c) out[c] = s[c] * inv * gamma[c];
}

// What the variants share of a call: sizes and the tensors around the projections and the FFN.
struct Stream {
  int64_t N = 0, d = 0, k = 0, p = 0;
  float eps = 0.0f;
  const float *a = nullptr, *skip = nullptr, *norm = nullptr, *out_norm = nullptr;
  float *y = nullptr, *skip_out = nullptr;
  bool* active = nullptr;
};

// The one pass (up to kOnePassMaxTokens tokens) for a variant's parts V:
//   int64_t InSlabs(), OutSlabs();  void PrepareInput(ctx);  void ProjectIn(slab, s);
//   int64_t PlanFfn(ctx, x) (routing, `active`, the decode plan: its task count);  void FfnTask(i);
//   const Routing& routing;  const DecodePlan& plan;  const FfnDims& fd;
//   void PrepareOutput(ctx, x2);  void ProjectOut(slab, y).
template <typename V>
void ComputeInOnePass(Ort::KernelContext& ctx, const Stream& c, V& v) {
  const int64_t N = c.N, d = c.d;
  // At most kOnePassMaxTokens x d floats each: from the heap, not ORT's arena (one lock fewer a
  // buffer; the int4 parts' five buffers as well: 0.93-0.96 of the plain graph's step against
  // 0.96-0.97 with arena buffers, in two interleaved runs).
  std::vector<float> buffers(static_cast<size_t>(2 * N * d));
  float* const s = buffers.data();          // S
  float* const x = buffers.data() + N * d;  // X, then the normalised S2
  std::optional<DecodeSums> sums;
  std::vector<double> squares;  // per (token, sum task): the sum of S2^2 over its columns
  v.PrepareInput(ctx);
  enum Phase { kInProjection, kFfn, kSums, kOutProjection };
  auto task = [&](int phase, int64_t i, int64_t /*next*/) {
    switch (phase) {
      case kInProjection:
        v.ProjectIn(i, s);
        break;
      case kFfn:
        v.FfnTask(static_cast<size_t>(i));
        break;
      case kSums: {
        sums->Run(static_cast<size_t>(i), c.skip_out);  // the FFN's output, then S2 in place
        const int64_t t = i / sums->col_tasks, c0 = i % sums->col_tasks * kDecodeSumColumns;
        const int64_t c1 = std::min(d, c0 + kDecodeSumColumns);
        double sum = 0.0;
        for (int64_t col = c0; col < c1; ++col) {
          const float value = c.skip_out[t * d + col] + s[t * d + col];
          c.skip_out[t * d + col] = value;
          sum += static_cast<double>(value) * value;
        }
        squares[static_cast<size_t>(i)] = sum;
        break;
      }
      default:
        v.ProjectOut(i, c.y);
    }
  };
  auto after = [&](int phase) -> int64_t {
    switch (phase) {
      case kInProjection:
        for (int64_t t = 0; t < N; ++t) {
          float* st = s + t * d;
          for (int64_t col = 0; col < d; ++col) st[col] += c.skip[t * d + col];
          RmsNorm(st, c.norm, d, c.eps, x + t * d);
        }
        return v.PlanFfn(ctx, x);  // N <= 16: routing runs inline
      case kFfn:
        sums.emplace(v.fd, v.routing, v.plan->sorted, v.plan->groups, v.plan->partial.get());
        squares.assign(sums->Tasks(N), 0.0);
        return static_cast<int64_t>(sums->Tasks(N));
      case kSums:
        for (int64_t t = 0; t < N; ++t) {
          double sum = 0.0;
          for (int64_t j = 0; j < sums->col_tasks; ++j) sum += squares[static_cast<size_t>(t * sums->col_tasks + j)];
          const float inv = 1.0f / std::sqrt(static_cast<float>(sum / static_cast<double>(d)) + c.eps);
          for (int64_t col = 0; col < d; ++col) x[t * d + col] = c.skip_out[t * d + col] * inv * c.out_norm[col];
        }
        v.PrepareOutput(ctx, x);
        return v.OutSlabs();
      default:
        return 0;
    }
  };
  RunPhases(ctx, 4, v.InSlabs(), task, after);
}

// Longer calls, step by step, for a variant's parts V:
//   void ProjectAllIn(ctx, s);  void Ffn(ctx, x, y, active);  void ProjectAllOut(ctx, x2, y).
template <typename V>
void ComputeInSteps(Ort::KernelContext& ctx, const Stream& c, V& v) {
  const int64_t N = c.N, d = c.d;
  auto s = CallScratch<float>(ctx, N * d);
  auto x = CallScratch<float>(ctx, N * d);
  v.ProjectAllIn(ctx, s.get());
  const size_t norm_tasks = static_cast<size_t>(CeilDiv(N, kNormTokens));
  ParallelFor(ctx, norm_tasks, [&](size_t task) {
    for (int64_t t = task * kNormTokens; t < std::min<int64_t>(N, (task + 1) * kNormTokens); ++t) {
      float* st = s.get() + t * d;
      for (int64_t col = 0; col < d; ++col) st[col] += c.skip[t * d + col];
      RmsNorm(st, c.norm, d, c.eps, x.get() + t * d);
    }
  });
  v.Ffn(ctx, x.get(), c.skip_out, c.active);
  ParallelFor(ctx, norm_tasks, [&](size_t task) {
    for (int64_t t = task * kNormTokens; t < std::min<int64_t>(N, (task + 1) * kNormTokens); ++t) {
      float* s2 = c.skip_out + t * d;
      for (int64_t col = 0; col < d; ++col) s2[col] += s[t * d + col];
      RmsNorm(s2, c.out_norm, d, c.eps, x.get() + t * d);
    }
  });
  v.ProjectAllOut(ctx, x.get(), c.y);
}

template <typename V>
void ComputeProjected(Ort::KernelContext& ctx, const Stream& c, V& v) {
  if (c.N == 0) return;
  if (c.N <= kOnePassMaxTokens) {
    ComputeInOnePass(ctx, c, v);
  } else {
    ComputeInSteps(ctx, c, v);
  }
}

// The call's stream: outputs sized, sizes and the shared inputs' data (In: ProjectedInputs or
// ProjectedInt4Inputs); no data pointers for zero tokens.
template <typename In>
Stream MakeStream(Ort::KernelContext& ctx, const In& in, const std::vector<int64_t>& y_shape, const FfnDims& fd,
                  int64_t k, int64_t p, float eps) {
  Stream c;
  c.y = ctx.GetOutput(kPY, y_shape).GetTensorMutableData<float>();
  c.skip_out = ctx.GetOutput(kPSkipOut, fd.y_shape).GetTensorMutableData<float>();
  if (ctx.GetOutputCount() > kPActive) {
    Ort::UnownedValue active = ctx.GetOutput(kPActive, fd.active_shape);
    if (active) c.active = active.GetTensorMutableData<bool>();
  }
  c.N = fd.num_tokens, c.d = fd.hidden, c.k = k, c.p = p, c.eps = eps;
  if (c.N == 0) return c;
  c.a = in.a.template GetTensorData<float>();
  c.skip = in.skip.template GetTensorData<float>();
  c.norm = in.norm.template GetTensorData<float>();
  c.out_norm = in.out_norm.template GetTensorData<float>();
  return c;
}

// ---------------------------------------------------------------------------- float32

// out[t * ldo + r] = x[t] . w[r] for rows r of slab `slab` (kProjectionRows rows of w [rows, k]),
// the slab's rows read once for every kMaxDotTokens tokens.
void ProjectSlab(const KernelSet& ks, const float* w, int64_t rows, int64_t k, int64_t slab, const float* x,
                 int64_t tokens, float* out, int64_t ldo) {
  const int64_t r0 = slab * kProjectionRows, count = std::min(kProjectionRows, rows - r0);
  for (int64_t t0 = 0; t0 < tokens; t0 += kMaxDotTokens) {
    const int64_t n = std::min<int64_t>(kMaxDotTokens, tokens - t0);
    const float* xs[kMaxDotTokens];
    for (int64_t t = 0; t < n; ++t) xs[t] = x + (t0 + t) * k;
    ks.dot_rows(w + r0 * k, k, count, xs, static_cast<int>(n), k, out + t0 * ldo + r0, ldo);
  }
}

struct FloatParts {
  const KernelSet& ks;
  const FfnAttributes& attrs;
  const FfnDims& fd;
  const Stream& c;
  Ort::Op& gemm;
  const Ort::ConstValue &in_weight, &out_weight;
  const float *in_proj, *out_proj;
  FloatFfnWeights w;
  const float *x = nullptr, *x2 = nullptr;
  Routing routing{};
  std::optional<DecodePlan> plan{};

  int64_t InSlabs() const { return CeilDiv(c.d, kProjectionRows); }
  int64_t OutSlabs() const { return CeilDiv(c.p, kProjectionRows); }
  void PrepareInput(const Ort::KernelContext&) {}
  void ProjectIn(int64_t slab, float* s) const { ProjectSlab(ks, in_proj, c.d, c.k, slab, c.a, c.N, s, c.d); }
  int64_t PlanFfn(const Ort::KernelContext& ctx, const float* xx) {
    x = xx;
    routing = Route(ctx, ks, attrs, fd, x, w.router, w.bias);
    WriteActive(routing, fd, c.active);
    plan.emplace(PlanDecode(ctx, fd, routing, kDecodeRows, fd.hidden * static_cast<int64_t>(sizeof(float))));
    return static_cast<int64_t>(plan->tasks.size());
  }
  void FfnTask(size_t i) const { plan->Run(i, FloatDecodeTask{ks, attrs, fd, x, w, routing}); }
  void PrepareOutput(const Ort::KernelContext&, const float* xx) { x2 = xx; }
  void ProjectOut(int64_t slab, float* y) const { ProjectSlab(ks, out_proj, c.p, c.d, slab, x2, c.N, y, c.p); }

  void ProjectAllIn(Ort::KernelContext& ctx, float* s) const { Project(ctx, c.a, c.k, in_weight, in_proj, c.d, s); }
  void Ffn(Ort::KernelContext& ctx, const float* xx, float* y, bool* active) const {
    ComputeFloatFfn(ctx, ks, attrs, fd, xx, w, y, active);
  }
  void ProjectAllOut(Ort::KernelContext& ctx, const float* xx, float* y) const {
    Project(ctx, xx, c.d, out_weight, out_proj, c.p, y);
  }

  // out [N, rows] = a [N, k] . weight [rows, k]^T (w: weight's data).
  void Project(Ort::KernelContext& ctx, const float* a, int64_t k, const Ort::ConstValue& weight, const float* wt,
               int64_t rows, float* out) const {
    if (c.N > kProjectionGemvMaxTokens) return Gemm(ctx, a, k, weight, rows, out);
    ParallelFor(ctx, static_cast<size_t>(CeilDiv(rows, kProjectionRows)),
                [&](size_t slab) { ProjectSlab(ks, wt, rows, k, static_cast<int64_t>(slab), a, c.N, out, rows); });
  }
  void Gemm(Ort::KernelContext& ctx, const float* a, int64_t k, const Ort::ConstValue& weight, int64_t rows,
            float* out) const {
    const int64_t a_shape[] = {c.N, k}, out_shape[] = {c.N, rows};
    // ORT reads A only; the C API's tensor wrapper takes a mutable pointer.
    Ort::Value a_value = Ort::Value::CreateTensor<float>(&CpuMemory(), const_cast<float*>(a),
                                                         static_cast<size_t>(c.N * k), a_shape, 2);
    Ort::Value out_value =
        Ort::Value::CreateTensor<float>(&CpuMemory(), out, static_cast<size_t>(c.N * rows), out_shape, 2);
    const OrtValue* inputs[] = {a_value, weight};
    OrtValue* outputs[] = {out_value};
    gemm.Invoke(ctx.GetOrtKernelContext(), inputs, 2, outputs, 1);
  }
};

// ---------------------------------------------------------------------------- int4

// dst[32 c + m] = src[32 c + 2 m], dst[32 c + 16 + m] = src[32 c + 2 m + 1]: MatMulNBits' pair
// order to the quantized kernel's (header comment). len is a multiple of 32.
void PermuteForInt4(const float* src, int64_t len, float* dst) {
  for (int64_t c0 = 0; c0 < len; c0 += 32) {
    for (int m = 0; m < 16; ++m) {
      dst[c0 + m] = src[c0 + 2 * m];
      dst[c0 + 16 + m] = src[c0 + 2 * m + 1];
    }
  }
}

struct Int4Projection {
  const uint8_t* weight;  // [rows, k / G, G / 2]
  const float* scales;    // [rows, k / G]
  int64_t rows, k;
};

struct Int4Parts {
  const KernelSet& ks;
  const QuantKernelSet& qk;
  const FfnAttributes& attrs;
  const QuantDims& qd;
  const FfnDims& fd;
  const Stream& c;
  int64_t group;
  Int4Projection in, out;
  QWeights w;
  // The one pass's permuted inputs of the projections and their group sums, the FFN's X sums:
  // one heap buffer (ComputeInOnePass says why).
  std::vector<float> pass_buffer{};
  float *a_perm = nullptr, *a_sums = nullptr, *x_sums = nullptr, *x2_perm = nullptr, *x2_sums = nullptr;
  Routing routing{};
  std::optional<DecodePlan> plan{};

  int64_t InSlabs() const { return CeilDiv(c.d, kProjectionRows); }
  int64_t OutSlabs() const { return CeilDiv(c.p, kProjectionRows); }
  void Permute(const float* x, int64_t k, float* perm, float* sums) const {
    for (int64_t t = 0; t < c.N; ++t) {
      PermuteForInt4(x + t * k, k, perm + t * k);
      qk.group_sums(perm + t * k, k, group, sums + t * (k / group));
    }
  }
  void PrepareInput(const Ort::KernelContext&) {
    const int64_t sizes[] = {c.N * c.k, c.N * (c.k / group), c.N * qd.row_groups, c.N * c.d, c.N * (c.d / group)};
    pass_buffer.resize(static_cast<size_t>(sizes[0] + sizes[1] + sizes[2] + sizes[3] + sizes[4]));
    float* next = pass_buffer.data();
    for (auto [ptr, size] : {std::pair{&a_perm, sizes[0]}, std::pair{&a_sums, sizes[1]}, std::pair{&x_sums, sizes[2]},
                             std::pair{&x2_perm, sizes[3]}, std::pair{&x2_sums, sizes[4]}}) {
      *ptr = next;
      next += size;
    }
    Permute(c.a, c.k, a_perm, a_sums);
  }
  // out[t * ldo + r] for the slab's rows, kMaxQuantDotTokens tokens a pass.
  void ProjectSlab(const Int4Projection& m, int64_t slab, const float* x, const float* sums, float* o,
                   int64_t ldo) const {
    const int64_t r0 = slab * kProjectionRows, count = std::min(kProjectionRows, m.rows - r0);
    const int64_t groups = m.k / group;
    for (int64_t t0 = 0; t0 < c.N; t0 += kMaxQuantDotTokens) {
      const int n = static_cast<int>(std::min<int64_t>(kMaxQuantDotTokens, c.N - t0));
      const float* xs[kMaxQuantDotTokens];
      const float* ss[kMaxQuantDotTokens];
      for (int t = 0; t < n; ++t) {
        xs[t] = x + (t0 + t) * m.k;
        ss[t] = sums + (t0 + t) * groups;
      }
      qk.dot_rows(WeightFormat::kInt4, m.weight + r0 * (m.k / 2), m.scales + r0 * groups, count, m.k, group, xs, ss,
                  n, o + t0 * ldo + r0, ldo);
    }
  }
  void ProjectIn(int64_t slab, float* s) const { ProjectSlab(in, slab, a_perm, a_sums, s, c.d); }
  int64_t PlanFfn(const Ort::KernelContext& ctx, const float* x) {
    w.x = x;
    QuantGroupSums(qk, w, c.N, c.d, x_sums);
    routing = Route(ctx, ks, attrs, fd, x, w.router, w.bias);
    WriteActive(routing, fd, c.active);
    plan.emplace(PlanDecode(ctx, fd, routing, QuantDecodeSlabRows(w), w.row_bytes));
    return static_cast<int64_t>(plan->tasks.size());
  }
  void FfnTask(size_t i) const { plan->Run(i, QuantDecodeTask{ks, qk, attrs, qd, w, routing, x_sums}); }
  void PrepareOutput(const Ort::KernelContext&, const float* x2) { Permute(x2, c.d, x2_perm, x2_sums); }
  void ProjectOut(int64_t slab, float* y) const { ProjectSlab(out, slab, x2_perm, x2_sums, y, c.p); }

  // Longer calls: o [N, rows] = x [N, k] . W^T; up to kInt4GemvMaxTokens tokens by the GEMV (the
  // rows read once per kMaxQuantDotTokens tokens), beyond as float GEMM tiles over dequantized row
  // tiles (each row dequantized once a call).
  void ProjectAll(Ort::KernelContext& ctx, const Int4Projection& m, const float* x, float* o) const {
    const int64_t N = c.N, k = m.k;
    auto perm = CallScratch<float>(ctx, N * k);
    if (N <= kInt4GemvMaxTokens) {
      auto sums = CallScratch<float>(ctx, N * (k / group));
      Permute(x, k, perm.get(), sums.get());
      ParallelFor(ctx, static_cast<size_t>(CeilDiv(m.rows, kProjectionRows)), [&](size_t slab) {
        ProjectSlab(m, static_cast<int64_t>(slab), perm.get(), sums.get(), o, m.rows);
      });
      return;
    }
    for (int64_t t = 0; t < N; ++t) PermuteForInt4(x + t * k, k, perm.get() + t * k);
    const int64_t P = ks.panel, panels = CeilDiv(N, P);
    auto packed = CallScratch<float>(ctx, panels * k * P);
    std::vector<int64_t> tokens(static_cast<size_t>(P));
    for (int64_t pn = 0; pn < panels; ++pn) {
      const int count = static_cast<int>(std::min(P, N - pn * P));
      for (int t = 0; t < count; ++t) tokens[static_cast<size_t>(t)] = pn * P + t;
      ks.pack_panel(perm.get(), k, tokens.data(), count, packed.get() + pn * k * P);
    }
    ParallelFor(ctx, static_cast<size_t>(CeilDiv(m.rows, kProjectionRows)), [&](size_t task) {
      const int64_t r0 = static_cast<int64_t>(task) * kProjectionRows, rows = std::min(kProjectionRows, m.rows - r0);
      float* tile = ThreadBuffer(ThreadSlot::kGateTile, rows * k);  // the rows in the permuted order of x
      qk.dequantize_rows(WeightFormat::kInt4, m.weight + r0 * (k / 2), m.scales + r0 * (k / group), rows, k, group,
                         tile);
      float* acc = ThreadBuffer(ThreadSlot::kUpTile, rows * P);
      for (int64_t pn = 0; pn < panels; ++pn) {
        ks.panel_dot(tile, rows, k, k, packed.get() + pn * k * P, acc);
        const int64_t count = std::min(P, N - pn * P);
        for (int64_t t = 0; t < count; ++t) {
          for (int64_t r = 0; r < rows; ++r) o[(pn * P + t) * m.rows + r0 + r] = acc[r * P + t];
        }
      }
    });
  }
  void ProjectAllIn(Ort::KernelContext& ctx, float* s) const { ProjectAll(ctx, in, c.a, s); }
  void Ffn(Ort::KernelContext& ctx, const float* x, float* y, bool* active) {
    w.x = x;
    ComputeQuantFfn(ctx, ks, qk, attrs, qd, w, y, active);
  }
  void ProjectAllOut(Ort::KernelContext& ctx, const float* x2, float* y) const { ProjectAll(ctx, out, x2, y); }
};

}  // namespace

// ---------------------------------------------------------------------------- float32 kernel

OpSignature ProjectedCpuKernel::Signature(NoVariant) {
  constexpr auto f32 = ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
  return {kProjectedOpName, "CPUExecutionProvider", std::vector<ONNXTensorElementDataType>(kNumProjectedInputs, f32),
          kPRouterBias, {f32, f32, ONNX_TENSOR_ELEMENT_DATA_TYPE_BOOL}, kPActive};
}

ProjectedCpuKernel::ProjectedCpuKernel(NoVariant, const Ort::ConstKernelInfo& info)
    : attrs_(ParseProjectedAttributes(info)), kernels_(SelectKernels()) {
  const char* type_names[] = {"T"};
  const ONNXTensorElementDataType types[] = {ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT};
  // A kernel created outside a graph gets no schema defaults: every attribute it reads is given.
  const int64_t trans_a = 0, trans_b = 1;
  const float alpha = 1.0f, beta = 1.0f;
  const Ort::OpAttr attrs[] = {Ort::OpAttr("transA", &trans_a, 1, OrtOpAttrType::ORT_OP_ATTR_INT),
                               Ort::OpAttr("transB", &trans_b, 1, OrtOpAttrType::ORT_OP_ATTR_INT),
                               Ort::OpAttr("alpha", &alpha, 1, OrtOpAttrType::ORT_OP_ATTR_FLOAT),
                               Ort::OpAttr("beta", &beta, 1, OrtOpAttrType::ORT_OP_ATTR_FLOAT)};
  gemm_ = Ort::Op::Create(info, "Gemm", "", 13, type_names, types, 1, attrs, 4, 2, 1);
}

void ProjectedCpuKernel::Prepare(const Ort::ConstKernelInfo& info) const {
  AdviseConstantInputs(info, {kPInProj, kPGate, kPUp, kPDown, kPOutProj});
}

void ProjectedInt4CpuKernel::Prepare(const Ort::ConstKernelInfo& info) const {
  AdviseConstantInputs(info, {kQPInProj, kQPInProjScales, kQPGate, kQPGateScales, kQPUp, kQPUpScales, kQPDown,
                              kQPDownScales, kQPOutProj, kQPOutProjScales});
}

void ProjectedCpuKernel::Compute(Ort::KernelContext& ctx) const {
  const ProjectedInputs in = GetProjectedInputs(ctx, attrs_);
  const ProjectedDims& dims = in.dims;
  const Stream c = MakeStream(ctx, in, dims.y_shape, dims.ffn, dims.in_features, dims.out_features, attrs_.epsilon);
  if (c.N == 0) return;
  FloatParts parts{kernels_, attrs_.ffn, dims.ffn, c, gemm_, in.in_proj, in.out_proj,
                   in.in_proj.GetTensorData<float>(), in.out_proj.GetTensorData<float>(),
                   {in.router_weight.GetTensorData<float>(),
                    in.router_bias ? in.router_bias.GetTensorData<float>() : nullptr, in.gate.GetTensorData<float>(),
                    in.up.GetTensorData<float>(), in.down.GetTensorData<float>()}};
  ComputeProjected(ctx, c, parts);
}

// ---------------------------------------------------------------------------- int4 kernel

OpSignature ProjectedInt4CpuKernel::Signature(NoVariant) {
  constexpr auto f32 = ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT, u8 = ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8;
  std::vector<ONNXTensorElementDataType> inputs(kNumProjectedInt4Inputs, f32);
  for (const size_t i : {kQPInProj, kQPGate, kQPUp, kQPDown, kQPOutProj}) inputs[i] = u8;
  return {kProjectedInt4OpName, "CPUExecutionProvider", inputs, kQPRouterBias,
          {f32, f32, ONNX_TENSOR_ELEMENT_DATA_TYPE_BOOL}, kPActive};
}

ProjectedInt4CpuKernel::ProjectedInt4CpuKernel(NoVariant, const Ort::ConstKernelInfo& info)
    : attrs_(ParseProjectedInt4Attributes(info)), kernels_(SelectKernels()), quant_(SelectQuantKernels()) {}

void ProjectedInt4CpuKernel::Compute(Ort::KernelContext& ctx) const {
  const ProjectedInt4Inputs in = GetProjectedInt4Inputs(ctx, attrs_);
  const ProjectedInt4Dims& dims = in.dims;
  const QuantDims& qd = dims.quant;
  const Stream c = MakeStream(ctx, in, dims.y_shape, qd.base, dims.in_features, dims.out_features, attrs_.epsilon);
  if (c.N == 0) return;
  auto bytes = [](const Ort::ConstValue& v) { return static_cast<const uint8_t*>(v.GetTensorRawData()); };
  const int64_t G = attrs_.quant.group_size;
  Int4Parts parts{kernels_, quant_, attrs_.quant.base, qd, qd.base, c, G,
                  {bytes(in.in_proj), in.in_scales.GetTensorData<float>(), c.d, c.k},
                  {bytes(in.out_proj), in.out_scales.GetTensorData<float>(), c.p, c.d},
                  QuantWeightsOf(WeightFormat::kInt4, G, qd, in.router_weight, in.router_bias, in.gate,
                                 in.gate_scales, in.up, in.up_scales, in.down, in.down_scales)};
  ComputeProjected(ctx, c, parts);
}

void RegisterProjectedOps(Ort::CustomOpDomain& domain) {
  static const FfnOp<ProjectedCpuKernel> op;
  static const FfnOp<ProjectedInt4CpuKernel> int4;
  domain.Add(&op);
  domain.Add(&int4);
}

}  // namespace dsmoe::cpu
