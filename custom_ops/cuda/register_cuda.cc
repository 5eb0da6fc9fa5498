#include "cuda/register_cuda.h"

namespace dsmoe::cuda {

void RegisterOps(Ort::CustomOpDomain& domain) {
#ifdef DSMOE_WITH_CUDA
  // The CUDA kernel goes here (a later task), following the CPU side:
  //   static const GatedBlockSparseFfnOp<FfnCudaKernel<float>> op_f32;   // kExecutionProvider
  //   domain.Add(&op_f32);                                              // = "CUDAExecutionProvider"
  // with the launchers in ffn_cuda_impl.{cuh,cu}; the stream comes from
  // Ort::KernelContext::GetGPUComputeStream().
#endif
  (void)domain;
}

}  // namespace dsmoe::cuda
