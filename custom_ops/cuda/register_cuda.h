// CUDA kernels of org.dsmoe::GatedBlockSparseFFN (CUDA execution provider).
#pragma once

#include "onnxruntime_cxx_api.h"

namespace dsmoe::cuda {

// Adds the CUDA kernels to the domain; does nothing in a build without CUDA.
void RegisterOps(Ort::CustomOpDomain& domain);

}  // namespace dsmoe::cuda
