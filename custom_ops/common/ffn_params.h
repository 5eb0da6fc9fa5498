// org.dsmoe::GatedBlockSparseFFN: names, attributes and shape checks, written
// once for every device (docs/op-spec.md is the contract).
#pragma once

#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

#include "common/int_math.h"
#include "onnxruntime_cxx_api.h"

namespace dsmoe {

inline constexpr const char* kDomain = "org.dsmoe";
inline constexpr const char* kOpName = "GatedBlockSparseFFN";

enum FfnInput : size_t { kX, kRouterWeight, kGateWeight, kUpWeight, kDownWeight, kRouterBias, kNumFfnInputs };
enum FfnOutput : size_t { kY, kActive, kNumFfnOutputs };

enum class Activation { kSilu, kGelu, kGeluTanh };
enum class Weighting { kScore, kBinary };

// The column-tile width of down_weight's tiled layout (op-spec "down_tile"): the CPU
// prefill's down GEMM reads a block's V in [B, 64] tiles, which this layout stores
// contiguously.
inline constexpr int64_t kDownTileWidth = 64;

// The slab height of gate_weight's and up_weight's slab layout (op-spec "gate_up_tile"): each
// block's rows in slabs of 32 stored k-major ([d, 32]), so that the CPU kernel's register tiles
// hold 32 rows in their lanes and broadcast the tokens' values (no padding, no packing of X).
inline constexpr int64_t kGateUpSlabRows = 32;

// The node's attributes, validated (op-spec "Attributes").
struct FfnAttributes {
  int64_t num_experts = 0;
  float threshold = 0.5f;
  bool rescale = true;
  Weighting weighting = Weighting::kScore;
  Activation activation = Activation::kSilu;
  int64_t down_tile = 0;  // 0: down_weight [n, B, d]; kDownTileWidth: [n, ceil(d / 64), B, 64]
  int64_t gate_up_tile = 0;  // 0: gate/up_weight [n, B, d]; kGateUpSlabRows: [n, ceil(B / 32), d, 32]
};

// Sizes of one call, validated against each other and the attributes.
struct FfnDims {
  int64_t num_tokens = 0;  // N: product of X's leading dims (may be 0)
  int64_t hidden = 0;      // d
  int64_t num_blocks = 0;  // n
  int64_t block_size = 0;  // B
  int64_t down_tile = 0;   // as the attribute
  int64_t gate_up_tile = 0;  // as the attribute
  bool has_bias = false;
  std::vector<int64_t> y_shape;       // X's shape
  std::vector<int64_t> active_shape;  // X.shape[:-1] + [n]
};

using Shape = std::vector<int64_t>;

// ceil(d / 64): the column tiles of the tiled layout (no d + 63: d may be any int64).
inline int64_t DownTileCount(int64_t d) { return d / kDownTileWidth + (d % kDownTileWidth != 0); }

// Offset of V_i[j, c] (block i's down weights, [B, d]) in down_weight, for either layout.
inline int64_t DownOffset(const FfnDims& dims, int64_t i, int64_t j, int64_t c) {
  const int64_t B = dims.block_size, d = dims.hidden, w = kDownTileWidth;
  if (dims.down_tile == 0) return (i * B + j) * d + c;
  return ((i * DownTileCount(d) + c / w) * B + j) * w + c % w;
}

// ceil(B / 32): the slabs of a block in the slab layout.
inline int64_t GateUpSlabCount(int64_t B) { return B / kGateUpSlabRows + (B % kGateUpSlabRows != 0); }

// Offset in gate_weight (and up_weight) of block i's row r0, where the rows from r0 on lie: in
// the rows layout row r0 of [B, d]; in the slab layout (r0 a multiple of 32) the start of the
// slab of rows [r0, r0 + 32) (its [d, 32] values: column r of the slab is row r0 + r).
inline int64_t GateUpOffset(const FfnDims& dims, int64_t i, int64_t r0) {
  const int64_t B = dims.block_size, d = dims.hidden;
  if (dims.gate_up_tile == 0) return (i * B + r0) * d;
  return (i * GateUpSlabCount(B) * kGateUpSlabRows + r0) * d;
}

// Throw Ort::Exception(ORT_INVALID_ARGUMENT) naming the attribute / input, the
// expected and the actual value.
FfnAttributes ParseAttributes(const Ort::ConstKernelInfo& info);
// `attrs`, for a kernel that reads gate/up in rows only (`kernel` names it in the error, `hint`
// says what to do instead): gate_up_tile != 0 is an InvalidArgument.
FfnAttributes RequireGateUpRows(const FfnAttributes& attrs, const char* kernel, const char* hint = "");
FfnDims CheckShapes(const FfnAttributes& attrs, const Shape& x, const Shape& router_weight,
                    const Shape& gate_weight, const Shape& up_weight, const Shape& down_weight,
                    const Shape* router_bias);

// The node's input tensors (router_bias empty when absent) and their checked sizes:
// CheckShapes on the tensors of a kernel call, for every device.
struct FfnInputs {
  Ort::ConstValue x{nullptr}, router_weight{nullptr}, gate_weight{nullptr}, up_weight{nullptr},
      down_weight{nullptr}, router_bias{nullptr};
  FfnDims dims;
};
FfnInputs GetInputs(const Ort::KernelContext& ctx, const FfnAttributes& attrs);

// A bad attribute, input shape or option, found by code every op variant shares: the op's
// adapter (StatusFromCall, common/status.h) reports it as ORT_INVALID_ARGUMENT prefixed with
// the name of the op that was actually used (GatedBlockSparseFFN, ...Int4, ...).
struct InvalidArgument : std::runtime_error {
  using std::runtime_error::runtime_error;
};
[[noreturn]] void ThrowInvalidArgument(const std::string& message);

// A required int attribute: "is required" when absent, "must be of type int" when it has
// another type (ORT's schemas of custom ops declare no attributes).
int64_t RequiredIntAttribute(const Ort::ConstKernelInfo& info, const char* name, const char* expected);
// An optional int attribute into `out` (left as is when absent); "must be of type int" as above.
bool OptionalIntAttribute(const Ort::ConstKernelInfo& info, const char* name, int64_t& out);
std::string ShapeToString(const Shape& shape);
// Input `index` of the call, or an error naming it (`name`) when the node leaves it out.
Ort::ConstValue RequiredInput(const Ort::KernelContext& ctx, size_t index, const char* name);
Shape ShapeOf(const Ort::ConstValue& v);

// a * b, or an InvalidArgument naming `what` when the product does not fit the int64 sizes
// the kernels use (tensors that exist fit, but products such as N * n need not).
int64_t CheckedMul(int64_t a, int64_t b, const char* what);

// The number of tokens N of X [..., d] (d taken from input `d_from`), with N * d checked.
int64_t CheckedTokens(const Shape& x, int64_t d, const char* d_from);

}  // namespace dsmoe
