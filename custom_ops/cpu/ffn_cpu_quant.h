// CPU kernels of org.dsmoe::GatedBlockSparseFFNInt4 / Int8 / F16 (weight-only
// quantized blocks, float32 activations; docs/op-spec.md "Quantized variants").
#pragma once

#include "onnxruntime_cxx_api.h"

namespace dsmoe::cpu {

// Adds the three ops to the domain (called by RegisterCustomOps).
void RegisterQuantOps(Ort::CustomOpDomain& domain);

}  // namespace dsmoe::cpu
