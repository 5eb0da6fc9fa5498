#include "cuda/register_cuda.h"

#include "common/ffn_op.h"

#ifdef DSMOE_WITH_CUDA
#include "cuda/ffn_cuda.h"
#else
#include <stdexcept>
#endif

namespace dsmoe::cuda {

#ifndef DSMOE_WITH_CUDA
namespace {

// A build without CUDA kernels (no nvcc at build time) still declares the float16 and bfloat16
// ops for the CUDA EP, as the CUDA build does: ONNX Runtime checks a graph's types against the
// union of a custom op's registered types, so without them a float16 export is an invalid model
// for every EP, the CPU EP's run of its ONNX function included (what the exporter validates with).
// A CUDA EP session that picks one of these gets this error when it creates the kernel. float32
// is not declared: its nodes stay with the CPU kernel, as before.
template <ONNXTensorElementDataType kType>
class KernelNotBuilt {
 public:
  using Variant = NoVariant;
  static OpSignature Signature(NoVariant) { return FloatOpSignature("CUDAExecutionProvider", kType); }
  KernelNotBuilt(NoVariant, const Ort::ConstKernelInfo&) {
    throw std::runtime_error(
        "this dsmoe_ops library was built without its CUDA kernels (nvcc was not found when it was built): "
        "rebuild it where nvcc is installed (pip install . with the CUDA toolkit), or run the graph on the "
        "CPU EP, which computes float16 nodes through the op's ONNX function");
  }
  void Compute(Ort::KernelContext&) const {}
};

}  // namespace
#endif

void RegisterOps(Ort::CustomOpDomain& domain) {
#ifdef DSMOE_WITH_CUDA
  // One op per element type, same domain and name: ONNX Runtime merges them into
  // one schema (type constraints = the union) and picks the kernel by EP and type.
  // Registering needs no GPU: nothing CUDA runs until a CUDA EP session computes.
  static const FfnOp<FfnCudaKernel<ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT>> op_f32;
  static const FfnOp<FfnCudaKernel<ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16>> op_f16;
  static const FfnOp<FfnCudaKernel<ONNX_TENSOR_ELEMENT_DATA_TYPE_BFLOAT16>> op_bf16;
  domain.Add(&op_f32);
#else
  static const FfnOp<KernelNotBuilt<ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16>> op_f16;
  static const FfnOp<KernelNotBuilt<ONNX_TENSOR_ELEMENT_DATA_TYPE_BFLOAT16>> op_bf16;
#endif
  domain.Add(&op_f16);
  domain.Add(&op_bf16);
}

}  // namespace dsmoe::cuda
