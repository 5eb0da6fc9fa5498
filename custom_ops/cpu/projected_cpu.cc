// CPU kernel of org.dsmoe::ProjectedSparseFFN (float32), docs/op-spec.md:
//
//   S  = A . in_proj^T + skip            X  = RMSNorm(S) * norm_weight
//   S2 = GatedBlockSparseFFN(X) + S      Y  = (RMSNorm(S2) * out_norm_weight) . out_proj^T
//
// Why one node: at one token every parallel node of a decode step pays the pool's wake-up of
// its sleeping worker (~40 us on the development VM) and ORT's float32 MatMul splits its
// columns into two fixed halves, so the thread that wakes late delays the node by that much.
// Measured with prototypes on the converted SmolLM2 (cpu-kernel-notes #37): the o_proj
// MatMul, the two SkipSimplifiedLayerNormalization nodes, the op and the next layer's QKV
// MatMul as one node took 0.95-0.97 of the unfused decode step.
//
//   up to kOnePassMaxTokens tokens (decode): one pass of the pool in four phases
//     (cpu/phases.h): the input projection's row slabs (dot_rows, the FFN's GEMV kernel), the
//     FFN's decode tasks (cpu/decode.h), the FFN's partial sums with the residual add, the
//     output projection's row slabs; the serial steps between them (residual add, RMSNorm,
//     routing; the second RMSNorm) run on the thread that finishes a phase.
//   longer calls: the projections through dot_rows up to kProjectionGemvMaxTokens tokens, then
//     through ONNX Runtime's own Gemm (MLAS, what the unfused graph's MatMul nodes run; invoked
//     from the kernel, so its weights are packed at every call: prefill 2-6 % slower than the
//     unfused graph at 16-128 tokens), the FFN through the float32 op's kernel
//     (ComputeFloatFfn), norms per token in parallel.
#include "cpu/projected_cpu.h"

#include <algorithm>
#include <cmath>
#include <optional>
#include <vector>

#include "cpu/decode.h"
#include "cpu/ffn_cpu.h"
#include "cpu/hugepages.h"
#include "cpu/parallel.h"
#include "cpu/phases.h"
#include "cpu/plan.h"

namespace dsmoe::cpu {
namespace {

// Calls of up to this many tokens take the one pass: the FFN's decode path is certain for
// them (kDecodeMaxTokens), and dot_rows reads a projection's rows once for all of them.
constexpr int64_t kOnePassMaxTokens = kDecodeMaxTokens;
static_assert(kOnePassMaxTokens <= kMaxDotTokens, "dot_rows takes the pass's tokens at once");
// Rows of a projection per task of the pass: 32 rows of k floats (74 KB at k = 576).
constexpr int64_t kProjectionRows = 32;
// Longer calls up to this many tokens project with dot_rows too (each slab's rows read once
// per kMaxDotTokens tokens); beyond, ORT's Gemm, which packs the weights at every call
// (converted SmolLM2, prefill of 16 tokens: 1.065 of the unfused graph's time through Gemm,
// 1.023 through dot_rows; equal at 32; 64: 1.063 against 1.105).
constexpr int64_t kProjectionGemvMaxTokens = 2 * kMaxDotTokens;
// Tokens per task of the longer calls' residual adds and norms.
constexpr int64_t kNormTokens = 16;

// out = s / sqrt(mean(s^2) + eps) * gamma, the sum in double.
void RmsNorm(const float* s, const float* gamma, int64_t d, float eps, float* out) {
  double sum = 0.0;
  for (int64_t c = 0; c < d; ++c) sum += static_cast<double>(s[c]) * s[c];
  const float inv = 1.0f / std::sqrt(static_cast<float>(sum / static_cast<double>(d)) + eps);
  for (int64_t c = 0; c < d; ++c) out[c] = s[c] * inv * gamma[c];
}

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

}  // namespace

struct ProjectedCpuKernel::Call {
  ProjectedInputs in;
  const float *a = nullptr, *skip = nullptr, *in_proj = nullptr, *norm = nullptr, *out_norm = nullptr,
              *out_proj = nullptr;
  FloatFfnWeights ffn{};
  float *y = nullptr, *skip_out = nullptr;
  bool* active = nullptr;
};

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

void ProjectedCpuKernel::Compute(Ort::KernelContext& ctx) const {
  Call call;
  call.in = GetProjectedInputs(ctx, attrs_);
  const ProjectedDims& dims = call.in.dims;
  call.y = ctx.GetOutput(kPY, dims.y_shape).GetTensorMutableData<float>();
  call.skip_out = ctx.GetOutput(kPSkipOut, dims.ffn.y_shape).GetTensorMutableData<float>();
  if (ctx.GetOutputCount() > kPActive) {
    Ort::UnownedValue active = ctx.GetOutput(kPActive, dims.ffn.active_shape);
    if (active) call.active = active.GetTensorMutableData<bool>();
  }
  if (dims.ffn.num_tokens == 0) return;
  const ProjectedInputs& in = call.in;
  call.a = in.a.GetTensorData<float>();
  call.skip = in.skip.GetTensorData<float>();
  call.in_proj = in.in_proj.GetTensorData<float>();
  call.norm = in.norm.GetTensorData<float>();
  call.out_norm = in.out_norm.GetTensorData<float>();
  call.out_proj = in.out_proj.GetTensorData<float>();
  call.ffn = {in.router_weight.GetTensorData<float>(), in.router_bias ? in.router_bias.GetTensorData<float>() : nullptr,
              in.gate.GetTensorData<float>(), in.up.GetTensorData<float>(), in.down.GetTensorData<float>()};
  if (dims.ffn.num_tokens <= kOnePassMaxTokens) {
    ComputeInOnePass(ctx, call);
  } else {
    ComputeInSteps(ctx, call);
  }
}

void ProjectedCpuKernel::ComputeInOnePass(Ort::KernelContext& ctx, const Call& c) const {
  const ProjectedDims& dims = c.in.dims;
  const FfnDims& fd = dims.ffn;
  const int64_t N = fd.num_tokens, d = fd.hidden, k = dims.in_features, p = dims.out_features;
  const float eps = attrs_.epsilon;
  const KernelSet& ks = kernels_;
  auto s = CallScratch<float>(ctx, N * d);  // S
  auto x = CallScratch<float>(ctx, N * d);  // X, then the normalised S2
  Routing routing;
  std::optional<DecodePlan> plan;
  std::optional<DecodeSums> sums;
  std::vector<double> squares;  // per (token, sum task): the sum of S2^2 over its columns
  enum Phase { kInProjection, kFfn, kSums, kOutProjection };
  auto task = [&](int phase, int64_t i) {
    switch (phase) {
      case kInProjection:
        ProjectSlab(ks, c.in_proj, d, k, i, c.a, N, s.get(), d);
        break;
      case kFfn:
        plan->Run(static_cast<size_t>(i), FloatDecodeTask{ks, attrs_.ffn, fd, x.get(), c.ffn, routing});
        break;
      case kSums: {
        sums->Run(static_cast<size_t>(i), c.skip_out);  // the FFN's output, then S2 in place
        const int64_t t = i / sums->col_tasks, c0 = i % sums->col_tasks * kDecodeSumColumns;
        const int64_t c1 = std::min(d, c0 + kDecodeSumColumns);
        double sum = 0.0;
        for (int64_t col = c0; col < c1; ++col) {
          const float v = c.skip_out[t * d + col] + s[t * d + col];
          c.skip_out[t * d + col] = v;
          sum += static_cast<double>(v) * v;
        }
        squares[static_cast<size_t>(i)] = sum;
        break;
      }
      default:
        ProjectSlab(ks, c.out_proj, p, d, i, x.get(), N, c.y, p);
    }
  };
  auto after = [&](int phase) -> int64_t {
    switch (phase) {
      case kInProjection:
        for (int64_t t = 0; t < N; ++t) {
          float* st = s.get() + t * d;
          for (int64_t col = 0; col < d; ++col) st[col] += c.skip[t * d + col];
          RmsNorm(st, c.norm, d, eps, x.get() + t * d);
        }
        routing = Route(ctx, ks, attrs_.ffn, fd, x.get(), c.ffn.router, c.ffn.bias);  // N <= 16: inline
        WriteActive(routing, fd, c.active);
        plan.emplace(PlanDecode(ctx, fd, routing, kDecodeRows));
        return static_cast<int64_t>(plan->tasks.size());
      case kFfn:
        sums.emplace(fd, routing, plan->sorted, plan->groups, plan->partial.get());
        squares.assign(sums->Tasks(N), 0.0);
        return static_cast<int64_t>(sums->Tasks(N));
      case kSums:
        for (int64_t t = 0; t < N; ++t) {
          double sum = 0.0;
          for (int64_t j = 0; j < sums->col_tasks; ++j) sum += squares[static_cast<size_t>(t * sums->col_tasks + j)];
          const float inv = 1.0f / std::sqrt(static_cast<float>(sum / static_cast<double>(d)) + eps);
          for (int64_t col = 0; col < d; ++col) x[t * d + col] = c.skip_out[t * d + col] * inv * c.out_norm[col];
        }
        return CeilDiv(p, kProjectionRows);
      default:
        return 0;
    }
  };
  RunPhases(ctx, 4, CeilDiv(d, kProjectionRows), task, after);
}

void ProjectedCpuKernel::ComputeInSteps(Ort::KernelContext& ctx, const Call& c) const {
  const ProjectedDims& dims = c.in.dims;
  const FfnDims& fd = dims.ffn;
  const int64_t N = fd.num_tokens, d = fd.hidden;
  const float eps = attrs_.epsilon;
  auto s = CallScratch<float>(ctx, N * d);
  auto x = CallScratch<float>(ctx, N * d);
  Project(ctx, c.a, N, dims.in_features, c.in.in_proj, c.in_proj, d, s.get());
  const size_t norm_tasks = static_cast<size_t>(CeilDiv(N, kNormTokens));
  ParallelFor(ctx, norm_tasks, [&](size_t task) {
    for (int64_t t = task * kNormTokens; t < std::min<int64_t>(N, (task + 1) * kNormTokens); ++t) {
      float* st = s.get() + t * d;
      for (int64_t col = 0; col < d; ++col) st[col] += c.skip[t * d + col];
      RmsNorm(st, c.norm, d, eps, x.get() + t * d);
    }
  });
  ComputeFloatFfn(ctx, kernels_, attrs_.ffn, fd, x.get(), c.ffn, c.skip_out, c.active);
  ParallelFor(ctx, norm_tasks, [&](size_t task) {
    for (int64_t t = task * kNormTokens; t < std::min<int64_t>(N, (task + 1) * kNormTokens); ++t) {
      float* s2 = c.skip_out + t * d;
      for (int64_t col = 0; col < d; ++col) s2[col] += s[t * d + col];
      RmsNorm(s2, c.out_norm, d, eps, x.get() + t * d);
    }
  });
  Project(ctx, x.get(), N, d, c.in.out_proj, c.out_proj, dims.out_features, c.y);
}

void ProjectedCpuKernel::Project(Ort::KernelContext& ctx, const float* a, int64_t rows, int64_t k,
                                 const Ort::ConstValue& weight, const float* w, int64_t p, float* out) const {
  if (rows > kProjectionGemvMaxTokens) return Gemm(ctx, a, rows, k, weight, p, out);
  ParallelFor(ctx, static_cast<size_t>(CeilDiv(p, kProjectionRows)),
              [&](size_t slab) { ProjectSlab(kernels_, w, p, k, static_cast<int64_t>(slab), a, rows, out, p); });
}

void ProjectedCpuKernel::Gemm(Ort::KernelContext& ctx, const float* a, int64_t rows, int64_t k,
                              const Ort::ConstValue& weight, int64_t p, float* out) const {
  const int64_t a_shape[] = {rows, k}, out_shape[] = {rows, p};
  // ORT reads A only; the C API's tensor wrapper takes a mutable pointer.
  Ort::Value a_value = Ort::Value::CreateTensor<float>(&CpuMemory(), const_cast<float*>(a),
                                                       static_cast<size_t>(rows * k), a_shape, 2);
  Ort::Value out_value = Ort::Value::CreateTensor<float>(&CpuMemory(), out, static_cast<size_t>(rows * p), out_shape, 2);
  const OrtValue* inputs[] = {a_value, weight};
  OrtValue* outputs[] = {out_value};
  gemm_.Invoke(ctx.GetOrtKernelContext(), inputs, 2, outputs, 1);
}

void RegisterProjectedOps(Ort::CustomOpDomain& domain) {
  static const FfnOp<ProjectedCpuKernel> op;
  domain.Add(&op);
}

}  // namespace dsmoe::cpu
