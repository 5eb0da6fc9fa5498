// org.dsmoe::ProjectedSparseFFN: the sparse FFN between the attention's output projection
// and the next layer's Q, K, V projection, with the residual adds and RMSNorms between them
// (docs/op-spec.md "ProjectedSparseFFN"). Names, attributes and shape checks.
#pragma once

#include <cstdint>

#include "common/ffn_params.h"
#include "common/ffn_quant_params.h"

namespace dsmoe {

inline constexpr const char* kProjectedOpName = "ProjectedSparseFFN";

enum ProjectedInput : size_t {
  kPA, kPSkip, kPInProj, kPNorm, kPRouterWeight, kPGate, kPUp, kPDown, kPOutNorm, kPOutProj, kPRouterBias,
  kNumProjectedInputs
};
enum ProjectedOutput : size_t { kPY, kPSkipOut, kPActive, kNumProjectedOutputs };

struct ProjectedAttributes {
  FfnAttributes ffn;     // GatedBlockSparseFFN's, same rules
  float epsilon = 0.0f;  // of both RMSNorms: required, finite and > 0
};

struct ProjectedDims {
  FfnDims ffn;                 // of the FFN on the normalised residual stream [N, d]
  int64_t in_features = 0;     // k: A's last dim, in_proj_weight [d, k]
  int64_t out_features = 0;    // p: out_proj_weight [p, d]
  std::vector<int64_t> y_shape;  // A's leading dims + [p]
};

ProjectedAttributes ParseProjectedAttributes(const Ort::ConstKernelInfo& info);

// The checks alone (shapes as given), for every device; bias may be nullptr.
ProjectedDims CheckProjectedShapes(const ProjectedAttributes& attrs, const Shape& a, const Shape& skip,
                                   const Shape& in_proj, const Shape& norm, const Shape& router_weight,
                                   const Shape& gate, const Shape& up, const Shape& down, const Shape& out_norm,
                                   const Shape& out_proj, const Shape* router_bias);

struct ProjectedInputs {
  Ort::ConstValue a{nullptr}, skip{nullptr}, in_proj{nullptr}, norm{nullptr}, router_weight{nullptr}, gate{nullptr},
      up{nullptr}, down{nullptr}, out_norm{nullptr}, out_proj{nullptr}, router_bias{nullptr};
  ProjectedDims dims;
};
ProjectedInputs GetProjectedInputs(const Ort::KernelContext& ctx, const ProjectedAttributes& attrs);

// ProjectedSparseFFNInt4: the projections in MatMulNBits' int4 layout ([rows, in / G, G / 2] bytes,
// scales [rows, in / G]), the FFN's blocks as GatedBlockSparseFFNInt4's (op-spec).
inline constexpr const char* kProjectedInt4OpName = "ProjectedSparseFFNInt4";

enum ProjectedInt4Input : size_t {
  kQPA, kQPSkip, kQPInProj, kQPInProjScales, kQPNorm, kQPRouterWeight, kQPGate, kQPGateScales, kQPUp, kQPUpScales,
  kQPDown, kQPDownScales, kQPOutNorm, kQPOutProj, kQPOutProjScales, kQPRouterBias, kNumProjectedInt4Inputs
};

struct ProjectedInt4Attributes {
  QuantAttributes quant;  // GatedBlockSparseFFNInt4's (group_size also the projections' block size)
  float epsilon = 0.0f;
};

struct ProjectedInt4Dims {
  QuantDims quant;  // of the FFN on the normalised residual stream [N, d]
  int64_t in_features = 0, out_features = 0;
  std::vector<int64_t> y_shape;
};

ProjectedInt4Attributes ParseProjectedInt4Attributes(const Ort::ConstKernelInfo& info);

struct ProjectedInt4Inputs {
  Ort::ConstValue a{nullptr}, skip{nullptr}, in_proj{nullptr}, in_scales{nullptr}, norm{nullptr},
      router_weight{nullptr}, gate{nullptr}, gate_scales{nullptr}, up{nullptr}, up_scales{nullptr}, down{nullptr},
      down_scales{nullptr}, out_norm{nullptr}, out_proj{nullptr}, out_scales{nullptr}, router_bias{nullptr};
  ProjectedInt4Dims dims;
};
ProjectedInt4Inputs GetProjectedInt4Inputs(const Ort::KernelContext& ctx, const ProjectedInt4Attributes& attrs);

}  // namespace dsmoe
