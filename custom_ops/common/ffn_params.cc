#include "common/ffn_params.h"

#include <cmath>
#include <limits>
#include <sstream>

namespace dsmoe {
namespace {

constexpr const char* kInputNames[kNumFfnInputs] = {"X", "router_weight", "gate_weight",
                                                    "up_weight", "down_weight", "router_bias"};

// Attribute helpers. ORT schemas of custom ops declare no attributes, so a
// node may carry one with the wrong type: tell "absent" from "wrong type".
template <typename T>
bool TryGetAttribute(const Ort::ConstKernelInfo& info, const char* name, T& out) {
  try {
    out = info.GetAttribute<T>(name);
    return true;
  } catch (const Ort::Exception&) {
    return false;
  }
}

bool HasAnyScalarAttribute(const Ort::ConstKernelInfo& info, const char* name) {
  int64_t i;
  float f;
  std::string s;
  return TryGetAttribute(info, name, i) || TryGetAttribute(info, name, f) || TryGetAttribute(info, name, s);
}

template <typename T>
bool GetOptionalAttribute(const Ort::ConstKernelInfo& info, const char* name, const char* type_name, T& out) {
  if (TryGetAttribute(info, name, out)) return true;
  if (HasAnyScalarAttribute(info, name)) {
    ThrowInvalidArgument(std::string("attribute '") + name + "' must be of type " + type_name);
  }
  return false;
}

std::string Quote(const std::string& s) { return "'" + s + "'"; }

}  // namespace

[[noreturn]] void ThrowInvalidArgument(const std::string& message) { throw InvalidArgument(message); }

bool OptionalIntAttribute(const Ort::ConstKernelInfo& info, const char* name, int64_t& out) {
  return GetOptionalAttribute(info, name, "int", out);
}

int64_t RequiredIntAttribute(const Ort::ConstKernelInfo& info, const char* name, const char* expected) {
  int64_t value = 0;
  if (!GetOptionalAttribute(info, name, "int", value)) {
    ThrowInvalidArgument(std::string("attribute '") + name + "' is required (" + expected + ")");
  }
  return value;
}

std::string ShapeToString(const Shape& shape) {
  std::ostringstream os;
  os << "[";
  for (size_t i = 0; i < shape.size(); ++i) os << (i ? ", " : "") << shape[i];
  os << "]";
  return os.str();
}

FfnAttributes ParseAttributes(const Ort::ConstKernelInfo& info) {
  FfnAttributes a;
  a.num_experts = RequiredIntAttribute(info, "num_experts", "an int >= 1");
  if (a.num_experts < 1) {
    ThrowInvalidArgument("attribute 'num_experts' must be >= 1, got " + std::to_string(a.num_experts));
  }

  if (GetOptionalAttribute(info, "threshold", "float", a.threshold) &&
      !(std::isfinite(a.threshold) && a.threshold >= 0.0f && a.threshold <= 1.0f)) {
    std::ostringstream os;
    os << "attribute 'threshold' must be finite and in [0, 1], got " << a.threshold;
    ThrowInvalidArgument(os.str());
  }

  int64_t rescale = 1;
  if (GetOptionalAttribute(info, "rescale", "int", rescale) && rescale != 0 && rescale != 1) {
    ThrowInvalidArgument("attribute 'rescale' must be 0 or 1, got " + std::to_string(rescale));
  }
  a.rescale = rescale == 1;

  std::string weighting = "score";
  GetOptionalAttribute(info, "weighting", "string", weighting);
  if (weighting == "score") {
    a.weighting = Weighting::kScore;
  } else if (weighting == "binary") {
    a.weighting = Weighting::kBinary;
  } else {
    ThrowInvalidArgument("attribute 'weighting' must be 'score' or 'binary', got " + Quote(weighting));
  }

  std::string activation = "silu";
  GetOptionalAttribute(info, "activation", "string", activation);
  if (activation == "silu") {
    a.activation = Activation::kSilu;
  } else if (activation == "gelu") {
    a.activation = Activation::kGelu;
  } else if (activation == "gelu_tanh") {
    a.activation = Activation::kGeluTanh;
  } else {
    ThrowInvalidArgument("attribute 'activation' must be 'silu', 'gelu' or 'gelu_tanh', got " + Quote(activation));
  }

  if (GetOptionalAttribute(info, "down_tile", "int", a.down_tile) && a.down_tile != 0 &&
      a.down_tile != kDownTileWidth) {
    ThrowInvalidArgument("attribute 'down_tile' must be 0 (down_weight [n, B, d]) or " +
                         std::to_string(kDownTileWidth) + " (down_weight [n, ceil(d / " +
                         std::to_string(kDownTileWidth) + "), B, " + std::to_string(kDownTileWidth) +
                         "]), got " + std::to_string(a.down_tile));
  }
  if (GetOptionalAttribute(info, "gate_up_tile", "int", a.gate_up_tile) && a.gate_up_tile != 0 &&
      a.gate_up_tile != kGateUpSlabRows) {
    static_assert(kGateUpSlabRows == 32, "the message below names the slab height");
    ThrowInvalidArgument("attribute 'gate_up_tile' must be 0 (gate_weight and up_weight [n, B, d]) or 32 "
                         "([n, ceil(B / 32), d, 32]), got " + std::to_string(a.gate_up_tile));
  }
  return a;
}

FfnAttributes RequireGateUpRows(const FfnAttributes& attrs, const char* kernel, const char* hint) {
  if (attrs.gate_up_tile != 0) {
    ThrowInvalidArgument(std::string("attribute 'gate_up_tile' must be 0 for ") + kernel +
                         " (gate_weight and up_weight [n, B, d]; the slab layout is the float32 CPU kernel's), got " +
                         std::to_string(attrs.gate_up_tile) + hint);
  }
  return attrs;
}

namespace {

void ExpectShape(FfnInput input, const Shape& actual, const Shape& expected, const char* symbolic) {
  if (actual != expected) {
    ThrowInvalidArgument(std::string("input '") + kInputNames[input] + "' must have shape " + symbolic + " = " +
                         ShapeToString(expected) + ", got " + ShapeToString(actual));
  }
}

}  // namespace

int64_t CheckedTokens(const Shape& x, int64_t d, const char* d_from) {
  if (x.empty()) ThrowInvalidArgument("input 'X' must have rank >= 1 ([..., d]), got a scalar");
  if (x.back() != d) {
    ThrowInvalidArgument("input 'X' must have last dim d = " + std::to_string(d) + " (from " + d_from + "), got " +
                         ShapeToString(x));
  }
  int64_t tokens = 1;
  for (size_t i = 0; i + 1 < x.size(); ++i) tokens = CheckedMul(tokens, x[i], "the number of tokens");
  CheckedMul(tokens, d, "N * d");
  return tokens;
}

int64_t CheckedMul(int64_t a, int64_t b, const char* what) {
  if (a != 0 && b > std::numeric_limits<int64_t>::max() / a) {
    ThrowInvalidArgument(std::string(what) + " overflows int64 (" + std::to_string(a) + " * " +
                         std::to_string(b) + ")");
  }
  return a * b;
}

FfnDims CheckShapes(const FfnAttributes& attrs, const Shape& x, const Shape& router_weight,
                    const Shape& gate_weight, const Shape& up_weight, const Shape& down_weight,
                    const Shape* router_bias) {
  FfnDims dims;
  // The weights define n, B and d (B from down_weight when gate/up are in slabs, which round it
  // up); X and the attributes are checked against them.
  const bool slabs = attrs.gate_up_tile != 0;
  const std::string gate_shape = slabs ? "[n, ceil(B / 32), d, 32]" : "[n, B, d]";
  const std::string gate_form = slabs ? gate_shape + " (attribute 'gate_up_tile' = 32)" : gate_shape;
  if (gate_weight.size() != (slabs ? 4u : 3u) || gate_weight[0] < 1 || gate_weight[1] < 1 || gate_weight[2] < 1 ||
      (slabs && gate_weight[3] != kGateUpSlabRows)) {
    ThrowInvalidArgument("input 'gate_weight' must have shape " + gate_form +
                         " with n, B, d >= 1, got " + ShapeToString(gate_weight));
  }
  dims.num_blocks = gate_weight[0];
  dims.hidden = gate_weight[2];
  dims.block_size = gate_weight[1];
  const int64_t n = dims.num_blocks, d = dims.hidden;
  const int64_t tiles = DownTileCount(d);
  ExpectShape(kUpWeight, up_weight, gate_weight, (gate_shape + " (as gate_weight)").c_str());
  dims.down_tile = attrs.down_tile;
  dims.gate_up_tile = attrs.gate_up_tile;
  if (slabs) {  // B from down_weight: its rows, then gate's slabs checked against it
    const size_t b_dim = attrs.down_tile == 0 ? 1 : 2;
    if (down_weight.size() != (attrs.down_tile == 0 ? 3u : 4u) || down_weight[b_dim] < 1) {
      ThrowInvalidArgument(std::string("input 'down_weight' must have shape ") +
                           (attrs.down_tile == 0 ? "[n, B, d]" : "[n, ceil(d / 64), B, 64] (attribute 'down_tile' = 64)") +
                           " with B >= 1, got " + ShapeToString(down_weight));
    }
    dims.block_size = down_weight[b_dim];
    if (GateUpSlabCount(dims.block_size) != gate_weight[1]) {
      ThrowInvalidArgument("input 'gate_weight' must have shape [n, ceil(B / 32), d, 32] = " +
                           ShapeToString({n, GateUpSlabCount(dims.block_size), d, kGateUpSlabRows}) +
                           " (B = " + std::to_string(dims.block_size) + " from down_weight), got " +
                           ShapeToString(gate_weight));
    }
  }
  const Shape rows_shape{n, dims.block_size, d};
  if (attrs.down_tile == 0) {
    ExpectShape(kDownWeight, down_weight, rows_shape, slabs ? "[n, B, d]" : "[n, B, d] (as gate_weight)");
  } else {
    static_assert(kDownTileWidth == 64, "the message below names the width");
    ExpectShape(kDownWeight, down_weight, {n, tiles, dims.block_size, kDownTileWidth},
                "[n, ceil(d / 64), B, 64] (attribute 'down_tile' = 64)");
  }
  ExpectShape(kRouterWeight, router_weight, {n, d}, "[n, d]");
  if (n != attrs.num_experts) {
    ThrowInvalidArgument("attribute 'num_experts' = " + std::to_string(attrs.num_experts) +
                         " does not match n = " + std::to_string(n) + " of the weights (gate_weight " +
                         ShapeToString(gate_weight) + ")");
  }
  if (router_bias != nullptr) {
    ExpectShape(kRouterBias, *router_bias, {n}, "[n]");
    dims.has_bias = true;
  }

  const int64_t tokens = dims.num_tokens = CheckedTokens(x, d, "gate_weight");
  CheckedMul(tokens, n, "N * n");
  CheckedMul(CheckedMul(CheckedMul(n, dims.block_size, "n * B"), tiles, "n * B * ceil(d / 64)"), kDownTileWidth,
             "n * B * ceil(d / 64) * 64");
  CheckedMul(CheckedMul(tokens, n, "N * n"), dims.block_size, "N * n * B");
  CheckedMul(CheckedMul(CheckedMul(n, GateUpSlabCount(dims.block_size), "n * ceil(B / 32)"), kGateUpSlabRows,
                        "n * ceil(B / 32) * 32"), d, "n * ceil(B / 32) * 32 * d");

  dims.y_shape = x;
  dims.active_shape.assign(x.begin(), x.end() - 1);
  dims.active_shape.push_back(n);
  return dims;
}

Ort::ConstValue RequiredInput(const Ort::KernelContext& ctx, size_t index, const char* name) {
  Ort::ConstValue v = ctx.GetInput(index);
  if (!v) ThrowInvalidArgument(std::string("input '") + name + "' is required");
  return v;
}

Shape ShapeOf(const Ort::ConstValue& v) { return v.GetTensorTypeAndShapeInfo().GetShape(); }

FfnInputs GetInputs(const Ort::KernelContext& ctx, const FfnAttributes& attrs) {
  FfnInputs in;
  in.x = RequiredInput(ctx, kX, kInputNames[kX]);
  in.router_weight = RequiredInput(ctx, kRouterWeight, kInputNames[kRouterWeight]);
  in.gate_weight = RequiredInput(ctx, kGateWeight, kInputNames[kGateWeight]);
  in.up_weight = RequiredInput(ctx, kUpWeight, kInputNames[kUpWeight]);
  in.down_weight = RequiredInput(ctx, kDownWeight, kInputNames[kDownWeight]);
  if (ctx.GetInputCount() > kRouterBias) in.router_bias = ctx.GetInput(kRouterBias);
  const Shape bias_shape = in.router_bias ? ShapeOf(in.router_bias) : Shape{};
  in.dims = CheckShapes(attrs, ShapeOf(in.x), ShapeOf(in.router_weight), ShapeOf(in.gate_weight),
                        ShapeOf(in.up_weight), ShapeOf(in.down_weight), in.router_bias ? &bias_shape : nullptr);
  return in;
}

}  // namespace dsmoe
