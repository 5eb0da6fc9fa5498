// CUDA kernel of org.dsmoe::GatedBlockSparseFFN for ONNX Runtime's CUDA execution
// provider (float32, float16, bfloat16): inputs and outputs in device memory, the
// work enqueued on ORT's compute stream, scratch from ORT's allocator of X's
// device. The kernels are in forward.cu and the stage files it calls.
#pragma once

#include "common/ffn_op.h"
#include "common/ffn_params.h"

namespace dsmoe::cuda {

template <ONNXTensorElementDataType kType>
class FfnCudaKernel {
 public:
  using Variant = NoVariant;
  static OpSignature Signature(NoVariant) { return FloatOpSignature("CUDAExecutionProvider", kType); }

  FfnCudaKernel(NoVariant, const Ort::ConstKernelInfo& info)
      : attrs_(RequireGateUpRows(ParseAttributes(info), "the CUDA kernel",
                                 ": export float32 graphs for the CUDA EP with --gate-up-layout rows")) {}
  void Compute(Ort::KernelContext& ctx) const;

 private:
  FfnAttributes attrs_;
};

}  // namespace dsmoe::cuda
