#include "common/ffn_quant_params.h"

#include <limits>

namespace dsmoe {
namespace {

constexpr const char* kQuantInputNames[kNumQuantInputs] = {
    "X", "router_weight", "gate_weight", "gate_scales", "up_weight", "up_scales", "down_weight", "down_scales",
    "router_bias"};

void Expect(QuantInput input, const Shape& actual, const Shape& expected, const char* symbolic) {
  if (actual != expected) {
    ThrowInvalidArgument(std::string("input '") + kQuantInputNames[input] + "' must have shape " + symbolic + " = " +
                   ShapeToString(expected) + ", got " + ShapeToString(actual));
  }
}


}  // namespace

const char* QuantOpName(QuantKind kind) {
  switch (kind) {
    case QuantKind::kInt4: return "GatedBlockSparseFFNInt4";
    case QuantKind::kInt8: return "GatedBlockSparseFFNInt8";
    case QuantKind::kF16: return "GatedBlockSparseFFNF16";
  }
  return "?";
}

QuantAttributes ParseQuantAttributes(QuantKind kind, const Ort::ConstKernelInfo& info) {
  QuantAttributes a;
  a.base = RequireGateUpRows(ParseAttributes(info), "the quantized ops (their gate/up are [n, B, row_bytes])");
  if (a.base.down_tile != 0) {
    ThrowInvalidArgument("attribute 'down_tile' must be 0: its down_weight is [n, B, row_bytes] (the tiled layout is "
               "the float32 op's), got " + std::to_string(a.base.down_tile));
  }
  if (kind == QuantKind::kF16) return a;
  const int64_t g = RequiredIntAttribute(info, "group_size", "an int: a power of two >= 32");
  if (g < 32 || (g & (g - 1)) != 0) {
    ThrowInvalidArgument("attribute 'group_size' must be a power of two >= 32, got " + std::to_string(g));
  }
  a.group_size = g;
  if (OptionalIntAttribute(info, "accuracy_level", a.accuracy_level) &&
      (a.accuracy_level < 0 || a.accuracy_level > 4)) {
    ThrowInvalidArgument("attribute 'accuracy_level' must be 0, 1, 2, 3 or 4 (4: X rounded to int8 per group), got " +
                         std::to_string(a.accuracy_level));
  }
  return a;
}

QuantDims CheckQuantShapes(QuantKind kind, const QuantAttributes& attrs, const Shape& x, const Shape& router_weight,
                           const Shape& gate, const Shape* gate_scales, const Shape& up, const Shape* up_scales,
                           const Shape& down, const Shape* down_scales, const Shape* router_bias) {
  QuantDims q;
  if (kind == QuantKind::kF16) {
    q.base = CheckShapes(attrs.base, x, router_weight, gate, up, down, router_bias);
    q.row_bytes = 2 * q.base.hidden;
    return q;
  }
  // n and B from gate_weight, d from router_weight (a packed int4 row has d / 2 bytes).
  if (gate.size() != 3 || gate[0] < 1 || gate[1] < 1 || gate[2] < 1) {
    ThrowInvalidArgument("input 'gate_weight' must have shape [n, B, row_bytes] with n, B, row_bytes >= 1, got " +
                   ShapeToString(gate));
  }
  const int64_t n = gate[0], B = gate[1];
  if (router_weight.size() != 2 || router_weight[0] != n || router_weight[1] < 1) {
    ThrowInvalidArgument("input 'router_weight' must have shape [n, d] with n = " + std::to_string(n) +
                   " (from gate_weight) and d >= 1, got " + ShapeToString(router_weight));
  }
  const int64_t d = router_weight[1], G = attrs.group_size;
  if (kind == QuantKind::kInt4 && d % 32 != 0) {
    ThrowInvalidArgument("int4 weights need d (router_weight's last dim) to be a multiple of 32 (packing of 32 weights per "
               "16 bytes), got d = " + std::to_string(d));
  }
  q.row_bytes = kind == QuantKind::kInt4 ? d / 2 : d;
  q.row_groups = CeilDiv(d, G);
  q.block_groups = CeilDiv(B, G);
  const Shape w = {n, B, q.row_bytes};
  const char* w_sym = kind == QuantKind::kInt4 ? "[n, B, d / 2]" : "[n, B, d]";
  Expect(kQGateWeight, gate, w, w_sym);
  Expect(kQUpWeight, up, w, w_sym);
  Expect(kQDownWeight, down, w, w_sym);
  const Shape rs = {n, B, q.row_groups}, ds = {n, q.block_groups, d};
  Expect(kQGateScales, *gate_scales, rs, "[n, B, ceil(d / group_size)]");
  Expect(kQUpScales, *up_scales, rs, "[n, B, ceil(d / group_size)]");
  Expect(kQDownScales, *down_scales, ds, "[n, ceil(B / group_size), d]");
  if (n != attrs.base.num_experts) {
    ThrowInvalidArgument("attribute 'num_experts' = " + std::to_string(attrs.base.num_experts) + " does not match n = " +
                   std::to_string(n) + " of the weights (gate_weight " + ShapeToString(gate) + ")");
  }
  FfnDims& dims = q.base;
  dims.num_blocks = n;
  dims.block_size = B;
  dims.hidden = d;
  if (router_bias != nullptr) {
    Expect(kQRouterBias, *router_bias, {n}, "[n]");
    dims.has_bias = true;
  }
  const int64_t tokens = dims.num_tokens = CheckedTokens(x, d, "router_weight");
  CheckedMul(CheckedMul(tokens, n, "N * n"), B, "N * n * B");
  CheckedMul(CheckedMul(n, B, "n * B"), d, "n * B * d");
  dims.y_shape = x;
  dims.active_shape.assign(x.begin(), x.end() - 1);
  dims.active_shape.push_back(n);
  return q;
}

QuantInputs GetQuantInputs(QuantKind kind, const Ort::KernelContext& ctx, const QuantAttributes& attrs) {
  QuantInputs in;
  if (kind == QuantKind::kF16) {
    const FfnInputs f = GetInputs(ctx, attrs.base);
    in.x = f.x;
    in.router_weight = f.router_weight;
    in.gate = f.gate_weight;
    in.up = f.up_weight;
    in.down = f.down_weight;
    in.router_bias = f.router_bias;
    in.dims.base = f.dims;
    in.dims.row_bytes = 2 * f.dims.hidden;
    return in;
  }
  in.x = RequiredInput(ctx, kQX, kQuantInputNames[kQX]);
  in.router_weight = RequiredInput(ctx, kQRouterWeight, kQuantInputNames[kQRouterWeight]);
  in.gate = RequiredInput(ctx, kQGateWeight, kQuantInputNames[kQGateWeight]);
  in.gate_scales = RequiredInput(ctx, kQGateScales, kQuantInputNames[kQGateScales]);
  in.up = RequiredInput(ctx, kQUpWeight, kQuantInputNames[kQUpWeight]);
  in.up_scales = RequiredInput(ctx, kQUpScales, kQuantInputNames[kQUpScales]);
  in.down = RequiredInput(ctx, kQDownWeight, kQuantInputNames[kQDownWeight]);
  in.down_scales = RequiredInput(ctx, kQDownScales, kQuantInputNames[kQDownScales]);
  if (ctx.GetInputCount() > kQRouterBias) in.router_bias = ctx.GetInput(kQRouterBias);
  const Shape gs = ShapeOf(in.gate_scales), us = ShapeOf(in.up_scales), ds = ShapeOf(in.down_scales);
  const Shape bias = in.router_bias ? ShapeOf(in.router_bias) : Shape{};
  in.dims = CheckQuantShapes(kind, attrs, ShapeOf(in.x), ShapeOf(in.router_weight), ShapeOf(in.gate), &gs,
                             ShapeOf(in.up), &us, ShapeOf(in.down), &ds, in.router_bias ? &bias : nullptr);
  return in;
}

}  // namespace dsmoe
