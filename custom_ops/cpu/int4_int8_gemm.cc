// The int4 x int8 gate/up GEMM of a prefill slab at accuracy_level 4 (cpu/int8_activations.h),
// built with AVX-512 BW + VNNI beside the GEMV (cmake: dsmoe_add_int4_int8_dot) and picked at run
// time with it.
//
// The slab's rows (up to 32) are first repacked, once per call (a prefill task's tokens, up to 96
// at a time: SlabGateUpTask in cpu/prefill.h), into the layout
// vpdpbusd reads: per 4 columns, one dword of 4 nibble values (as bytes) per row, 16 rows a
// vector. The int4 chunk of a row already holds 4 consecutive columns per dword (its low nibbles
// are columns 0-15, its high ones 16-31), so the repacking is the nibble split and a 4 x 4 dword
// transpose inside each 128-bit lane; the rows come out in a fixed permutation (position
// 16 h + 4 j + i = row 16 h + 4 i + j), which the scales follow and the output undoes. Then per
// token and 32-column chunk: 16 vpdpbusd against the token's 4 int8 values broadcast, started
// from the zero point's correction (-8 x the chunk's sum), exact; then one convert and one FMA
// per 16 rows with the row's and the token's scales. About 24 vector instructions per 1024
// multiply-adds, where the float32 slab GEMM takes 64 FMAs.
#include <immintrin.h>

#include <cstdint>
#include <cstring>

#include "cpu/int8_activations.h"

namespace dsmoe::cpu::vnni {
namespace {

constexpr int kRows = kInt8SlabRows;  // 32: two vectors of 16 rows
// Masked forms with a zero source: GCC 12 warns on the unmasked ones (an undefined vector).
constexpr __mmask16 kAll = 0xffff;
constexpr __mmask8 kAll8 = 0xff;

inline int RowAt(int p) { return (p & 16) + 4 * (p & 3) + ((p >> 2) & 3); }

// rows [0, rows) of w (int4, rb bytes apart) into tile[(k * 8 + quad) * 32 + p]: the dword of
// columns 32 k + 4 quad .. + 3 of row RowAt(p) (zeros past `rows`).
void PackSlab(const uint8_t* w, int64_t rb, int64_t rows, int64_t chunks, uint32_t* tile) {
  const __m512i nibble = _mm512_set1_epi8(0x0f);
  for (int64_t k = 0; k < chunks; ++k) {
    for (int half = 0; half < 2; ++half) {
      __m512i a[4];
      for (int i = 0; i < 4; ++i) {  // 128-bit lane j: chunk k of row 16 half + 4 i + j
        __m128i c[4];
        for (int j = 0; j < 4; ++j) {
          const int64_t r = 16 * half + 4 * i + j;
          c[j] = r < rows ? _mm_loadu_si128(reinterpret_cast<const __m128i*>(w + r * rb + 16 * k))
                          : _mm_setzero_si128();
        }
        a[i] = _mm512_inserti32x4(
            _mm512_inserti32x4(_mm512_inserti32x4(_mm512_zextsi128_si512(c[0]), c[1], 1), c[2], 2), c[3], 3);
      }
      for (int part = 0; part < 2; ++part) {  // low nibbles: quads 0-3, high: quads 4-7
        __m512i b[4];
        for (int i = 0; i < 4; ++i) {
          b[i] = _mm512_and_si512(part == 0 ? a[i] : _mm512_srli_epi16(a[i], 4), nibble);
        }
        const __m512i t0 = _mm512_maskz_unpacklo_epi32(kAll, b[0], b[1]), t1 = _mm512_maskz_unpackhi_epi32(kAll, b[0], b[1]);
        const __m512i t2 = _mm512_maskz_unpacklo_epi32(kAll, b[2], b[3]), t3 = _mm512_maskz_unpackhi_epi32(kAll, b[2], b[3]);
        const __m512i q[4] = {_mm512_maskz_unpacklo_epi64(kAll8, t0, t2), _mm512_maskz_unpackhi_epi64(kAll8, t0, t2),
                              _mm512_maskz_unpacklo_epi64(kAll8, t1, t3), _mm512_maskz_unpackhi_epi64(kAll8, t1, t3)};
        for (int x = 0; x < 4; ++x) {
          _mm512_storeu_si512(tile + (k * 8 + 4 * part + x) * kRows + 16 * half, q[x]);
        }
      }
    }
  }
}

// T tokens of the slab: out[t * ldo + RowAt(p)] for p < 32 with RowAt(p) < rows.
template <int T>
void Tokens(const uint32_t* tile, const float* sw, int64_t rows, int64_t d, int64_t G, const Int8Rows& x,
            const int64_t* tokens, float* out, int64_t ldo) {
  const int64_t chunks = d / 32;
  const int8_t* xq[T];
  const float* xs[T];
  const int32_t* xc[T];
  for (int t = 0; t < T; ++t) {
    xq[t] = x.q + tokens[t] * d;
    xs[t] = x.scales + tokens[t] * x.groups;
    xc[t] = x.corr + tokens[t] * chunks;
  }
  __m512 f[T][2];
  for (int t = 0; t < T; ++t) f[t][0] = f[t][1] = _mm512_setzero_ps();
  for (int64_t k = 0; k < chunks; ++k) {
    __m512i acc[T][2];
    for (int t = 0; t < T; ++t) acc[t][0] = acc[t][1] = _mm512_set1_epi32(xc[t][k]);
    const uint32_t* tk = tile + k * 8 * kRows;
    for (int quad = 0; quad < 8; ++quad) {
      const __m512i w0 = _mm512_loadu_si512(tk + quad * kRows), w1 = _mm512_loadu_si512(tk + quad * kRows + 16);
      for (int t = 0; t < T; ++t) {
        int32_t four;
        std::memcpy(&four, xq[t] + 32 * k + 4 * quad, sizeof four);
        const __m512i xb = _mm512_set1_epi32(four);
        acc[t][0] = _mm512_dpbusd_epi32(acc[t][0], w0, xb);
        acc[t][1] = _mm512_dpbusd_epi32(acc[t][1], w1, xb);
      }
    }
    const int64_t g = 32 * k / G;
    const __m512 s0 = _mm512_loadu_ps(sw + g * kRows), s1 = _mm512_loadu_ps(sw + g * kRows + 16);
    for (int t = 0; t < T; ++t) {
      const __m512 sx = _mm512_set1_ps(xs[t][g]);
      f[t][0] = _mm512_fmadd_ps(_mm512_maskz_cvtepi32_ps(kAll, acc[t][0]), _mm512_mul_ps(s0, sx), f[t][0]);
      f[t][1] = _mm512_fmadd_ps(_mm512_maskz_cvtepi32_ps(kAll, acc[t][1]), _mm512_mul_ps(s1, sx), f[t][1]);
    }
  }
  for (int t = 0; t < T; ++t) {
    alignas(64) float lanes[kRows];
    _mm512_store_ps(lanes, f[t][0]);
    _mm512_store_ps(lanes + 16, f[t][1]);
    for (int p = 0; p < kRows; ++p) {
      const int r = RowAt(p);
      if (r < rows) out[t * ldo + r] = lanes[p];
    }
  }
}

}  // namespace

void SlabGemm(const uint8_t* w, const float* scales, int64_t rows, int64_t d, int64_t group, const Int8Rows& x,
              const int64_t* tokens, int count, float* out, int64_t ldo, void* scratch) {
  const int64_t chunks = d / 32, groups = (d + group - 1) / group;
  uint32_t* tile = static_cast<uint32_t*>(scratch);
  float* sw = reinterpret_cast<float*>(tile + chunks * 8 * kRows);  // [groups][32], permuted as the tile
  PackSlab(w, d / 2, rows, chunks, tile);
  alignas(64) int32_t index[kRows];
  uint32_t present = 0;
  for (int p = 0; p < kRows; ++p) {
    index[p] = static_cast<int32_t>(RowAt(p) * groups);
    present |= static_cast<uint32_t>(RowAt(p) < rows) << p;
  }
  const __m512i i0 = _mm512_load_si512(index), i1 = _mm512_load_si512(index + 16);
  const __mmask16 m0 = static_cast<__mmask16>(present), m1 = static_cast<__mmask16>(present >> 16);
  for (int64_t g = 0; g < groups; ++g) {  // rows past `rows` read nothing and get 0
    _mm512_storeu_ps(sw + g * kRows, _mm512_mask_i32gather_ps(_mm512_setzero_ps(), m0, i0, scales + g, 4));
    _mm512_storeu_ps(sw + g * kRows + 16, _mm512_mask_i32gather_ps(_mm512_setzero_ps(), m1, i1, scales + g, 4));
  }
  int t = 0;
  for (; t + 4 <= count; t += 4) Tokens<4>(tile, sw, rows, d, group, x, tokens + t, out + t * ldo, ldo);
  switch (count - t) {
    case 3: return Tokens<3>(tile, sw, rows, d, group, x, tokens + t, out + t * ldo, ldo);
    case 2: return Tokens<2>(tile, sw, rows, d, group, x, tokens + t, out + t * ldo, ldo);
    case 1: return Tokens<1>(tile, sw, rows, d, group, x, tokens + t, out + t * ldo, ldo);
    default: return;
  }
}

}  // namespace dsmoe::cpu::vnni
