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

void Expect(ProjectedInput input, const Shape& actual, const Shape& expected, const char* symbolic) {
  if (actual != expected) {
    ThrowInvalidArgument(std::string("input '") + kNames[input] + "' must have shape " + symbolic + " = " +
                         ShapeToString(expected) + ", got " + ShapeToString(actual));
  }
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
  if (gate.size() == 3 && skip.back() != gate[2]) {
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

namespace {

Ort::ConstValue Required(const Ort::KernelContext& ctx, size_t index) {
  Ort::ConstValue v = ctx.GetInput(index);
  if (!v) ThrowInvalidArgument(std::string("input '") + kNames[index] + "' is required");
  return v;
}

Shape ShapeOf(const Ort::ConstValue& v) { return v.GetTensorTypeAndShapeInfo().GetShape(); }

}  // namespace

ProjectedInputs GetProjectedInputs(const Ort::KernelContext& ctx, const ProjectedAttributes& attrs) {
  ProjectedInputs in;
  in.a = Required(ctx, kPA);
  in.skip = Required(ctx, kPSkip);
  in.in_proj = Required(ctx, kPInProj);
  in.norm = Required(ctx, kPNorm);
  in.router_weight = Required(ctx, kPRouterWeight);
  in.gate = Required(ctx, kPGate);
  in.up = Required(ctx, kPUp);
  in.down = Required(ctx, kPDown);
  in.out_norm = Required(ctx, kPOutNorm);
  in.out_proj = Required(ctx, kPOutProj);
  if (ctx.GetInputCount() > kPRouterBias) in.router_bias = ctx.GetInput(kPRouterBias);
  const Shape bias = in.router_bias ? ShapeOf(in.router_bias) : Shape{};
  in.dims = CheckProjectedShapes(attrs, ShapeOf(in.a), ShapeOf(in.skip), ShapeOf(in.in_proj), ShapeOf(in.norm),
                                 ShapeOf(in.router_weight), ShapeOf(in.gate), ShapeOf(in.up), ShapeOf(in.down),
                                 ShapeOf(in.out_norm), ShapeOf(in.out_proj), in.router_bias ? &bias : nullptr);
  return in;
}

}  // namespace dsmoe
