// CPU kernel of the weight-only quantized ops org.dsmoe::GatedBlockSparseFFNInt4,
// Int8 and F16 (docs/op-spec.md "Quantized variants"; notes in
// docs/quant-kernel-notes.md). Same plan as the float32 kernel (ffn_cpu.cc):
//
//   decode  (few tokens a block: UsesDecodePath): tasks (block, group of row
//           slabs); a slab's gate/up and down rows are dequantized once per vector
//           and used for up to 4 tokens (QuantKernelSet::dot_rows; accumulate_rows,
//           per scale group of down rows). Memory-bound: bytes per active block
//           are 3 * B * d * bits / 8 plus the scales.
//   prefill (more tokens): the float32 kernel's path (cpu/prefill.h) with the
//           weights dequantized per task: a (block, slab) task's 32 gate and up rows
//           into k-major float32 slabs (2 * 32 * d floats, L2) that the float32 op's
//           slab kernel reads for all the block's tokens (at accuracy_level 4 with
//           AVX-512 VNNI: the int4 x int8 slab GEMM instead, cpu/int4_int8_gemm.cc), a
//           column task's V columns into a [B][64] tile. Never a dequantized copy of a
//           whole weight.
//
// Routing, the pair sort, chunks and panels: cpu/plan.h, shared with ffn_cpu.cc.
#include "cpu/ffn_cpu_quant.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <string>
#include <memory>
#include <vector>

#include "common/ffn_op.h"
#include "common/ffn_quant_params.h"
#include "common/status.h"
#include "cpu/decode.h"
#include "cpu/hugepages.h"
#include "cpu/kernels.h"
#include "cpu/kernels_quant.h"
#include "cpu/parallel.h"
#include "cpu/plan.h"
#include "cpu/prefetch.h"
#include "cpu/prefill.h"

namespace dsmoe::cpu {

namespace {

WeightFormat FormatOf(QuantKind kind) {
  return kind == QuantKind::kInt4 ? WeightFormat::kInt4
         : kind == QuantKind::kInt8 ? WeightFormat::kInt8
                                    : WeightFormat::kF16;
}


// accuracy_level 4 with the int4 x int8 kernels: a prefill slab's gate and up for all its tokens
// through the slab GEMM (int8.slab: the slab repacked once, exact integer sums per 32 columns),
// then h = act(g) * u * c into each token's panel column.
struct Int8SlabGateUp {
  const KernelSet& ks;
  const FfnAttributes& attrs;
  const QWeights& w;
  const Int8Tokens& int8;
  int64_t d, B;

  void operator()(int64_t i, int64_t r0, int64_t rows, const int64_t* tokens, const float* cs, int m,
                  float* const* hs, const int64_t* ld) const {
    const int64_t row = i * B + r0, rb = w.row_bytes, ldo = kInt8SlabRows;
    void* scratch = ThreadBuffer(ThreadSlot::kPanels, Int8SlabScratchFloats(d, w.group));
    float* g = ThreadBuffer(ThreadSlot::kGateTile, m * ldo);
    float* u = ThreadBuffer(ThreadSlot::kUpTile, (m + 1) * ldo);
    float* h = u + m * ldo;
    int8.slab(w.gate + row * rb, w.gate_scales + row * w.row_groups, rows, d, w.group, int8.rows, tokens, m, g, ldo,
              scratch);
    int8.slab(w.up + row * rb, w.up_scales + row * w.row_groups, rows, d, w.group, int8.rows, tokens, m, u, ldo,
              scratch);
    for (int t = 0; t < m; ++t) {
      ks.gated_activation(attrs.activation, g + t * ldo, u + t * ldo, cs[t], rows, h);
      float* out = hs[t];
      for (int64_t r = 0; r < rows; ++r) out[r * ld[t]] = h[r];
    }
  }
};

// routed: the call's routing, or null to route route_x in the prefill's pass (and write `active`);
// route_x is w.x but at accuracy_level 4 (the op's input as given, w.x its rounding); with int8.slab
// gate and up go through Int8SlabGateUp instead of dequantized slabs.
void ComputePrefill(const Ort::KernelContext& ctx, const KernelSet& ks, const QuantKernelSet& qk,
                    const FfnAttributes& attrs, const QuantDims& qd, const QWeights& w, const float* route_x,
                    const Routing* routed, bool* active, float* y, const Int8Tokens& int8) {
  const int64_t d = qd.base.hidden, B = qd.base.block_size, rb = w.row_bytes;
  // Gate/up go to the float32 op's slab kernel: a task's slab of gate and of up rows dequantized
  // into per-thread k-major tiles ([d][32], L2), read in place for all the block's tokens.
  FfnDims dims = qd.base;
  dims.gate_up_tile = kSlabRows;
  auto gate_up_rows = [&](int64_t i, int64_t r0, int64_t rows) {
    const int64_t row = i * B + r0;
    float* gt = ThreadBuffer(ThreadSlot::kGateTile, kSlabRows * d);
    float* ut = ThreadBuffer(ThreadSlot::kUpTile, kSlabRows * d);
    qk.dequantize_slab(w.format, w.gate + row * rb, w.gate_scales ? w.gate_scales + row * w.row_groups : nullptr,
                       rows, d, w.group, gt);
    qk.dequantize_slab(w.format, w.up + row * rb, w.up_scales ? w.up_scales + row * w.row_groups : nullptr, rows,
                       d, w.group, ut);
    return std::pair<const float*, const float*>{gt, ut};
  };
  auto down_tile = [&](int64_t i, int64_t c0, int64_t width, float* tile) {
    qk.dequantize_columns(w.format, w.down + i * B * rb, w.down_scales ? w.down_scales + i * w.block_groups * d : nullptr,
                          B, d, w.group, c0, width, tile);
    return std::pair<const float*, int64_t>{tile, width};
  };
  // No prefetch: the dequantizers read the (4-8x smaller) weights in order, which the hardware follows.
  if (int8.slab != nullptr) {
    return RunPrefill(ctx, ks, attrs, dims, w.x, route_x, w.router, w.bias, routed, active, y, gate_up_rows,
                      down_tile, NoPrefetch{}, Int8SlabGateUp{ks, attrs, w, int8, d, B});
  }
  RunPrefill(ctx, ks, attrs, dims, w.x, route_x, w.router, w.bias, routed, active, y, gate_up_rows, down_tile,
             NoPrefetch{});
}

}  // namespace

QWeights QuantWeightsOf(WeightFormat format, int64_t group, const QuantDims& qd, const Ort::ConstValue& router,
                        const Ort::ConstValue& bias, const Ort::ConstValue& gate, const Ort::ConstValue& gate_scales,
                        const Ort::ConstValue& up, const Ort::ConstValue& up_scales, const Ort::ConstValue& down,
                        const Ort::ConstValue& down_scales) {
  auto bytes = [](const Ort::ConstValue& v) { return static_cast<const uint8_t*>(v.GetTensorRawData()); };
  auto floats = [](const Ort::ConstValue& v) { return v ? v.GetTensorData<float>() : nullptr; };
  return {format,       group,      nullptr,           floats(router),    floats(bias),       bytes(gate),
          bytes(up),    bytes(down), floats(gate_scales), floats(up_scales), floats(down_scales), qd.row_bytes,
          qd.row_groups, qd.block_groups};
}

int64_t QuantDecodeSlabRows(const QWeights& w) {
  return w.format == WeightFormat::kF16 ? kDecodeRows : std::max(kDecodeRows, w.group);
}

void QuantGroupSums(const QuantKernelSet& qk, const QWeights& w, int64_t num_tokens, int64_t d, float* xsum) {
  if (w.format == WeightFormat::kF16) return;
  for (int64_t t = 0; t < num_tokens; ++t) qk.group_sums(w.x + t * d, d, w.group, xsum + t * w.row_groups);
}

// A decode slab's weights are six short streams (gate, up and down rows and their scales: at
// d = 576 in int4, 9 KB of rows and 2.3 KB of scales each), too short for the hardware
// prefetchers, which follow a stream from its first misses, a page at a time: the task waits on
// DRAM latency more than on bandwidth. A slab whose rows span at most this many bytes a matrix
// is prefetched whole at its start. A two-thread loop reading such tasks from DRAM (AMD EPYC VM):
// 16-19 GB/s as it was, 20-24 with the prefetch at 9 KB a stream, +12 % at 18 KB, +2 % at 32 KB.
constexpr int64_t kWholeSlabPrefetchBytes = 24 * 1024;

void QuantDecodeTask::operator()(const DecodeTask& t) const {
  const FfnDims& dims = qd.base;
  const int64_t n = dims.num_blocks, d = dims.hidden, B = dims.block_size;
  const int64_t slab_rows = QuantDecodeSlabRows(w), rb = w.row_bytes;
  const int64_t xgroups = w.format == WeightFormat::kF16 ? 1 : w.row_groups;
  const int64_t i = t.block, first_pair = t.first_pair, last_pair = t.last_pair;
  const int64_t* pair_token = t.pair_token;
  float* g = ThreadBuffer(ThreadSlot::kGateTile, kMaxQuantDotTokens * slab_rows);
  float* u = ThreadBuffer(ThreadSlot::kUpTile, 2 * kMaxQuantDotTokens * slab_rows);
  float* h = u + kMaxQuantDotTokens * slab_rows;
  float* acc = ThreadBuffer(ThreadSlot::kDownTile, kMaxQuantDotTokens * d);
  for (int64_t s = t.slab_begin; s < t.slab_end; ++s) {
    const int64_t r0 = s * slab_rows, rows = std::min(slab_rows, B - r0);
    const int64_t row = i * B + r0;
    const float* gs = w.gate_scales ? w.gate_scales + row * w.row_groups : nullptr;
    const float* us = w.up_scales ? w.up_scales + row * w.row_groups : nullptr;
    const float* ds = w.down_scales ? w.down_scales + (i * w.block_groups + r0 / std::max<int64_t>(w.group, 1)) * d
                                    : nullptr;
    if (rows * rb <= kWholeSlabPrefetchBytes) {
      const int64_t row_scales = rows * w.row_groups * static_cast<int64_t>(sizeof(float));
      PrefetchWhole(w.gate + row * rb, rows * rb);
      if (gs != nullptr) PrefetchWhole(gs, row_scales);
      PrefetchWhole(w.up + row * rb, rows * rb);
      if (us != nullptr) PrefetchWhole(us, row_scales);
      PrefetchWhole(w.down + row * rb, rows * rb);
      if (ds != nullptr) PrefetchWhole(ds, CeilDiv(rows, w.group) * d * static_cast<int64_t>(sizeof(float)));
    }
    for (int64_t p0 = first_pair; p0 < last_pair; p0 += kMaxQuantDotTokens) {
      const int count = static_cast<int>(std::min<int64_t>(kMaxQuantDotTokens, last_pair - p0));
      const float* xs[kMaxQuantDotTokens];
      const float* sums[kMaxQuantDotTokens];
      for (int c = 0; c < count; ++c) {
        xs[c] = w.x + pair_token[p0 + c] * d;
        sums[c] = xsum + pair_token[p0 + c] * xgroups;
      }
      if (int8.dot != nullptr) {
        const uint8_t* tokens[kMaxQuantDotTokens];
        for (int c = 0; c < count; ++c) tokens[c] = int8.data + pair_token[p0 + c] * int8.stride;
        int8.dot(w.gate + row * rb, gs, rows, d, w.group, tokens, count, g, slab_rows);
        int8.dot(w.up + row * rb, us, rows, d, w.group, tokens, count, u, slab_rows);
      } else {
        qk.dot_rows(w.format, w.gate + row * rb, gs, rows, d, w.group, xs, sums, count, g, slab_rows);
        qk.dot_rows(w.format, w.up + row * rb, us, rows, d, w.group, xs, sums, count, u, slab_rows);
      }
      const float* hs[kMaxQuantDotTokens];
      float* outs[kMaxQuantDotTokens];
      for (int c = 0; c < count; ++c) {
        const int64_t p = p0 + c;
        ks.gated_activation(attrs.activation, g + c * slab_rows, u + c * slab_rows,
                            routing.coef[pair_token[p] * n + i], rows, h + c * slab_rows);
        hs[c] = h + c * slab_rows;
        outs[c] = t.out(p);
      }
      qk.accumulate_rows(w.format, w.down + row * rb, ds, hs, count, rows, d, w.group, acc, outs);
    }
  }
}

void ComputeQuantFfn(const Ort::KernelContext& ctx, const KernelSet& ks, const QuantKernelSet& qk,
                     const FfnAttributes& attrs, const QuantDims& qd, const QWeights& weights, float* y,
                     bool* active, bool int8_activations, Int4Int8Kernels int8_kernels) {
  const FfnDims& dims = qd.base;
  const int64_t N = dims.num_tokens, d = dims.hidden;
  if (N == 0) return;
  QWeights w = weights;
  // accuracy_level 4: routing on X as given (a router score near the threshold would otherwise flip
  // with the rounding: a whole block in or out), gate/up on x_hat, whose int8 values are packed for
  // the int4 x int8 GEMV (decode slabs and the prefill's gate/up slabs). A non-finite X leaves
  // int8.dot null: the float paths on x_hat's NaNs.
  const float* route_x = w.x;
  std::unique_ptr<float[]> x_hat, x_scales;
  std::unique_ptr<int8_t[]> x_int8;
  std::unique_ptr<int32_t[]> x_corr;
  std::unique_ptr<uint8_t[]> packed;
  Int8Tokens int8;
  if (int8_activations) {
    x_hat = HeapArray<float>(N * d);
    const bool want = int8_kernels.dot != nullptr && w.format == WeightFormat::kInt4;
    if (want) {
      x_int8 = HeapArray<int8_t>(N * d);
      x_scales = HeapArray<float>(N * w.row_groups);
    }
    if (qk.round_to_int8(w.x, N, d, w.group, x_hat.get(), x_int8.get(), x_scales.get()) && want) {
      x_corr = HeapArray<int32_t>(N * (d / 32));
      Int8ChunkCorrections(x_int8.get(), N, d, x_corr.get());
      if (MayUseDecodePath(dims)) {  // the GEMV's packed tokens
        const int64_t stride = Int8TokenBytes(d);
        packed = HeapArray<uint8_t>(N * stride + 63);
        uint8_t* base =
            reinterpret_cast<uint8_t*>((reinterpret_cast<uintptr_t>(packed.get()) + 63) & ~uintptr_t{63});
        for (int64_t t = 0; t < N; ++t) {
          PackInt8Token(x_int8.get() + t * d, x_scales.get() + t * w.row_groups, x_corr.get() + t * (d / 32), d,
                        w.group, base + t * stride);
        }
        int8.dot = int8_kernels.dot;
        int8.data = base;
        int8.stride = stride;
      }
      int8.slab = int8_kernels.slab;
      int8.rows = {x_int8.get(), x_scales.get(), x_corr.get(), w.row_groups};
    }
    w.x = x_hat.get();
  }
  if (!MayUseDecodePath(dims)) return ComputePrefill(ctx, ks, qk, attrs, qd, w, route_x, nullptr, active, y, int8);
  const Routing routing = Route(ctx, ks, attrs, dims, route_x, w.router, w.bias);
  WriteActive(routing, dims, active);
  if (UsesDecodePath(dims, routing, kQuantDecodeBounds)) {
    // Per-token sums of X over each scale group: the zero point of dot_rows (the int4 x int8 GEMV
    // has its own).
    auto xsum = HeapArray<float>(N * std::max<int64_t>(w.row_groups, 1));
    if (int8.dot == nullptr) QuantGroupSums(qk, w, N, d, xsum.get());
    DecodeSlabs(ctx, dims, routing, QuantDecodeSlabRows(w), w.row_bytes,
                QuantDecodeTask{ks, qk, attrs, qd, w, routing, xsum.get(), int8}, y);
    return;
  }
  ComputePrefill(ctx, ks, qk, attrs, qd, w, route_x, &routing, active, y, int8);
}

namespace {

class QuantCpuKernel {
 public:
  using Variant = QuantKind;
  static OpSignature Signature(QuantKind kind);

  QuantCpuKernel(QuantKind kind, const Ort::ConstKernelInfo& info)
      : kind_(kind), attrs_(ParseQuantAttributes(kind, info)), kernels_(SelectKernels()),
        quant_(SelectQuantKernels()), int8_(SelectInt4Int8Kernels(quant_)) {}

  void Prepare(const Ort::ConstKernelInfo& info) const {
    if (kind_ == QuantKind::kF16) {
      AdviseConstantInputs(info, {kGateWeight, kUpWeight, kDownWeight});
    } else {
      AdviseConstantInputs(info, {kQGateWeight, kQGateScales, kQUpWeight, kQUpScales, kQDownWeight, kQDownScales});
    }
  }

  void Compute(Ort::KernelContext& ctx) const {
    const QuantInputs in = GetQuantInputs(kind_, ctx, attrs_);
    const QuantDims& qd = in.dims;
    const Outputs out = GetOutputs(ctx, qd.base);
    if (qd.base.num_tokens == 0) return;
    QWeights w = QuantWeightsOf(FormatOf(kind_), attrs_.group_size, qd, in.router_weight, in.router_bias, in.gate,
                                in.gate_scales, in.up, in.up_scales, in.down, in.down_scales);
    w.x = in.x.GetTensorData<float>();
    ComputeQuantFfn(ctx, kernels_, quant_, attrs_.base, qd, w, out.y, out.active, attrs_.int8_activations(),
                    int8_);
  }

 private:
  QuantKind kind_;
  QuantAttributes attrs_;
  const KernelSet& kernels_;
  const QuantKernelSet& quant_;
  Int4Int8Kernels int8_;
};

// Inputs per docs/op-spec.md "Quantized variants": the F16 op has the float32 op's inputs with
// float16 weights; Int4/Int8 add a scale input after each weight (QuantInput).
OpSignature QuantCpuKernel::Signature(QuantKind kind) {
  constexpr auto f32 = ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
  if (kind == QuantKind::kF16) {
    std::vector<ONNXTensorElementDataType> inputs(kNumFfnInputs, f32);
    for (const size_t i : {kGateWeight, kUpWeight, kDownWeight}) inputs[i] = ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16;
    return {QuantOpName(kind), "CPUExecutionProvider", inputs, kRouterBias, FfnOutputTypes(f32), kActive};
  }
  std::vector<ONNXTensorElementDataType> inputs(kNumQuantInputs, f32);
  for (const size_t i : {kQGateWeight, kQUpWeight, kQDownWeight}) inputs[i] = ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8;
  return {QuantOpName(kind), "CPUExecutionProvider", inputs, kQRouterBias, FfnOutputTypes(f32), kActive};
}

}  // namespace

void RegisterQuantOps(Ort::CustomOpDomain& domain) {
  static const FfnOp<QuantCpuKernel> int4(QuantKind::kInt4), int8(QuantKind::kInt8), f16(QuantKind::kF16);
  domain.Add(&int4);
  domain.Add(&int8);
  domain.Add(&f16);
}

}  // namespace dsmoe::cpu
