// CUDA kernels of org.dsmoe::GatedBlockSparseFFN (CUDA execution provider).
#pragma once

#include "onnxruntime_cxx_api.h"

namespace dsmoe::cuda {

// Adds the CUDA kernels to the domain; a build without CUDA adds float16 / bfloat16 declarations
// whose kernels say so (register_cuda.cc).
void RegisterOps(Ort::CustomOpDomain& domain);

}  // namespace dsmoe::cuda
