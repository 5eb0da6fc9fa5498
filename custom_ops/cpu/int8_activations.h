// accuracy_level 4 of the quantized ops (docs/op-spec.md "accuracy_level"): X rounded to int8
// per group of columns, as ONNX Runtime's MatMulNBits does at that level, and the int4 x int8
// GEMV of the decode path that uses the rounded values (AVX-512 VNNI; docs/quant-kernel-notes.md).
#pragma once

#include <cstdint>

#include "cpu/kernels_quant.h"

namespace dsmoe::cpu {

// One token's rounded X laid out for the int4 x int8 GEMV, per unit of 128 columns (four 32-column
// chunks, the int4 rows' 16-byte chunks; the last unit zero-padded): 64 bytes `lo` (128-bit lane j:
// q of chunk j's columns 0-15, the low nibbles' weights), 64 bytes `hi` (columns 16-31), 16 int32
// `corr` (lane 4 j: -8 * the sum of chunk j's q, the zero point; other lanes 0) and 16 floats
// `scale` (lane l: the scale of chunk l / 4's group).
inline constexpr int64_t kInt8UnitCols = 128, kInt8UnitBytes = 256;
inline int64_t Int8TokenBytes(int64_t d) { return (d + kInt8UnitCols - 1) / kInt8UnitCols * kInt8UnitBytes; }
// corr: the token's Int8ChunkCorrections (below).
void PackInt8Token(const int8_t* q, const float* scales, const int32_t* corr, int64_t d, int64_t G, uint8_t* out);

// Gate/up GEMV of int4 rows against packed tokens: out[t * ldo + r] = sum over the row's 32-column
// chunks of (sum_c (q[r][c] - 8) * q_t[c]) * (scales[r * groups + g] * s_t[g]) for r < rows,
// t < count <= 4 (g: the chunk's group, groups = ceil(d / group)); d a multiple of 32, rows laid
// out as the op's int4 rows (RowBytes: d / 2).
using Int4Int8DotFn = void (*)(const uint8_t* w, const float* scales, int64_t rows, int64_t d, int64_t group,
                               const uint8_t* const* tokens, int count, float* out, int64_t ldo);

// The call's rounded tokens as plain rows: token t's int8 values q + t * d, its scales
// scales + t * groups (one per group of G columns) and corr + t * d / 32 (-8 x the sum of each
// 32-column chunk's values: the zero point's correction).
struct Int8Rows {
  const int8_t* q = nullptr;
  const float* scales = nullptr;
  const int32_t* corr = nullptr;
  int64_t groups = 0;
};
// corr[t * d / 32 + k] = -8 x the sum of token t's values in columns [32 k, 32 k + 32), for both
// kernels below.
void Int8ChunkCorrections(const int8_t* q, int64_t count, int64_t d, int32_t* corr);

// Gate/up of one prefill slab for `count` tokens (ids `tokens` into x), any count:
// out[t * ldo + r] as Int4Int8DotFn's for r < rows <= kInt8SlabRows. scratch:
// Int8SlabScratchFloats(d, group) floats, the slab repacked once for the call's tokens.
inline constexpr int64_t kInt8SlabRows = 32;
inline int64_t Int8SlabScratchFloats(int64_t d, int64_t group) {
  return d / 32 * 8 * kInt8SlabRows + (d + group - 1) / group * kInt8SlabRows;
}
using Int4Int8SlabFn = void (*)(const uint8_t* w, const float* scales, int64_t rows, int64_t d, int64_t group,
                                const Int8Rows& x, const int64_t* tokens, int count, float* out, int64_t ldo,
                                void* scratch);

// The int4 x int8 kernels to use beside `chosen` (SelectQuantKernels()), or nullptrs: not built
// (no x86-64 GCC / Clang), `chosen` is not the AVX-512 set (a narrower CPU, or DSMOE_CPU_ISA), or
// the CPU lacks AVX-512 BW / VNNI (the float paths then run on x_hat).
struct Int4Int8Kernels {
  Int4Int8DotFn dot = nullptr;
  Int4Int8SlabFn slab = nullptr;
};
Int4Int8Kernels SelectInt4Int8Kernels(const QuantKernelSet& chosen);

}  // namespace dsmoe::cpu
