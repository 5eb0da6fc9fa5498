// CPU kernel of org.dsmoe::GatedBlockSparseFFN (float32).
#pragma once

#include "common/ffn_op.h"
#include "common/ffn_params.h"
#include "cpu/kernels.h"

namespace dsmoe::cpu {

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
