// The int4 x int8 gate/up GEMV of accuracy_level 4 (cpu/int8_activations.h), built with
// AVX-512 BW + VNNI (cmake: DSMOE_HAVE_INT4_INT8_DOT) and picked at run time.
//
// Per 128 columns of a row (64 bytes of nibbles): the low and the high nibbles masked into two
// vectors of unsigned bytes (chunk j's columns 0-15 and 16-31 in 128-bit lane j), two vpdpbusd
// against the token's int8 values packed the same way (PackInt8Token), started from the zero
// point's correction, so each lane holds a quarter of one chunk's exact integer dot product; one
// convert and one multiply-add with the chunk's two scales. About 10 vector instructions per 128
// weights and row where the float path (kernels_quant_isa.cc: lookup and FMA) takes 24.
#include <immintrin.h>

#include <cstdint>

#include "cpu/int8_activations.h"

namespace dsmoe::cpu::vnni {
namespace {

// Masked forms with a zero source: GCC 12's unmasked ones pass an undefined vector and warn.
constexpr __mmask16 kAll = 0xffff;

inline float Sum(__m512 v) {
  alignas(64) float lanes[16];
  _mm512_store_ps(lanes, v);
  float s = 0.0f;
  for (float x : lanes) s += x;
  return s;
}

// R rows x T tokens; see Int4Int8DotFn.
template <int R, int T>
void Tile(const uint8_t* w, int64_t rb, const float* scales, int64_t groups, int64_t d, int64_t G, __m512i lane_group,
          const uint8_t* const* tokens, float* out, int64_t ldo) {
  const __m512i nibble = _mm512_set1_epi8(0x0f);
  __m512 acc[R][T];
  for (int r = 0; r < R; ++r) {
    for (int t = 0; t < T; ++t) acc[r][t] = _mm512_setzero_ps();
  }
  for (int64_t c0 = 0, u = 0; c0 < d; c0 += kInt8UnitCols, ++u) {
    const int64_t chunks = d - c0 >= kInt8UnitCols ? 4 : (d - c0) / 32;
    const __mmask64 wmask = chunks == 4 ? ~__mmask64{0} : (__mmask64{1} << (16 * chunks)) - 1;
    const int64_t g0 = c0 / G, ng = (c0 + 32 * chunks - 1) / G - g0 + 1;  // scale groups in this unit
    const __mmask16 smask = static_cast<__mmask16>((1u << ng) - 1);
    __m512i lo[R], hi[R];
    __m512 sw[R];
    for (int r = 0; r < R; ++r) {
      const uint8_t* p = w + r * rb + c0 / 2;
      const __m512i v = _mm512_maskz_loadu_epi8(wmask, p);
      _mm_prefetch(reinterpret_cast<const char*>(p + R * rb), _MM_HINT_T0);  // the next tile's rows
      lo[r] = _mm512_and_si512(v, nibble);
      hi[r] = _mm512_and_si512(_mm512_srli_epi16(v, 4), nibble);
      sw[r] = _mm512_maskz_permutexvar_ps(kAll, lane_group,
                                          _mm512_zextps128_ps512(_mm_maskz_loadu_ps(smask, scales + r * groups + g0)));
    }
    for (int t = 0; t < T; ++t) {
      const uint8_t* unit = tokens[t] + u * kInt8UnitBytes;
      const __m512i xlo = _mm512_load_si512(unit), xhi = _mm512_load_si512(unit + 64);
      const __m512i corr = _mm512_load_si512(unit + 128);
      const __m512 sx = _mm512_load_ps(reinterpret_cast<const float*>(unit + 192));
      for (int r = 0; r < R; ++r) {
        const __m512i dot = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(corr, lo[r], xlo), hi[r], xhi);
        acc[r][t] = _mm512_fmadd_ps(_mm512_maskz_cvtepi32_ps(kAll, dot), _mm512_mul_ps(sw[r], sx), acc[r][t]);
      }
    }
  }
  for (int r = 0; r < R; ++r) {
    for (int t = 0; t < T; ++t) out[t * ldo + r] = Sum(acc[r][t]);
  }
}

template <int T>
void Rows(const uint8_t* w, const float* scales, int64_t rows, int64_t d, int64_t G, const uint8_t* const* tokens,
          float* out, int64_t ldo) {
  constexpr int R = T == 1 ? 4 : 2;  // 2 R T accumulators and 3 R weight vectors in 32 registers
  const int64_t rb = d / 2, groups = (d + G - 1) / G;
  alignas(64) int32_t lanes[16];
  for (int l = 0; l < 16; ++l) lanes[l] = static_cast<int32_t>(32 * (l / 4) / G);  // lane -> group in the unit
  const __m512i lane_group = _mm512_load_si512(lanes);
  int64_t r = 0;
  for (; r + R <= rows; r += R) {
    Tile<R, T>(w + r * rb, rb, scales + r * groups, groups, d, G, lane_group, tokens, out + r, ldo);
  }
  for (; r < rows; ++r) Tile<1, T>(w + r * rb, rb, scales + r * groups, groups, d, G, lane_group, tokens, out + r, ldo);
}

}  // namespace

void DotRows(const uint8_t* w, const float* scales, int64_t rows, int64_t d, int64_t group,
             const uint8_t* const* tokens, int count, float* out, int64_t ldo) {
  switch (count) {
    case 1: return Rows<1>(w, scales, rows, d, group, tokens, out, ldo);
    case 2: return Rows<2>(w, scales, rows, d, group, tokens, out, ldo);
    case 3: return Rows<3>(w, scales, rows, d, group, tokens, out, ldo);
    case 4: return Rows<4>(w, scales, rows, d, group, tokens, out, ldo);
    default: return;  // callers pass 1..kMaxQuantDotTokens
  }
}

}  // namespace dsmoe::cpu::vnni
