#include "cuda/register_cuda.h"

#ifdef DSMOE_WITH_CUDA
#include "common/ffn_op.h"
#include "cuda/ffn_cuda.h"
#endif

namespace dsmoe::cuda {

void RegisterOps(Ort::CustomOpDomain& domain) {
#ifdef DSMOE_WITH_CUDA
  // One op per element type, same domain and name: ONNX Runtime merges them into
  // one schema (type constraints = the union) and picks the kernel by EP and type.
  // Registering needs no GPU: nothing CUDA runs until a CUDA EP session computes.
  static const FfnOp<FfnCudaKernel<ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT>> op_f32;
  static const FfnOp<FfnCudaKernel<ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16>> op_f16;
  static const FfnOp<FfnCudaKernel<ONNX_TENSOR_ELEMENT_DATA_TYPE_BFLOAT16>> op_bf16;
  domain.Add(&op_f32);
  domain.Add(&op_f16);
  domain.Add(&op_bf16);
#endif
  (void)domain;
}

}  // namespace dsmoe::cuda
