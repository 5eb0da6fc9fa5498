// CPU kernels of org.dsmoe::GatedBlockSparseFFNInt4 / Int8 / F16 (weight-only
// quantized blocks, float32 activations; docs/op-spec.md "Quantized variants").
#pragma once

#include <cstdint>

#include "common/ffn_quant_params.h"
#include "cpu/decode.h"
#include "cpu/int8_activations.h"
#include "cpu/kernels.h"
#include "cpu/kernels_quant.h"
#include "cpu/plan.h"
#include "onnxruntime_cxx_api.h"

namespace dsmoe::cpu {

// A quantized op's weights as the node's inputs hold them, and its tokens x [N, d].
struct QWeights {
  WeightFormat format;
  int64_t group;  // scale group size (0 for float16)
  const float* x;
  const float* router;
  const float* bias;
  const uint8_t *gate, *up, *down;  // [n, B, row_bytes]
  const float *gate_scales, *up_scales, *down_scales;  // nullptr for float16
  int64_t row_bytes, row_groups, block_groups;
};

// The weights of a quantized op's tensors (router_bias and, for float16, the scales may be
// empty); x is the caller's to set.
QWeights QuantWeightsOf(WeightFormat format, int64_t group, const QuantDims& qd, const Ort::ConstValue& router,
                        const Ort::ConstValue& bias, const Ort::ConstValue& gate, const Ort::ConstValue& gate_scales,
                        const Ort::ConstValue& up, const Ort::ConstValue& up_scales, const Ort::ConstValue& down,
                        const Ort::ConstValue& down_scales);

// Decode slab rows: whole scale groups of the down rows (the group size is a power of two).
int64_t QuantDecodeSlabRows(const QWeights& w);
// xsum[t * row_groups + g]: the sum of x[t] over scale group g (integer formats; none for float16).
void QuantGroupSums(const QuantKernelSet& qk, const QWeights& w, int64_t num_tokens, int64_t d, float* xsum);

// accuracy_level 4 on int4 weights: the call's tokens packed for the int4 x int8 GEMV (token t at
// data + t * stride), which then replaces dot_rows, and as rows for the prefill's slab GEMM;
// dot nullptr: dot_rows and the float slabs on x (x_hat).
struct Int8Tokens {
  Int4Int8DotFn dot = nullptr;
  const uint8_t* data = nullptr;
  int64_t stride = 0;
  Int4Int8SlabFn slab = nullptr;
  Int8Rows rows{};
};

// One decode task (cpu/decode.h) of the quantized kernel; xsum from QuantGroupSums.
struct QuantDecodeTask {
  const KernelSet& ks;
  const QuantKernelSet& qk;
  const FfnAttributes& attrs;
  const QuantDims& qd;
  const QWeights& w;
  const Routing& routing;
  const float* xsum;
  Int8Tokens int8{};
  void operator()(const DecodeTask& t) const;
};

// y [N, d] = the quantized op on w.x: routing, then the decode or the prefill path; `active`
// (or nullptr) gets the routing's flags. N = 0: nothing. int8_activations (accuracy_level 4):
// the routing on w.x as given, gate/up on x_hat, w.x rounded to int8 per group (round_to_int8),
// the int4 decode GEMV and prefill slab GEMM through `int8` when it has them.
void ComputeQuantFfn(const Ort::KernelContext& ctx, const KernelSet& ks, const QuantKernelSet& qk,
                     const FfnAttributes& attrs, const QuantDims& qd, const QWeights& w, float* y, bool* active,
                     bool int8_activations = false, Int4Int8Kernels int8 = {});

// Adds the three ops to the domain (called by RegisterCustomOps).
void RegisterQuantOps(Ort::CustomOpDomain& domain);

}  // namespace dsmoe::cpu
