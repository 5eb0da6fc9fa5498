// CPU kernel of org.dsmoe::GatedBlockSparseFFN (float32).
#pragma once

#include "common/ffn_op.h"
#include "common/ffn_params.h"
#include "cpu/decode.h"
#include "cpu/kernels.h"
#include "cpu/plan.h"

namespace dsmoe::cpu {

// The float32 op's weights, as the node's inputs hold them (docs/op-spec.md).
struct FloatFfnWeights {
  const float* router;  // [n, d]
  const float* bias;    // [n] or nullptr
  const float* gate;    // [n, B, d]
  const float* up;      // [n, B, d]
  const float* down;    // [n, B, d] or column tiles (DownOffset)
};

// One decode task (cpu/decode.h) of the float32 kernel on tokens x [N, d].
struct FloatDecodeTask {
  const KernelSet& ks;
  const FfnAttributes& attrs;
  const FfnDims& dims;
  const float* x;
  const FloatFfnWeights& w;
  const Routing& routing;
  void operator()(const DecodeTask& t) const;
};

// y [N, d] = the op on x [N, d]: routing, then the decode or the prefill path; `active`
// (N x n, or nullptr) gets the routing's flags. N = 0: nothing.
void ComputeFloatFfn(const Ort::KernelContext& ctx, const KernelSet& ks, const FfnAttributes& attrs,
                     const FfnDims& dims, const float* x, const FloatFfnWeights& w, float* y, bool* active);

class FfnCpuKernel {
 public:
  using Variant = NoVariant;
  static OpSignature Signature(NoVariant) {
    return FloatOpSignature("CPUExecutionProvider", ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT);
  }

  FfnCpuKernel(NoVariant, const Ort::ConstKernelInfo& info)
      : attrs_(ParseAttributes(info)), kernels_(SelectKernels()) {}
  // Constant gate/up/down weights (initializers) onto huge pages (cpu/hugepages.h).
  void Prepare(const Ort::ConstKernelInfo& info) const;
  void Compute(Ort::KernelContext& ctx) const;

 private:
  FfnAttributes attrs_;
  const KernelSet& kernels_;
};

// Adds the CPU kernels to the domain (called by RegisterCustomOps).
void RegisterOps(Ort::CustomOpDomain& domain);

}  // namespace dsmoe::cpu
