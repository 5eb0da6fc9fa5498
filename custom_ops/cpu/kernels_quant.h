// Inner loops of the CPU kernels of the weight-only quantized ops
// (org.dsmoe::GatedBlockSparseFFNInt4 / Int8 / F16, docs/op-spec.md): the
// weights are dequantized on the fly inside the GEMV (decode) or into a small
// float32 tile (prefill), never as a whole.
//
// kernels_quant_isa.cc is compiled once per instruction set, like
// kernels_isa.cc (AVX-512, AVX2 + F16C, baseline).
#pragma once

#include <cstdint>

#include "common/ffn_params.h"

namespace dsmoe::cpu {

// Storage of a block's weight rows (op-spec "Weight formats").
//   kInt4: uint8, one row = d / 2 bytes; each 32 weights of a row are 16 bytes,
//          byte m holding weight m (low nibble) and weight m + 16 (high nibble);
//          value = scale * (q - 8).
//   kInt8: uint8, one row = d bytes; value = scale * (q - 128).
//   kF16:  IEEE float16, one row = 2 * d bytes; no scales.
enum class WeightFormat { kInt4, kInt8, kF16 };

inline int64_t RowBytes(WeightFormat f, int64_t d) {
  return f == WeightFormat::kInt4 ? d / 2 : f == WeightFormat::kInt8 ? d : 2 * d;
}

inline constexpr int kMaxQuantDotTokens = 4;

struct QuantKernelSet {
  const char* name;

  // Gate/up GEMV: out[t * ldo + r] = sum_c W[r][c] * x[t][c] for r < rows, t < count <= kMaxQuantDotTokens,
  // W[r][c] = scales[r * groups + c / group] * (q[r][c] - zero) (or the float16 value; scales unused),
  // q row r at w + r * RowBytes(f, d), groups = ceil(d / group). Each row is dequantized once for all tokens.
  // xsum[t]: group_sums of x[t] (integer formats; the zero point is applied per group through them).
  void (*dot_rows)(WeightFormat f, const uint8_t* w, const float* scales, int64_t rows, int64_t d, int64_t group,
                   const float* const* x, const float* const* xsum, int count, float* out, int64_t ldo);

  // xsum[g] = sum_{c in group g} x[c] for g < ceil(d / group).
  void (*group_sums)(const float* x, int64_t d, int64_t group, float* xsum);

  // Down GEMV: y[t][c] += sum_{j < rows} h[t][j] * V[j][c] for c < d, t < count <= kMaxQuantDotTokens, where
  // row j of V is at v + j * RowBytes(f, d) and V[j][c] = scales[(j / group) * d + c] * (q[j][c] - zero): the
  // rows start at a group boundary and scales points at the scale row of their first group. Each row is
  // dequantized once for all the tokens; each token's sums in the same order for any count.
  // acc: scratch of count * d floats.
  void (*accumulate_rows)(WeightFormat f, const uint8_t* v, const float* scales, const float* const* h, int count,
                          int64_t rows, int64_t d, int64_t group, float* acc, float* const* y);

  // Prefill gate/up tile: out[r * d + c] = W[r][c] (as dot_rows) for r < rows, c < d.
  void (*dequantize_rows)(WeightFormat f, const uint8_t* w, const float* scales, int64_t rows, int64_t d,
                          int64_t group, float* out);

  // Prefill down tile: out[j * width + c] = V[j][c0 + c] (as accumulate_rows) for j < rows, c < width,
  // rows from a group boundary; for kInt4, c0 and width are multiples of 32.
  void (*dequantize_columns)(WeightFormat f, const uint8_t* v, const float* scales, int64_t rows, int64_t d,
                             int64_t group, int64_t c0, int64_t width, float* out);

  // Prefill gate/up slab for the float32 op's slab kernel: out[c * kGateUpSlabRows + r] = W[r][c] (as
  // dot_rows) for r < rows <= kGateUpSlabRows, c < d; 0 for rows <= r < kGateUpSlabRows.
  void (*dequantize_slab)(WeightFormat f, const uint8_t* w, const float* scales, int64_t rows, int64_t d,
                          int64_t group, float* out);

  // accuracy_level 4 (op-spec): x [rows, d] rounded per group of G columns (the last one partial):
  // s = max |x| / 127, q = clip(round_half_even(x / s), -127, 127) (0 where s = 0), x_hat = q * s.
  // x_hat [rows, d]; q [rows, d] and scales [rows, ceil(d / G)] when not null. Returns whether every
  // x was finite (else q and scales are not meaningful; x_hat carries the NaNs). The same bits on
  // every instruction set.
  bool (*round_to_int8)(const float* x, int64_t rows, int64_t d, int64_t G, float* x_hat, int8_t* q,
                        float* scales);
};

// The widest set this CPU runs (AVX2 needs F16C too); DSMOE_CPU_ISA forces one, as for the float32 op.
const QuantKernelSet& SelectQuantKernels();

}  // namespace dsmoe::cpu
