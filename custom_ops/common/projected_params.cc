#include "common/projected_params.h"

#include <algorithm>
#include <cmath>
#include <sstream>
#include <string>

namespace dsmoe {
namespace {

constexpr const char* kNames[kNumProjectedInputs] = {
    "A", "skip", "in_proj_weight", "norm_weight", "router_weight", "gate_weight", "up_weight", "down_weight",
    "out_norm_weight", "out_proj_weight", "router_bias"};

// The one shape message of both ops' inputs.
void ExpectShape(const char* name, const Shape& actual, const Shape& expected, const char* symbolic) {
  if (actual != expected) {
    ThrowInvalidArgument(std::string("input '") + name + "' must have shape " + symbolic + " = " +
                         ShapeToString(expected) + ", got " + ShapeToString(actual));
  }
}

void Expect(ProjectedInput input, const Shape& actual, const Shape& expected, const char* symbolic) {
  ExpectShape(kNames[input], actual, expected, symbolic);
}

}  // namespace

ProjectedAttributes ParseProjectedAttributes(const Ort::ConstKernelInfo& info) {
  ProjectedAttributes a;
  a.ffn = ParseAttributes(info);
  try {
    a.epsilon = info.GetAttribute<float>("epsilon");
  } catch (const Ort::Exception&) {
    ThrowInvalidArgument("attribute 'epsilon' is required (a float > 0: the RMSNorms' epsilon)");
  }
  if (!(std::isfinite(a.epsilon) && a.epsilon > 0.0f)) {
    std::ostringstream os;
    os << "attribute 'epsilon' must be finite and > 0, got " << a.epsilon;
    ThrowInvalidArgument(os.str());
  }
  return a;
}

ProjectedDims CheckProjectedShapes(const ProjectedAttributes& attrs, const Shape& a, const Shape& skip,
                                   const Shape& in_proj, const Shape& norm, const Shape& router_weight,
                                   const Shape& gate, const Shape& up, const Shape& down, const Shape& out_norm,
                                   const Shape& out_proj, const Shape* router_bias) {
  // skip is the FFN's X: named here before the FFN's checks would call it X.
  if (skip.empty()) ThrowInvalidArgument("input 'skip' must have rank >= 1 ([..., d]), got a scalar");
  // d is dim 2 of gate_weight in both of its layouts
  if (gate.size() >= 3 && skip.back() != gate[2]) {
    ThrowInvalidArgument("input 'skip' must have last dim d = " + std::to_string(gate[2]) +
                         " (from gate_weight), got " + ShapeToString(skip));
  }
  ProjectedDims dims;
  dims.ffn = CheckShapes(attrs.ffn, skip, router_weight, gate, up, down, router_bias);
  const int64_t d = dims.ffn.hidden;
  if (a.size() != skip.size() || !std::equal(skip.begin(), skip.end() - 1, a.begin())) {
    ThrowInvalidArgument("input 'A' must have the leading dims of 'skip' " + ShapeToString(skip) +
                         " and a last dim k, got " + ShapeToString(a));
  }
  dims.in_features = a.back();
  if (dims.in_features < 1) ThrowInvalidArgument("input 'A' must have a last dim k >= 1, got " + ShapeToString(a));
  Expect(kPInProj, in_proj, {d, dims.in_features}, "[d, k]");
  Expect(kPNorm, norm, {d}, "[d]");
  Expect(kPOutNorm, out_norm, {d}, "[d]");
  if (out_proj.size() != 2 || out_proj[0] < 1 || out_proj[1] != d) {
    ThrowInvalidArgument("input 'out_proj_weight' must have shape [p, d] with p >= 1, d = " + std::to_string(d) +
                         ", got " + ShapeToString(out_proj));
  }
  dims.out_features = out_proj[0];
  CheckedMul(dims.ffn.num_tokens, std::max(dims.in_features, dims.out_features), "N * max(k, p)");
  dims.y_shape.assign(skip.begin(), skip.end() - 1);
  dims.y_shape.push_back(dims.out_features);
  return dims;
}

ProjectedInputs GetProjectedInputs(const Ort::KernelContext& ctx, const ProjectedAttributes& attrs) {
  ProjectedInputs in;
  in.a = RequiredInput(ctx, kPA, kNames[kPA]);
  in.skip = RequiredInput(ctx, kPSkip, kNames[kPSkip]);
  in.in_proj = RequiredInput(ctx, kPInProj, kNames[kPInProj]);
  in.norm = RequiredInput(ctx, kPNorm, kNames[kPNorm]);
  in.router_weight = RequiredInput(ctx, kPRouterWeight, kNames[kPRouterWeight]);
  in.gate = RequiredInput(ctx, kPGate, kNames[kPGate]);
  in.up = RequiredInput(ctx, kPUp, kNames[kPUp]);
  in.down = RequiredInput(ctx, kPDown, kNames[kPDown]);
  in.out_norm = RequiredInput(ctx, kPOutNorm, kNames[kPOutNorm]);
  in.out_proj = RequiredInput(ctx, kPOutProj, kNames[kPOutProj]);
  if (ctx.GetInputCount() > kPRouterBias) in.router_bias = ctx.GetInput(kPRouterBias);
  const Shape bias = in.router_bias ? ShapeOf(in.router_bias) : Shape{};
  in.dims = CheckProjectedShapes(attrs, ShapeOf(in.a), ShapeOf(in.skip), ShapeOf(in.in_proj), ShapeOf(in.norm),
                                 ShapeOf(in.router_weight), ShapeOf(in.gate), ShapeOf(in.up), ShapeOf(in.down),
                                 ShapeOf(in.out_norm), ShapeOf(in.out_proj), in.router_bias ? &bias : nullptr);
  return in;
}

namespace {

constexpr const char* kInt4Names[kNumProjectedInt4Inputs] = {
    "A", "skip", "in_proj_weight", "in_proj_scales", "norm_weight", "router_weight", "gate_weight", "gate_scales",
    "up_weight", "up_scales", "down_weight", "down_scales", "out_norm_weight", "out_proj_weight", "out_proj_scales",
    "router_bias"};

void ExpectInt4(ProjectedInt4Input input, const Shape& actual, const Shape& expected, const char* symbolic) {
  ExpectShape(kInt4Names[input], actual, expected, symbolic);
}

}  // namespace

ProjectedInt4Attributes ParseProjectedInt4Attributes(const Ort::ConstKernelInfo& info) {
  ProjectedInt4Attributes a;
  a.quant = ParseQuantAttributes(QuantKind::kInt4, info);
  if (a.quant.int8_activations()) {
    ThrowInvalidArgument("attribute 'accuracy_level' = 4 (int8 activations) is GatedBlockSparseFFNInt4's; "
                         "ProjectedSparseFFNInt4 takes 0 to 3 (float32 activations)");
  }
  a.epsilon = ParseProjectedAttributes(info).epsilon;
  return a;
}

ProjectedInt4Inputs GetProjectedInt4Inputs(const Ort::KernelContext& ctx, const ProjectedInt4Attributes& attrs) {
  ProjectedInt4Inputs in;
  Ort::ConstValue* required[] = {&in.a, &in.skip, &in.in_proj, &in.in_scales, &in.norm, &in.router_weight, &in.gate,
                                 &in.gate_scales, &in.up, &in.up_scales, &in.down, &in.down_scales, &in.out_norm,
                                 &in.out_proj, &in.out_scales};
  for (size_t i = 0; i < kQPRouterBias; ++i) *required[i] = RequiredInput(ctx, i, kInt4Names[i]);
  if (ctx.GetInputCount() > kQPRouterBias) in.router_bias = ctx.GetInput(kQPRouterBias);
  const Shape a = ShapeOf(in.a), skip = ShapeOf(in.skip), router = ShapeOf(in.router_weight);
  if (skip.empty()) ThrowInvalidArgument("input 'skip' must have rank >= 1 ([..., d]), got a scalar");
  if (router.size() == 2 && skip.back() != router[1]) {
    ThrowInvalidArgument("input 'skip' must have last dim d = " + std::to_string(router[1]) +
                         " (from router_weight), got " + ShapeToString(skip));
  }
  const Shape gate_s = ShapeOf(in.gate_scales), up_s = ShapeOf(in.up_scales), down_s = ShapeOf(in.down_scales);
  const Shape bias = in.router_bias ? ShapeOf(in.router_bias) : Shape{};
  ProjectedInt4Dims& dims = in.dims;
  dims.quant = CheckQuantShapes(QuantKind::kInt4, attrs.quant, skip, router, ShapeOf(in.gate), &gate_s, ShapeOf(in.up),
                                &up_s, ShapeOf(in.down), &down_s, in.router_bias ? &bias : nullptr);
  const int64_t d = dims.quant.base.hidden, G = attrs.quant.group_size;
  if (a.size() != skip.size() || !std::equal(skip.begin(), skip.end() - 1, a.begin())) {
    ThrowInvalidArgument("input 'A' must have the leading dims of 'skip' " + ShapeToString(skip) +
                         " and a last dim k, got " + ShapeToString(a));
  }
  const int64_t k = dims.in_features = a.back();
  if (k < 1 || k % G != 0 || d % G != 0) {
    ThrowInvalidArgument("the projections' input sizes (A's last dim k = " + std::to_string(k) + ", d = " +
                         std::to_string(d) + ") must be multiples of attribute 'group_size' = " + std::to_string(G));
  }
  ExpectInt4(kQPInProj, ShapeOf(in.in_proj), {d, k / G, G / 2}, "[d, k / group_size, group_size / 2]");
  ExpectInt4(kQPInProjScales, ShapeOf(in.in_scales), {d, k / G}, "[d, k / group_size]");
  ExpectInt4(kQPNorm, ShapeOf(in.norm), {d}, "[d]");
  ExpectInt4(kQPOutNorm, ShapeOf(in.out_norm), {d}, "[d]");
  const Shape out_proj = ShapeOf(in.out_proj);
  if (out_proj.size() != 3 || out_proj[0] < 1 || out_proj[1] != d / G || out_proj[2] != G / 2) {
    ThrowInvalidArgument("input 'out_proj_weight' must have shape [p, d / group_size, group_size / 2] with p >= 1 = [p, " +
                         std::to_string(d / G) + ", " + std::to_string(G / 2) + "], got " + ShapeToString(out_proj));
  }
  dims.out_features = out_proj[0];
  ExpectInt4(kQPOutProjScales, ShapeOf(in.out_scales), {dims.out_features, d / G}, "[p, d / group_size]");
  CheckedMul(dims.quant.base.num_tokens, std::max(k, dims.out_features), "N * max(k, p)");
  dims.y_shape.assign(skip.begin(), skip.end() - 1);
  dims.y_shape.push_back(dims.out_features);
  return in;
}

}  // namespace dsmoe
