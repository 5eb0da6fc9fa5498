// Inner loops of the weight-only quantized ops (cpu/kernels_quant.h), compiled
// once per instruction set with DSMOE_ISA = avx512 | avx2 | baseline, like
// kernels_isa.cc: GCC/Clang vector extensions of kVL floats (cpu/simd.h).
//
// Dequantizing one vector of kVL weights: int8 = load kVL bytes, zero-extend
// to int32, convert, subtract the zero point (4 instructions); int4 = a 16-byte
// chunk holds 32 weights (low nibbles: weights 0-15, high nibbles: 16-31): kVL
// bytes widened to int32 once give two vectors, each one and/shift and a
// convert (LoadInt4Chunk); float16 = one
// vcvtph2ps (F16C / AVX-512F; a scalar conversion on the baseline). The group
// scale is applied once per group sum (gate/up) or once per group of rows and
// column (down), never per weight; with AVX-512 the int4 gate/up GEMV instead looks
// its weights up, already scaled, in a per-group table (Int4WholeGroups). Costs and
// measurements:
// docs/quant-kernel-notes.md.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <type_traits>
#include <utility>

#include "common/int_math.h"
#include "cpu/kernels_quant.h"
#include "cpu/simd.h"

#if defined(__AVX512F__) || defined(__AVX2__) || defined(__F16C__)
#include <immintrin.h>
#endif

namespace dsmoe::cpu::DSMOE_ISA {
namespace {

using VecU8 = uint8_t __attribute__((vector_size(kVL)));

// IEEE binary16 -> binary32, exact (subnormals, inf, NaN payload kept).
inline float HalfToFloat(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t exp = (h >> 10) & 0x1fu, mant = h & 0x3ffu;
  uint32_t bits;
  if (exp == 0) {
    const float f = static_cast<float>(mant) * 5.9604644775390625e-8f;  // mant * 2^-24
    std::memcpy(&bits, &f, sizeof bits);
    bits |= sign;
  } else if (exp == 31) {
    bits = sign | 0x7f800000u | (mant << 13);
  } else {
    bits = sign | ((exp + 112) << 23) | (mant << 13);
  }
  float out;
  std::memcpy(&out, &bits, sizeof out);
  return out;
}

inline Vec LoadHalf(const uint8_t* p) {
  Vec v;
#if defined(__AVX512F__)
  // The masked form with a zero source: GCC 12's plain _mm512_cvtph_ps passes an
  // undefined vector and warns (-Wmaybe-uninitialized).
  const __m512 f = _mm512_mask_cvtph_ps(_mm512_setzero_ps(), static_cast<__mmask16>(0xffff),
                                        _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  std::memcpy(&v, &f, sizeof v);
#elif defined(__F16C__) && defined(__AVX2__)
  const __m256 f = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  std::memcpy(&v, &f, sizeof v);
#else
  for (int l = 0; l < kVL; ++l) {
    uint16_t h;
    std::memcpy(&h, p + 2 * l, sizeof h);
    v[l] = HalfToFloat(h);
  }
#endif
  return v;
}

// kVL bytes at p, zero-extended and converted to float. The intrinsics matter: with the
// generic vector conversion GCC 12 splits the bytes through general registers for int8.
inline Vec LoadBytesAsFloat(const uint8_t* p) {
  Vec v;
#if defined(__AVX512F__)
  // Masked forms: GCC 12's plain ones pass an undefined vector and warn (-Wmaybe-uninitialized).
  const __m512 f = _mm512_maskz_cvtepi32_ps(
      static_cast<__mmask16>(0xffff),
      _mm512_maskz_cvtepu8_epi32(static_cast<__mmask16>(0xffff), _mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
  std::memcpy(&v, &f, sizeof v);
#elif defined(__AVX2__)
  const __m256 f = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
  std::memcpy(&v, &f, sizeof v);
#else
  VecU8 b;
  std::memcpy(&b, p, sizeof b);
  v = __builtin_convertvector(__builtin_convertvector(b, VecI), Vec);
#endif
  return v;
}

// kVL bytes at p, zero-extended to int32 lanes (one vpmovzxbd with AVX-512 / AVX2).
inline VecI LoadBytesAsInt(const uint8_t* p) {
  VecI v;
#if defined(__AVX512F__)
  const __m512i i = _mm512_maskz_cvtepu8_epi32(static_cast<__mmask16>(0xffff),
                                               _mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  std::memcpy(&v, &i, sizeof v);
#elif defined(__AVX2__)
  const __m256i i = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
  std::memcpy(&v, &i, sizeof v);
#else
  VecU8 b;
  std::memcpy(&b, p, sizeof b);
  v = __builtin_convertvector(b, VecI);
#endif
  return v;
}

// The 32 weights of an int4 chunk (16 bytes; byte m holds weight m in its low nibble and
// m + 16 in its high one) as raw levels 0-15 in float: kVL bytes widened to int32 lanes once,
// the nibbles split there (splitting the bytes first took a widening per vector, a byte shift
// and two masks).
inline void LoadInt4Chunk(const uint8_t* chunk, Vec* out) {
  constexpr int kHalf = 16 / kVL;  // vectors per 16 weights
  for (int k = 0; k < kHalf; ++k) {
    const VecI b = LoadBytesAsInt(chunk + k * kVL);
    out[k] = __builtin_convertvector(b & 15, Vec);
    out[k + kHalf] = __builtin_convertvector(b >> 4, Vec);
  }
}

// body(std::integral_constant<WeightFormat, F>{}) for the run-time format f: the one switch from
// a QuantKernelSet entry to its kernel compiled for F.
template <typename Body>
inline void ForFormat(WeightFormat f, Body&& body) {
  switch (f) {
    case WeightFormat::kInt4: return body(std::integral_constant<WeightFormat, WeightFormat::kInt4>{});
    case WeightFormat::kInt8: return body(std::integral_constant<WeightFormat, WeightFormat::kInt8>{});
    case WeightFormat::kF16: return body(std::integral_constant<WeightFormat, WeightFormat::kF16>{});
  }
}

// Columns per load step and vectors per step.
template <WeightFormat F>
constexpr int kStep = F == WeightFormat::kInt4 ? 32 : kVL;
template <WeightFormat F>
constexpr int kStepVecs = kStep<F> / kVL;
template <WeightFormat F>
constexpr float kZero = F == WeightFormat::kInt4 ? 8.0f : F == WeightFormat::kInt8 ? 128.0f : 0.0f;

// The kStep<F> weights of a row from column c (a multiple of kStep<F>), minus the zero point.
template <WeightFormat F>
inline void LoadStep(const uint8_t* row, int64_t c, Vec* out) {
  if constexpr (F == WeightFormat::kInt4) {
    LoadInt4Chunk(row + (c >> 1), out);
    for (int v = 0; v < kStepVecs<F>; ++v) out[v] -= kZero<F>;
  } else if constexpr (F == WeightFormat::kInt8) {
    out[0] = LoadBytesAsFloat(row + c) - kZero<F>;
  } else {
    out[0] = LoadHalf(row + 2 * c);
  }
}

// One weight of a row, minus the zero point (tails).
template <WeightFormat F>
inline float LoadOne(const uint8_t* row, int64_t c) {
  if constexpr (F == WeightFormat::kInt4) {
    const uint8_t b = row[c / 32 * 16 + c % 16];
    return static_cast<float>(c % 32 < 16 ? b & 15 : b >> 4) - kZero<F>;
  } else if constexpr (F == WeightFormat::kInt8) {
    return static_cast<float>(row[c]) - kZero<F>;
  } else {
    uint16_t h;
    std::memcpy(&h, row + 2 * c, sizeof h);
    return HalfToFloat(h);
  }
}

// Group length along a row: float16 has no groups (one "group" of d, scale 1).
template <WeightFormat F>
int64_t GroupOf(int64_t d, int64_t group) {
  return F == WeightFormat::kF16 ? std::max<int64_t>(d, 1) : group;
}

// Columns per step of the GEMV loops (two or more vectors: two accumulator chains per row and token).
template <WeightFormat F>
constexpr int kDotStep = F == WeightFormat::kF16 ? 2 * kVL : 32;

template <WeightFormat F>
constexpr int64_t ByteOffset(int64_t c) {
  return F == WeightFormat::kInt4 ? c / 2 : F == WeightFormat::kInt8 ? c : 2 * c;
}

// The kDotStep<F> weights of a row from column c, raw: q as float (no zero point) or the float16 value.
template <WeightFormat F>
inline void LoadRaw(const uint8_t* row, int64_t c, Vec* out) {
  constexpr int NV = kDotStep<F> / kVL;
  if constexpr (F == WeightFormat::kInt4) {
    LoadInt4Chunk(row + (c >> 1), out);
  } else if constexpr (F == WeightFormat::kInt8) {
    for (int v = 0; v < NV; ++v) out[v] = LoadBytesAsFloat(row + c + v * kVL);
  } else {
    for (int v = 0; v < NV; ++v) out[v] = LoadHalf(row + 2 * (c + v * kVL));
  }
}

template <WeightFormat F>
inline float LoadOneRaw(const uint8_t* row, int64_t c) {
  return LoadOne<F>(row, c) + kZero<F>;
}

inline float DotFloats(const float* a, const float* b, int64_t count) {
  Vec v = Vec{};
  int64_t i = 0;
  for (; i + kVL <= count; i += kVL) v += Load(a + i) * Load(b + i);
  float sum = HorizontalSum(v);
  for (; i < count; ++i) sum += a[i] * b[i];
  return sum;
}

#if defined(__AVX512F__)
// int4 gate/up rows, AVX-512: a group's 16 dequantized levels s * (q - 8) sit in one register
// and each weight is looked up there by its nibble (vpermps reads the low 4 bits of an index, so
// the low nibbles need no mask). Per 32 weights and row that replaces two converts, the group's
// scaling of its partial sums and the zero-point correction with two permutes (table: one
// multiply per row and group). Not for the down rows: their scales vary along the row.
// 30 layers of d = 576, n = 16 (quant-kernel-notes #8): one token 4-9 % faster, 4 tokens 8-17 %.
constexpr bool kInt4Lookup = true;
static_assert(kDotStep<WeightFormat::kInt4> == 2 * kVL, "a lookup step is one 16-byte chunk: two vectors");

inline void LoadInt4Scaled(const uint8_t* chunk, const __m512 table, Vec* out) {
  constexpr __mmask16 all = 0xffff;  // masked forms: see LoadBytesAsFloat
  const __m512i b = _mm512_maskz_cvtepu8_epi32(all, _mm_loadu_si128(reinterpret_cast<const __m128i*>(chunk)));
  out[0] = reinterpret_cast<Vec>(_mm512_maskz_permutexvar_ps(all, b, table));
  out[1] = reinterpret_cast<Vec>(_mm512_maskz_permutexvar_ps(all, _mm512_maskz_srli_epi32(all, b, 4), table));
}

// acc[r][t] = sum over the whole groups g < whole of row r of s[r][g] * (q - 8) . x[t] (steps of
// kDotStep = 32 weights: one 16-byte chunk, two vectors).
template <int R, int T>
void Int4WholeGroups(const uint8_t* w, int64_t rb, const float* scales, int64_t groups, int64_t whole, int64_t G,
                     int64_t spg, const float* const* x, Vec (&acc)[R][T]) {
  const Vec levels = {-8, -7, -6, -5, -4, -3, -2, -1, 0, 1, 2, 3, 4, 5, 6, 7};
  Vec sums[R][T][2] = {};
  for (int64_t g = 0; g < whole; ++g) {
    __m512 table[R];
    for (int rr = 0; rr < R; ++rr) table[rr] = reinterpret_cast<__m512>(Splat(scales[rr * groups + g]) * levels);
    for (int64_t i = 0; i < spg; ++i) {
      const int64_t c = g * G + i * kDotStep<WeightFormat::kInt4>;
      Vec wv[R][2];
      for (int rr = 0; rr < R; ++rr) {
        LoadInt4Scaled(w + rr * rb + (c >> 1), table[rr], wv[rr]);
        __builtin_prefetch(w + (rr + R) * rb + (c >> 1), 0, 3);  // the next tile's rows, as DotTile's step
      }
      for (int t = 0; t < T; ++t) {
        for (int v = 0; v < 2; ++v) {
          const Vec xv = Load(x[t] + c + v * kVL);
          for (int rr = 0; rr < R; ++rr) sums[rr][t][v] += wv[rr][v] * xv;
        }
      }
    }
  }
  for (int rr = 0; rr < R; ++rr) {
    for (int t = 0; t < T; ++t) acc[rr][t] = sums[rr][t][0] + sums[rr][t][1];
  }
}
#else
constexpr bool kInt4Lookup = false;  // 8-lane permutes would need two tables and a blend
template <int R, int T>
void Int4WholeGroups(const uint8_t* w, int64_t rb, const float* scales, int64_t groups, int64_t whole, int64_t G,
                     int64_t spg, const float* const* x, Vec (&acc)[R][T]);  // never instantiated
#endif

// R rows x T tokens. Integer formats: per group, part = sum q * x over the group's columns
// (raw q), then acc += scale * part, and corr = sum_g scale[g] * xsum[t][g] once per row; the result is
// hsum(acc) - zero * corr, i.e. sum scale * (q - zero) * x without a subtraction per weight.
// SPG: steps of kDotStep<F> columns per group when known at compile time (G = 32, 64, 128),
// so that the loop over whole groups has no bounds arithmetic; 0 = read from G.
template <WeightFormat F, int R, int T, int SPG>
void DotTile(const uint8_t* w, int64_t rb, const float* scales, int64_t groups, int64_t d, int64_t G,
             const float* const* x, const float* const* xsum, float* out, int64_t ldo) {
  constexpr int S = kDotStep<F>, NV = S / kVL;
  const int64_t d_steps = d - d % S;
  Vec acc[R][T] = {};
  float corr[R][T] = {}, tail[R][T] = {};
  // pt: the scalar sums of a partial group's last columns; whole groups have none (s * 0 is
  // not folded away without -ffast-math, so they skip it).
  auto finish_group = [&](int64_t g, Vec (&part)[R][T][2], const float (*pt)[T]) {
    for (int rr = 0; rr < R; ++rr) {
      const float s = F == WeightFormat::kF16 ? 1.0f : scales[rr * groups + g];
      const Vec sv = Splat(s);
      for (int t = 0; t < T; ++t) {
        acc[rr][t] += sv * (part[rr][t][0] + part[rr][t][1]);
        if (pt) tail[rr][t] += s * pt[rr][t];
      }
    }
  };
  auto step = [&](int64_t c, Vec (&part)[R][T][2]) {
    Vec wv[R][NV];
    for (int rr = 0; rr < R; ++rr) {
      LoadRaw<F>(w + rr * rb, c, wv[rr]);
      // The rows of the next tile, same columns: R rows ahead in the weight stream.
      __builtin_prefetch(w + (rr + R) * rb + ByteOffset<F>(c), 0, 3);
    }
    for (int t = 0; t < T; ++t) {
      for (int v = 0; v < NV; ++v) {
        const Vec xv = Load(x[t] + c + v * kVL);
        for (int rr = 0; rr < R; ++rr) part[rr][t][v & 1] += wv[rr][v] * xv;
      }
    }
  };
  // Whole groups (integer formats: G is a multiple of the step), then the last, partial one.
  const int64_t whole = F == WeightFormat::kF16 ? 0 : d / G;
  const int64_t spg = SPG > 0 ? SPG : G / S;
  constexpr bool lookup = F == WeightFormat::kInt4 && kInt4Lookup;  // AVX-512: whole groups by lookup
  if constexpr (lookup) {
    Int4WholeGroups<R, T>(w, rb, scales, groups, whole, G, spg, x, acc);
  } else {
    for (int64_t g = 0; g < whole; ++g) {
      Vec part[R][T][2] = {};
      const int64_t c0 = g * G;
      for (int64_t i = 0; i < spg; ++i) step(c0 + i * S, part);
      finish_group(g, part, nullptr);
    }
  }
  for (int64_t g = whole; g < groups; ++g) {
    const int64_t c0 = g * G, c1 = std::min(d, c0 + G), cs = std::min(c1, d_steps);
    Vec part[R][T][2] = {};
    for (int64_t c = c0; c < cs; c += S) step(c, part);
    float pt[R][T] = {};
    for (int64_t c = cs; c < c1; ++c) {
      for (int rr = 0; rr < R; ++rr) {
        const float q = LoadOneRaw<F>(w + rr * rb, c);
        for (int t = 0; t < T; ++t) pt[rr][t] += q * x[t][c];
      }
    }
    finish_group(g, part, pt);
  }
  if constexpr (F != WeightFormat::kF16) {
    // The zero point's share, sum_g scale[g] * xsum[g], as one vector dot product per row and token
    // (a scalar multiply-add per group cost a fifth of the loop's instructions).
    for (int rr = 0; rr < R; ++rr) {
      // (The lookup path's whole groups have the zero point in their table.)
      const int64_t g0 = lookup ? whole : 0;
      for (int t = 0; t < T; ++t) corr[rr][t] = DotFloats(scales + rr * groups + g0, xsum[t] + g0, groups - g0);
    }
  }
  for (int rr = 0; rr < R; ++rr) {
    for (int t = 0; t < T; ++t) {
      out[t * ldo + rr] = HorizontalSum(acc[rr][t]) + tail[rr][t] - kZero<F> * corr[rr][t];
    }
  }
}

// Rows per register tile: more rows share each x load and keep more loads in flight; the
// accumulators (2 R T part vectors + R T sums) must fit the registers (32 with AVX-512, 16 else).
template <int T>
constexpr int kDotRowsFor = kVL == 16 ? (T == 1 ? 4 : T == 2 ? 2 : 1) : (T == 1 ? 2 : 1);

template <WeightFormat F, int T, int SPG>
void DotRowsG(const uint8_t* w, const float* scales, int64_t rows, int64_t d, int64_t G, int64_t groups,
              const float* const* x, const float* const* xsum, float* out, int64_t ldo) {
  constexpr int R = kDotRowsFor<T>;
  const int64_t rb = RowBytes(F, d);
  int64_t r = 0;
  for (; r + R <= rows; r += R) {
    DotTile<F, R, T, SPG>(w + r * rb, rb, scales ? scales + r * groups : nullptr, groups, d, G, x, xsum, out + r,
                          ldo);
  }
  for (; r < rows; ++r) {
    DotTile<F, 1, T, SPG>(w + r * rb, rb, scales ? scales + r * groups : nullptr, groups, d, G, x, xsum, out + r,
                          ldo);
  }
}

template <WeightFormat F, int T>
void DotRowsT(const uint8_t* w, const float* scales, int64_t rows, int64_t d, int64_t group,
              const float* const* x, const float* const* xsum, float* out, int64_t ldo) {
  const int64_t G = GroupOf<F>(d, group), groups = CeilDiv(d, G);
  if constexpr (F != WeightFormat::kF16) {
    switch (G / kDotStep<F>) {
      case 1: return DotRowsG<F, T, 1>(w, scales, rows, d, G, groups, x, xsum, out, ldo);
      case 2: return DotRowsG<F, T, 2>(w, scales, rows, d, G, groups, x, xsum, out, ldo);
      case 4: return DotRowsG<F, T, 4>(w, scales, rows, d, G, groups, x, xsum, out, ldo);
      default: break;
    }
  }
  DotRowsG<F, T, 0>(w, scales, rows, d, G, groups, x, xsum, out, ldo);
}

template <WeightFormat F>
void DotRowsF(const uint8_t* w, const float* scales, int64_t rows, int64_t d, int64_t group,
              const float* const* x, const float* const* xsum, int count, float* out, int64_t ldo) {
  switch (count) {
    case 1: return DotRowsT<F, 1>(w, scales, rows, d, group, x, xsum, out, ldo);
    case 2: return DotRowsT<F, 2>(w, scales, rows, d, group, x, xsum, out, ldo);
    case 3: return DotRowsT<F, 3>(w, scales, rows, d, group, x, xsum, out, ldo);
    default: return DotRowsT<F, 4>(w, scales, rows, d, group, x, xsum, out, ldo);
  }
}

void DotRows(WeightFormat f, const uint8_t* w, const float* scales, int64_t rows, int64_t d, int64_t group,
             const float* const* x, const float* const* xsum, int count, float* out, int64_t ldo) {
  if (count <= 0) return;
  ForFormat(f, [&](auto F) { DotRowsF<decltype(F)::value>(w, scales, rows, d, group, x, xsum, count, out, ldo); });
}

// xsum[g] = sum of x over column group g (the zero-point correction of DotRows).
void GroupSums(const float* x, int64_t d, int64_t group, float* xsum) {
  for (int64_t g = 0, c0 = 0; c0 < d; ++g, c0 += group) {
    const int64_t c1 = std::min(d, c0 + group);
    Vec a = Vec{};
    int64_t c = c0;
    for (; c + kVL <= c1; c += kVL) a += Load(x + c);
    float s = HorizontalSum(a);
    for (; c < c1; ++c) s += x[c];
    xsum[g] = s;
  }
}

// dst[t][c] += h[t][j + r] * row j + r[c] for the R rows from row0 (rb bytes apart), over all
// columns for T tokens, raw values (LoadRaw): the rows are dequantized once for all the tokens,
// and each dst vector is loaded and stored once per R rows. The sums run in row order, so any R
// gives the same bits.
template <WeightFormat F, int R, int T>
inline void AddRows(const uint8_t* row0, int64_t rb, const float* const* h, int64_t j, int64_t d,
                    float* const* dst) {
  constexpr int S = kDotStep<F>, NV = S / kVL;
  Vec hv[R][T];
  for (int r = 0; r < R; ++r) {
    for (int t = 0; t < T; ++t) hv[r][t] = Splat(h[t][j + r]);
  }
  int64_t c = 0;
  for (; c + S <= d; c += S) {
    Vec a[R][NV];
    for (int r = 0; r < R; ++r) {
      LoadRaw<F>(row0 + r * rb, c, a[r]);
      if constexpr (R > 1) {  // the next pass's rows, same columns (a prefetch never faults)
        __builtin_prefetch(row0 + (r + R) * rb + ByteOffset<F>(c), 0, 3);
      }
    }
    for (int t = 0; t < T; ++t) {
      for (int v = 0; v < NV; ++v) {
        Vec y = Load(dst[t] + c + v * kVL);
        for (int r = 0; r < R; ++r) y += hv[r][t] * a[r][v];
        Store(dst[t] + c + v * kVL, y);
      }
    }
  }
  for (; c < d; ++c) {
    float q[R];
    for (int r = 0; r < R; ++r) q[r] = LoadOneRaw<F>(row0 + r * rb, c);
    for (int t = 0; t < T; ++t) {
      float y = dst[t][c];
      for (int r = 0; r < R; ++r) y += h[t][j + r] * q[r];
      dst[t][c] = y;
    }
  }
}

// Rows per pass: 4 with 32 vector registers (AVX-512: 8 weight vectors and up to 16 splats of h
// live), 2 with 16.
constexpr int kAddRows = kVL >= 16 ? 4 : 2;

// Rows [j0, j1) into dst[t] for T tokens, kAddRows at a time, then the remainder.
template <WeightFormat F, int T>
inline void AddRowRange(const uint8_t* v, int64_t rb, const float* const* h, int64_t j0, int64_t j1, int64_t d,
                        float* const* dst) {
  int64_t j = j0;
  for (; j + kAddRows <= j1; j += kAddRows) AddRows<F, kAddRows, T>(v + j * rb, rb, h, j, d, dst);
  if constexpr (kAddRows > 2) {
    for (; j + 2 <= j1; j += 2) AddRows<F, 2, T>(v + j * rb, rb, h, j, d, dst);
  }
  if (j < j1) AddRows<F, 1, T>(v + j * rb, rb, h, j, d, dst);
}

template <WeightFormat F, int T>
void AccumulateRowsT(const uint8_t* v, const float* scales, const float* const* h, int64_t rows, int64_t d,
                     int64_t group, float* acc, float* const* y) {
  const int64_t rb = RowBytes(F, d);
  if constexpr (F == WeightFormat::kF16) {  // no scales: straight into y
    AddRowRange<F, T>(v, rb, h, 0, rows, d, y);
    return;
  } else {
    // Per group of rows and token: acc[t] = sum_j h[t][j] * q[j] (raw), hs[t] = sum_j h[t][j];
    // then y[t] += scale_row * (acc[t] - zero * hs[t]).
    float* accs[T];
    for (int t = 0; t < T; ++t) accs[t] = acc + t * d;
    for (int64_t j0 = 0, g = 0; j0 < rows; j0 += group, ++g) {
      const int64_t j1 = std::min(rows, j0 + group);
      std::fill(acc, acc + T * d, 0.0f);
      AddRowRange<F, T>(v, rb, h, j0, j1, d, accs);
      const float* s = scales + g * d;
      for (int t = 0; t < T; ++t) {
        float hs = 0.0f;
        int64_t j = j0;
        for (; j + 2 <= j1; j += 2) hs += h[t][j] + h[t][j + 1];
        if (j < j1) hs += h[t][j];
        const float zh = kZero<F> * hs;
        const Vec zhv = Splat(zh);
        float* yt = y[t];
        const float* at = accs[t];
        int64_t c = 0;
        for (; c + kVL <= d; c += kVL) Store(yt + c, Load(yt + c) + Load(s + c) * (Load(at + c) - zhv));
        for (; c < d; ++c) yt[c] += s[c] * (at[c] - zh);
      }
    }
  }
}

template <WeightFormat F>
void AccumulateRowsF(const uint8_t* v, const float* scales, const float* const* h, int count, int64_t rows,
                     int64_t d, int64_t group, float* acc, float* const* y) {
  switch (count) {
    case 1: return AccumulateRowsT<F, 1>(v, scales, h, rows, d, group, acc, y);
    case 2: return AccumulateRowsT<F, 2>(v, scales, h, rows, d, group, acc, y);
    case 3: return AccumulateRowsT<F, 3>(v, scales, h, rows, d, group, acc, y);
    case 4: return AccumulateRowsT<F, 4>(v, scales, h, rows, d, group, acc, y);
    default: return;  // callers pass 1..kMaxQuantDotTokens
  }
}

void AccumulateRows(WeightFormat f, const uint8_t* v, const float* scales, const float* const* h, int count,
                    int64_t rows, int64_t d, int64_t group, float* acc, float* const* y) {
  ForFormat(f, [&](auto F) { AccumulateRowsF<decltype(F)::value>(v, scales, h, count, rows, d, group, acc, y); });
}

template <WeightFormat F>
void DequantizeRowsF(const uint8_t* w, const float* scales, int64_t rows, int64_t d, int64_t group, float* out) {
  constexpr int S = kStep<F>, NV = kStepVecs<F>;
  const int64_t rb = RowBytes(F, d), G = GroupOf<F>(d, group), groups = CeilDiv(d, G);
  for (int64_t r = 0; r < rows; ++r) {
    const uint8_t* row = w + r * rb;
    float* o = out + r * d;
    for (int64_t g = 0; g < groups; ++g) {
      const int64_t c0 = g * G, c1 = std::min(d, c0 + G);
      const float s = F == WeightFormat::kF16 ? 1.0f : scales[r * groups + g];
      const Vec sv = Splat(s);
      int64_t c = c0;
      for (; c + S <= c1; c += S) {
        Vec wv[NV];
        LoadStep<F>(row, c, wv);
        for (int vi = 0; vi < NV; ++vi) Store(o + c + vi * kVL, sv * wv[vi]);
      }
      for (; c < c1; ++c) o[c] = s * LoadOne<F>(row, c);
    }
  }
}

void DequantizeRows(WeightFormat f, const uint8_t* w, const float* scales, int64_t rows, int64_t d, int64_t group,
                    float* out) {
  ForFormat(f, [&](auto F) { DequantizeRowsF<decltype(F)::value>(w, scales, rows, d, group, out); });
}

// Transposes kVL x kVL floats in registers (m[i][l] -> m[l][i]): log2(kVL) butterfly stages,
// stage S swapping the S x S off-diagonal sub-blocks of every 2S x 2S block (one two-source
// shuffle per vector and stage: 64 for 16 x 16 with AVX-512).
template <int S, bool kHigh, size_t... L>
inline Vec Butterfly(Vec a, Vec b, std::index_sequence<L...>) {
  // Row i (bit S clear) keeps its lanes with bit S clear and takes row i + S's lanes shifted up
  // by S; row i + S takes row i's lanes shifted down by S and keeps its own.
  if constexpr (kHigh) {
    return __builtin_shufflevector(a, b, ((L & S) ? kVL + L : L + S)...);
  } else {
    return __builtin_shufflevector(a, b, ((L & S) ? kVL + L - S : L)...);
  }
}

template <int S>
inline void TransposeStage(Vec* m) {
  if constexpr (S < kVL) {
    for (int i = 0; i < kVL; ++i) {
      if (i & S) continue;
      const Vec a = m[i], b = m[i + S];
      m[i] = Butterfly<S, false>(a, b, std::make_index_sequence<kVL>{});
      m[i + S] = Butterfly<S, true>(a, b, std::make_index_sequence<kVL>{});
    }
    TransposeStage<2 * S>(m);
  }
}

constexpr int64_t kSlabAhead = 256;  // bytes (4 cache lines); a prefetch past the weights never faults

// A slab of gate or up rows for the slab kernel (the float32 op's gate_up_tile layout):
// out[k * kSlabRows + r] = W[r][k] (as dequantize_rows) for r < rows <= kSlabRows, k < d; the rows
// from `rows` to kSlabRows are 0. Per step of kStep<F> columns the rows are dequantized into a
// tile in registers / L1, then transposed kVL x kVL at a time.
template <WeightFormat F>
void DequantizeSlabF(const uint8_t* w, const float* scales, int64_t rows, int64_t d, int64_t group, float* out) {
  constexpr int S = kStep<F>, NV = kStepVecs<F>, R = kGateUpSlabRows;
  static_assert(R % kVL == 0, "a slab row is whole vectors");
  const int64_t rb = RowBytes(F, d), G = GroupOf<F>(d, group), groups = CeilDiv(d, G);
  alignas(64) Vec tile[R][NV];
  for (int64_t r = rows; r < R; ++r) {
    for (int vi = 0; vi < NV; ++vi) tile[r][vi] = Vec{};
  }
  int64_t c = 0;
  for (; c + S <= d; c += S) {  // S divides G: a step never crosses a group
    const int64_t g = c / G;
    for (int64_t r = 0; r < rows; ++r) {
      Vec wv[NV];
      // 32 row streams at once, more than the hardware prefetchers follow: each row's bytes
      // kSlabAhead ahead of the step, into L1.
      __builtin_prefetch(w + r * rb + ByteOffset<F>(c) + kSlabAhead, 0, 3);
      LoadStep<F>(w + r * rb, c, wv);
      const Vec sv = Splat(F == WeightFormat::kF16 ? 1.0f : scales[r * groups + g]);
      for (int vi = 0; vi < NV; ++vi) tile[r][vi] = sv * wv[vi];
    }
    for (int vi = 0; vi < NV; ++vi) {
      for (int q = 0; q < R / kVL; ++q) {
        Vec m[kVL];
        for (int l = 0; l < kVL; ++l) m[l] = tile[q * kVL + l][vi];
        TransposeStage<1>(m);
        for (int l = 0; l < kVL; ++l) Store(out + (c + vi * kVL + l) * R + q * kVL, m[l]);
      }
    }
  }
  for (; c < d; ++c) {
    const int64_t g = c / G;
    for (int64_t r = 0; r < R; ++r) {
      out[c * R + r] = r < rows ? (F == WeightFormat::kF16 ? 1.0f : scales[r * groups + g]) * LoadOne<F>(w + r * rb, c)
                                : 0.0f;
    }
  }
}

void DequantizeSlab(WeightFormat f, const uint8_t* w, const float* scales, int64_t rows, int64_t d, int64_t group,
                    float* out) {
  ForFormat(f, [&](auto F) { DequantizeSlabF<decltype(F)::value>(w, scales, rows, d, group, out); });
}

constexpr int64_t kColumnsAhead = 8;  // rows

template <WeightFormat F>
void DequantizeColumnsF(const uint8_t* v, const float* scales, int64_t rows, int64_t d, int64_t group, int64_t c0,
                        int64_t width, float* out) {
  constexpr int S = kStep<F>, NV = kStepVecs<F>;
  const int64_t rb = RowBytes(F, d), c_end = c0 + width;
  for (int64_t j = 0; j < rows; ++j) {
    const uint8_t* row = v + j * rb;
    const float* s = F == WeightFormat::kF16 ? nullptr : scales + (j / group) * d;
    // The rows are rb bytes apart and each gives a cache line or two: a stride the hardware
    // prefetchers lose at every page, so row j + kColumnsAhead's bytes are fetched now.
    if (j + kColumnsAhead < rows) {
      const uint8_t* ahead = row + kColumnsAhead * rb;
      __builtin_prefetch(ahead + ByteOffset<F>(c0), 0, 3);
      __builtin_prefetch(ahead + ByteOffset<F>(c_end) - 1, 0, 3);
    }
    float* o = out + j * width - c0;
    int64_t c = c0;
    for (; c + S <= c_end; c += S) {
      Vec wv[NV];
      LoadStep<F>(row, c, wv);
      for (int vi = 0; vi < NV; ++vi) {
        const int64_t cc = c + vi * kVL;
        Store(o + cc, F == WeightFormat::kF16 ? wv[vi] : Load(s + cc) * wv[vi]);
      }
    }
    for (; c < c_end; ++c) o[c] = F == WeightFormat::kF16 ? LoadOne<F>(row, c) : s[c] * LoadOne<F>(row, c);
  }
}

void DequantizeColumns(WeightFormat f, const uint8_t* v, const float* scales, int64_t rows, int64_t d, int64_t group,
                       int64_t c0, int64_t width, float* out) {
  ForFormat(f, [&](auto F) { DequantizeColumnsF<decltype(F)::value>(v, scales, rows, d, group, c0, width, out); });
}

// accuracy_level 4 (kernels_quant.h round_to_int8). Division, the rounding by 1.5 * 2^23 and
// the maximum are exact IEEE operations: every instruction set gives the same bits. The maximum
// keeps a NaN, so a group holding NaN or inf comes out NaN throughout (s NaN or inf), as the
// spec's arithmetic says.
bool RoundToInt8(const float* x, int64_t rows, int64_t d, int64_t G, float* x_hat, int8_t* q, float* scales) {
  constexpr float kMagic = 12582912.0f, kMaxFinite = 3.4028234663852886e38f;
  const int64_t groups = CeilDiv(d, G);
  bool finite = true;
  auto larger = [](auto a, auto m) { return (a > m) | (a != a); };  // a replaces m (NaN sticks)
  auto round = [&](auto v, auto s) {  // clip(round_half_even(v / s), -127, 127); NaN stays NaN
    auto r = (v / s + kMagic) - kMagic;
    r = r > 127.0f ? 127.0f - (r - r) : r;
    return r < -127.0f ? -127.0f - (r - r) : r;
  };
  for (int64_t t = 0; t < rows; ++t) {
    const float* xt = x + t * d;
    float* ht = x_hat + t * d;
    for (int64_t g = 0; g < groups; ++g) {
      const int64_t c0 = g * G, c1 = std::min(d, c0 + G);
      Vec m = Vec{};
      int64_t c = c0;
      for (; c + kVL <= c1; c += kVL) {
        const Vec v = Load(xt + c), a = v < 0.0f ? -v : v;
        m = larger(a, m) ? a : m;
      }
      float amax = 0.0f;
      for (int l = 0; l < kVL; ++l) amax = larger(m[l], amax) ? m[l] : amax;
      for (; c < c1; ++c) amax = larger(std::fabs(xt[c]), amax) ? std::fabs(xt[c]) : amax;
      finite = finite && amax <= kMaxFinite;
      const float s = amax / 127.0f;
      if (scales != nullptr) scales[t * groups + g] = s;
      if (s == 0.0f) {  // all zeros: q = 0
        std::fill(ht + c0, ht + c1, 0.0f);
        if (q != nullptr) std::fill(q + t * d + c0, q + t * d + c1, int8_t{0});
        continue;
      }
      const Vec sv = Splat(s);
      for (c = c0; c + kVL <= c1; c += kVL) {
        const Vec r = round(Load(xt + c), sv);
        Store(ht + c, r * sv);
        if (q != nullptr) {
          for (int l = 0; l < kVL; ++l) q[t * d + c + l] = r[l] == r[l] ? static_cast<int8_t>(r[l]) : int8_t{0};
        }
      }
      for (; c < c1; ++c) {
        const float r = round(xt[c], s);
        ht[c] = r * s;
        if (q != nullptr) q[t * d + c] = r == r ? static_cast<int8_t>(r) : int8_t{0};
      }
    }
  }
  return finite;
}

}  // namespace

const QuantKernelSet& QuantKernels() {
  static const QuantKernelSet set{
#define DSMOE_QSTR2(x) #x
#define DSMOE_QSTR(x) DSMOE_QSTR2(x)
      DSMOE_QSTR(DSMOE_ISA), DotRows, GroupSums, AccumulateRows, DequantizeRows, DequantizeColumns, DequantizeSlab,
      RoundToInt8,
  };
  return set;
}

}  // namespace dsmoe::cpu::DSMOE_ISA
