// org.dsmoe::GatedBlockSparseFFNInt4 / Int8 / F16 (weight-only quantized
// variants of GatedBlockSparseFFN, docs/op-spec.md "Quantized variants"):
// names, the extra attribute and the shape checks, written once for every device.
#pragma once

#include <cstdint>
#include <string>

#include "common/ffn_params.h"

namespace dsmoe {

enum class QuantKind { kInt4, kInt8, kF16 };

// Op type, for a kind.
const char* QuantOpName(QuantKind kind);

// Inputs of the Int4/Int8 ops; the F16 op has the float32 op's inputs (FfnInput).
enum QuantInput : size_t {
  kQX, kQRouterWeight, kQGateWeight, kQGateScales, kQUpWeight, kQUpScales, kQDownWeight, kQDownScales,
  kQRouterBias, kNumQuantInputs
};

struct QuantAttributes {
  FfnAttributes base;      // the float32 op's attributes, same rules
  int64_t group_size = 0;  // Int4/Int8: a power of two >= 32; 0 for F16 (no groups)
  // Int4/Int8 (op-spec "accuracy_level"): 0-3 X as given, 4 X rounded to int8 per group of
  // group_size columns (MatMulNBits' level 4); always 0 for F16.
  int64_t accuracy_level = 0;
  bool int8_activations() const { return accuracy_level == 4; }
};

struct QuantDims {
  FfnDims base;
  int64_t row_bytes = 0;     // bytes of one weight row: d / 2 (int4), d (int8), 2 d (f16)
  int64_t row_groups = 0;    // ceil(d / group_size): scale groups of a gate/up row
  int64_t block_groups = 0;  // ceil(B / group_size): scale rows of a down block
};

QuantAttributes ParseQuantAttributes(QuantKind kind, const Ort::ConstKernelInfo& info);

// The node's tensors (router_bias and, for F16, the scales empty) and their checked sizes.
struct QuantInputs {
  Ort::ConstValue x{nullptr}, router_weight{nullptr}, gate{nullptr}, gate_scales{nullptr}, up{nullptr},
      up_scales{nullptr}, down{nullptr}, down_scales{nullptr}, router_bias{nullptr};
  QuantDims dims;
};
QuantInputs GetQuantInputs(QuantKind kind, const Ort::KernelContext& ctx, const QuantAttributes& attrs);

// The checks alone (shapes as given), for tests of the messages through ORT.
QuantDims CheckQuantShapes(QuantKind kind, const QuantAttributes& attrs, const Shape& x, const Shape& router_weight,
                           const Shape& gate, const Shape* gate_scales, const Shape& up, const Shape* up_scales,
                           const Shape& down, const Shape* down_scales, const Shape* router_bias);

}  // namespace dsmoe
