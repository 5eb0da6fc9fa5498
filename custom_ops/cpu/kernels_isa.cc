// The CPU inner loops (cpu/kernels.h), compiled once per instruction set with
// DSMOE_ISA = avx512 | avx2 | baseline and the matching compiler flags.
//
// Vectors are GCC/Clang vector extensions of kVL floats (cpu/simd.h: 16 with
// AVX-512, 8 with AVX2, 4 for the SSE2 / NEON baseline): one source, three builds.
//
// Register budget of the tiles (accumulators + operands), R = 3 (6 with AVX-512):
//   panel_gate_up: R gate rows + R up rows x 2 vectors = 4R accumulators,
//                  2 panel vectors, broadcasts straight from the weight rows
//                  (narrow panels: 2R rows x 1 vector, the same 4R).
//   panel_down:    2R tokens x 2 vectors = 4R accumulators, 2 rows of V
//                  (narrow panels: tiles of half a panel).
// 12 accumulators fit the 16 registers of AVX2/SSE, 24 the 32 of AVX-512; per
// step of k they issue 4R FMAs for 2 + 2R loads, so the FMA units bound them.
// Both walk k in slices that keep their streamed operand in L1.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <type_traits>
#include <utility>

#include "cpu/cache_blocking.h"
#include "cpu/kernels.h"
#include "cpu/simd.h"

namespace dsmoe::cpu::DSMOE_ISA {
namespace {

// Panels of tokens are NV vector registers wide: 2 for full panels, 1 for the
// narrow panels that hold a block's last few tokens (less padding).
constexpr int kWideNV = 2;
constexpr int kPanel = kWideNV * kVL;  // tokens per full panel
constexpr int kNarrowPanel = kVL;      // tokens per narrow panel
// Register tiles: AVX-512 has 32 vector registers, the others 16 (SSE, AVX2) or
// 32 (NEON, kept at 16-register tiles: NEON cores are narrow).
constexpr bool kWideRegs = kVL == 16;
// Rows of gate (and of up) per register tile: 4 * rows * NV / 2 accumulators.
template <int NV>
constexpr int kGateUpRows = (kWideRegs ? 6 : 3) * 2 / NV;
// Tokens per register tile of the down projection (2 column vectors each): full
// panels 12 (6) tokens, narrow panels half a panel, so that both split evenly.
template <int NV>
constexpr int kDownTokens = NV == 2 ? (kWideRegs ? 12 : 6) : kVL / 2;

// exp(x) with Cephes' polynomial (relative error ~2e-7 on the clamped range);
// exp(+inf) = +inf, exp(-inf) = 0, NaN stays NaN.
inline Vec Exp(Vec x) {
  const Vec big = Splat(88.3762626647949f), small = Splat(-87.3365478515625f);
  Vec c = x > big ? big : x;
  c = c < small ? small : c;
  const Vec fx = c * 1.44269504088896341f;
  const VecI n = __builtin_convertvector(fx + (fx < Splat(0.0f) ? Splat(-0.5f) : Splat(0.5f)), VecI);
  const Vec nf = __builtin_convertvector(n, Vec);
  const Vec r = c - nf * 0.693359375f + nf * 2.12194440e-4f;
  Vec p = Splat(1.9875691500E-4f);
  p = p * r + 1.3981999507E-3f;
  p = p * r + 8.3334519073E-3f;
  p = p * r + 4.1665795894E-2f;
  p = p * r + 1.6666665459E-1f;
  p = p * r + 5.0000001201E-1f;
  p = p * r * r + r + 1.0f;
  const VecI bits = (n + 127) << 23;
  Vec out = p * (Vec)bits;  // vector casts reinterpret the bits
  out = x > big ? Splat(INFINITY) : out;
  out = x < small ? Splat(0.0f) : out;
  return x != x ? x : out;
}

// act(g) * u * scale on one vector; the same formulas as the numpy reference,
// so that inf and NaN come out as it says.
inline Vec GatedVec(Activation act, Vec g, Vec u, Vec scale) {
  Vec a;
  switch (act) {
    case Activation::kSilu:
      a = g / (1.0f + Exp(-g));
      break;
    case Activation::kGeluTanh: {
      // 0.5 g (1 + tanh(y)) == g * sigmoid(2y), y = sqrt(2/pi) (g + 0.044715 g^3)
      const Vec y2 = 1.5957691216057308f * (g + 0.044715f * g * g * g);
      a = g / (1.0f + Exp(-y2));
      break;
    }
    default:  // kGelu: erf has no vector form here; it is rare (few checkpoints use it)
      for (int l = 0; l < kVL; ++l) a[l] = 0.5f * g[l] * (1.0f + std::erf(g[l] * 0.70710678118654752f));
      break;
  }
  return a * u * scale;
}

void GatedActivation(Activation act, const float* g, const float* u, float scale, int64_t count, float* h) {
  const Vec s = Splat(scale);
  int64_t i = 0;
  for (; i + kVL <= count; i += kVL) Store(h + i, GatedVec(act, Load(g + i), Load(u + i), s));
  if (i < count) {
    float gt[kVL] = {}, ut[kVL] = {}, ht[kVL];
    std::copy(g + i, g + count, gt);
    std::copy(u + i, u + count, ut);
    Store(ht, GatedVec(act, Load(gt), Load(ut), s));
    std::copy(ht, ht + (count - i), h + i);
  }
}

// R rows x T tokens of dot products, one accumulator vector each. Prefetch: the next
// tile's rows, same columns (see DotRowsTokens).
template <int R, int T, bool Prefetch>
inline void DotTile(const float* w, int64_t ld, const float* const* x, int64_t d, float* out, int64_t ldo) {
  const int64_t d_main = d - d % kVL;
  Vec acc[R][T] = {};
  for (int64_t k = 0; k < d_main; k += kVL) {
    Vec xv[T];
    for (int t = 0; t < T; ++t) xv[t] = Load(x[t] + k);
    for (int r = 0; r < R; ++r) {
      const Vec wv = Load(w + r * ld + k);
      if constexpr (Prefetch) __builtin_prefetch(w + (r + R) * ld + k, 0, 3);
      for (int t = 0; t < T; ++t) acc[r][t] += wv * xv[t];
    }
  }
  for (int r = 0; r < R; ++r) {
    for (int t = 0; t < T; ++t) {
      float s = HorizontalSum(acc[r][t]);
      for (int64_t k = d_main; k < d; ++k) s += w[r * ld + k] * x[t][k];
      out[t * ldo + r] = s;
    }
  }
}

// Rows of at most a page (d <= 1024 floats): the hardware's stream prefetcher trains per
// 4 KB page, so such rows get their own prefetches and reading order (below).
inline bool ShortRows(int64_t ld) { return ld * static_cast<int64_t>(sizeof(float)) <= 4096; }

// Short rows are prefetched a tile ahead: a short row moves on before the stream prefetcher
// has ramped up (the decode at d = 576, 30 layers from DRAM: 4 % faster at one token, 17 % at
// four; d = 1024: 2 %; d = 2048 was 1 % slower with it, so longer rows go without).
template <int R, int T, bool Prefetch>
inline void DotRowsTiles(const float* w, int64_t ld, int64_t rows, const float* const* x, int64_t d, float* out,
                         int64_t ldo) {
  int64_t r = 0;
  for (; r + R <= rows; r += R) DotTile<R, T, Prefetch>(w + r * ld, ld, x, d, out + r, ldo);
  for (; r < rows; ++r) DotTile<1, T, Prefetch>(w + r * ld, ld, x, d, out + r, ldo);
}

// Rows per tile for T tokens: about 8 accumulators (latency of the FMA chains) within 16
// registers (accumulators + R weight vectors + T token vectors); with AVX-512's 32, two rows
// (over 8 tokens some token vectors are reloaded from L1: still faster than a second pass).
template <int T>
inline void DotRowsTokens(const float* w, int64_t ld, int64_t rows, const float* const* x, int64_t d, float* out,
                          int64_t ldo) {
  constexpr int R = T <= 2 ? 4 : T <= 4 || kVL == 16 ? 2 : 1;
  if (ShortRows(ld)) return DotRowsTiles<R, T, true>(w, ld, rows, x, d, out, ldo);
  DotRowsTiles<R, T, false>(w, ld, rows, x, d, out, ldo);
}

// fn(std::integral_constant<int, count>{}) for 1 <= count <= kMaxDotTokens (callers pass no
// other count): the one dispatch from a run-time token count to the loops' template argument.
template <int T = 1, typename F>
inline void WithTokenCount(int count, const F& fn) {
  if constexpr (T <= kMaxDotTokens) {
    if (count == T) return fn(std::integral_constant<int, T>{});
    WithTokenCount<T + 1>(count, fn);
  }
}

void DotRows(const float* w, int64_t ld, int64_t rows, const float* const* x, int count, int64_t d, float* out,
             int64_t ldo) {
  WithTokenCount(count, [&](auto t) { DotRowsTokens<decltype(t)::value>(w, ld, rows, x, d, out, ldo); });
}

// y[t][c] += h[t][0] * v[0][c] (+ h[t][1] * v[1][c]) for T tokens, in that order: the rows'
// vectors are loaded once for all the tokens, the next two rows prefetched.
template <int T, bool Two>
inline void AddRowPair(const float* const* h, int64_t j, const float* v, int64_t ld, int64_t width,
                       float* const* y) {
  const int64_t main = width - width % kVL;
  const float* v1 = v + ld;
  Vec h0[T], h1[T];
  for (int t = 0; t < T; ++t) {
    h0[t] = Splat(h[t][j]);
    h1[t] = Splat(Two ? h[t][j + 1] : 0.0f);
  }
  for (int64_t c = 0; c < main; c += kVL) {
    __builtin_prefetch(v + 2 * ld + c, 0, 3);
    if constexpr (Two) __builtin_prefetch(v1 + 2 * ld + c, 0, 3);
    const Vec w0 = Load(v + c), w1 = Two ? Load(v1 + c) : Vec{};
    for (int t = 0; t < T; ++t) {
      Vec a = Load(y[t] + c);
      a += h0[t] * w0;
      if constexpr (Two) a += h1[t] * w1;
      Store(y[t] + c, a);
    }
  }
  for (int64_t c = main; c < width; ++c) {
    for (int t = 0; t < T; ++t) {
      float s = y[t][c];
      s += h[t][j] * v[c];
      if constexpr (Two) s += h[t][j + 1] * v1[c];
      y[t][c] = s;
    }
  }
}

// Short rows: two rows at a time in address order, each
// read once for the T tokens; y read and written once per pair of rows (from L1).
template <int T>
void AccumulateShortRows(const float* const* h, const float* v, int64_t rows, int64_t ld, int64_t width,
                         float* const* y) {
  int64_t j = 0;
  for (; j + 2 <= rows; j += 2) AddRowPair<T, true>(h, j, v + j * ld, ld, width, y);
  if (j < rows) AddRowPair<T, false>(h, j, v + j * ld, ld, width, y);
}

// One token, long rows: column chunks of 4 vectors stay in registers over all rows.
void AccumulateLongRows(const float* h, const float* v, int64_t rows, int64_t ld, int64_t width, float* y) {
  constexpr int kCols = 4 * kVL;
  int64_t c = 0;
  for (; c + kCols <= width; c += kCols) {
    Vec acc[4];
    for (int q = 0; q < 4; ++q) acc[q] = Load(y + c + q * kVL);
    for (int64_t j = 0; j < rows; ++j) {
      const Vec hj = Splat(h[j]);
      const float* vj = v + j * ld + c;
      for (int q = 0; q < 4; ++q) acc[q] += hj * Load(vj + q * kVL);
    }
    for (int q = 0; q < 4; ++q) Store(y + c + q * kVL, acc[q]);
  }
  for (; c < width; ++c) {
    float s = y[c];
    for (int64_t j = 0; j < rows; ++j) s += h[j] * v[j * ld + c];
    y[c] = s;
  }
}

void AccumulateRows(const float* const* h, int count, const float* v, int64_t rows, int64_t ld, int64_t width,
                    float* const* y) {
  if (ShortRows(ld)) {
    return WithTokenCount(count, [&](auto t) { AccumulateShortRows<decltype(t)::value>(h, v, rows, ld, width, y); });
  }
  for (int t = 0; t < count; ++t) AccumulateLongRows(h[t], v, rows, ld, width, y[t]);
}

// Why this order: the decode path reads V once per token at memory speed. Tile after
// tile is one stream at a time (single-thread loop of the down reads alone, d = 2048,
// B = 704: 11.5-12.3 GB/s against 14.2 for the rows layout's slabs). Row j of all the
// tiles at once is many streams, but B * 256 bytes apart, aliasing in the cache sets
// (13.6); a skew of one step per tile spreads them (15.1-15.6). Bands of 8 tiles: 32
// (d = 2048) or 64 (d = 4096) concurrent streams were 1-5 % slower in the op. Two rows
// per step: y's read-modify-write once per two rows (4 tokens: one row per step was
// 2-5 % slower, four rows equal to two).
void AccumulateTiles(const float* const* h, int count, const float* v, int64_t rows, int64_t tile_stride,
                     int64_t width, float* const* y) {
  constexpr int64_t kT = kDownTileWidth, kRows = 2, kBand = 8;  // as kernels.h describes
  static_assert(kT % kVL == 0, "a tile row is whole vectors");
  const int64_t tiles = (width + kT - 1) / kT, full = width / kT;  // the last tile may be partial
  const int64_t steps = (rows + kRows - 1) / kRows;
  for (int64_t b0 = 0; b0 < tiles; b0 += kBand) {  // a band of tiles at a time
    const int64_t b1 = std::min(tiles, b0 + kBand);
    for (int64_t s = 0; s < steps + (b1 - b0) - 1; ++s) {
      const int64_t q0 = b0 + (s >= steps ? s - steps + 1 : 0), q1 = std::min(b1, b0 + s + 1);
      for (int64_t q = q0; q < q1; ++q) {  // tile q at rows [j0, j1)
        const int64_t j0 = (s - (q - b0)) * kRows, j1 = std::min(rows, j0 + kRows);
        const float* vq = v + q * tile_stride;
        if (q < full) {
          for (int t = 0; t < count; ++t) {
            float* yt = y[t] + q * kT;
            Vec acc[kT / kVL];
            for (int e = 0; e < kT / kVL; ++e) acc[e] = Load(yt + e * kVL);
            for (int64_t j = j0; j < j1; ++j) {
              const Vec ht = Splat(h[t][j]);
              for (int e = 0; e < kT / kVL; ++e) acc[e] += ht * Load(vq + j * kT + e * kVL);
            }
            for (int e = 0; e < kT / kVL; ++e) Store(yt + e * kVL, acc[e]);
          }
        } else {
          for (int t = 0; t < count; ++t) {
            for (int64_t j = j0; j < j1; ++j) {
              for (int64_t c = 0; c < width - q * kT; ++c) y[t][q * kT + c] += h[t][j] * vq[j * kT + c];
            }
          }
        }
      }
    }
  }
}

// One stage of an in-register kVL x kVL transpose on the row pair (a, b), S rows
// apart: swaps the off-diagonal S x S blocks of their 2S x 2S block.
template <int S, size_t... L>
inline void TransposeStage(Vec& a, Vec& b, std::index_sequence<L...>) {
  const Vec lo = __builtin_shufflevector(a, b, static_cast<int>((L & S) == 0 ? L : kVL + L - S)...);
  const Vec hi = __builtin_shufflevector(a, b, static_cast<int>((L & S) == 0 ? L + S : kVL + L)...);
  a = lo;
  b = hi;
}

// r[i][l] -> r[l][i] for a kVL x kVL block: log2(kVL) stages of kVL / 2 row pairs.
template <int S = kVL / 2>
inline void Transpose(Vec* r) {
  if constexpr (S >= 1) {
    for (int i = 0; i < kVL; ++i) {
      if ((i & S) == 0) TransposeStage<S>(r[i], r[i + S], std::make_index_sequence<kVL>{});
    }
    Transpose<S / 2>(r);
  }
}

template <int NV>
void PackPanel(const float* x, int64_t d, const int64_t* tokens, int count, float* panel) {
  // kVL tokens x kVL values of k at a time, transposed in registers. The scalar
  // transpose this replaces was 8.8 % of a prefill profile with small blocks
  // (d = 576, B = 96): its cost per panel does not shrink with B, the GEMM's does.
  constexpr int kPanel = NV * kVL;
  const int64_t d_main = d - d % kVL;
  for (int g = 0; g < NV; ++g) {
    const float* src[kVL];
    for (int t = 0; t < kVL; ++t) src[t] = g * kVL + t < count ? x + tokens[g * kVL + t] * d : nullptr;
    float* dst = panel + g * kVL;
    for (int64_t k0 = 0; k0 < d_main; k0 += kVL) {
      Vec r[kVL];
      for (int t = 0; t < kVL; ++t) r[t] = src[t] != nullptr ? Load(src[t] + k0) : Vec{};
      Transpose(r);
      for (int k = 0; k < kVL; ++k) Store(dst + (k0 + k) * kPanel, r[k]);
    }
    for (int64_t k = d_main; k < d; ++k) {
      for (int t = 0; t < kVL; ++t) dst[k * kPanel + t] = src[t] != nullptr ? src[t][k] : 0.0f;
    }
  }
}

// Accumulates rows [0, R) of gate and up over k < kc into acc ([R][2][P],
// gate then up; P = NV vectors), starting from zero when `first`.
template <int R, int NV>
inline void GateUpTile(const float* gate, const float* up, int64_t ld, int64_t kc, const float* panel, bool first,
                       float* acc, PrefetchStreams& pf) {
  constexpr int kNV = NV, kPanel = NV * kVL;
  Vec ag[R][kNV], au[R][kNV];
  for (int i = 0; i < R; ++i) {
    for (int v = 0; v < kNV; ++v) {
      ag[i][v] = first ? Vec{} : Load(acc + (2 * i) * kPanel + v * kVL);
      au[i][v] = first ? Vec{} : Load(acc + (2 * i + 1) * kPanel + v * kVL);
    }
  }
  // 8 lines of the next task's weights per 16 steps of k (~400 FMAs): enough to
  // have them in L2 before this task ends at 2 or more panels a block.
  for (int64_t k0 = 0; k0 < kc; k0 += 16) {
    pf.gate.Step();
    pf.up.Step();
    const int64_t k1 = std::min<int64_t>(kc, k0 + 16);
    // Unrolled: per step of k the tile issues 24 FMAs and 14 loads (AVX-512), and
    // the loop's own pointer updates, compare and branch (7 scalar ops, kept in
    // registers per row) were a sixth of the front end's budget.
#pragma GCC unroll 4
    for (int64_t k = k0; k < k1; ++k) {
      Vec b[kNV];
      for (int v = 0; v < kNV; ++v) b[v] = Load(panel + k * kPanel + v * kVL);
      for (int i = 0; i < R; ++i) {
        const Vec g = Splat(gate[i * ld + k]), u = Splat(up[i * ld + k]);
        for (int v = 0; v < kNV; ++v) {
          ag[i][v] += g * b[v];
          au[i][v] += u * b[v];
        }
      }
    }
  }
  for (int i = 0; i < R; ++i) {
    for (int v = 0; v < kNV; ++v) {
      Store(acc + (2 * i) * kPanel + v * kVL, ag[i][v]);
      Store(acc + (2 * i + 1) * kPanel + v * kVL, au[i][v]);
    }
  }
}

template <int NV>
void PanelGateUp(Activation act, const float* gate, const float* up, int64_t rows, int64_t d, const float* panel,
                 const float* coef, float* h, PrefetchStreams& pf) {
  constexpr int kNV = NV, kPanel = NV * kVL, kRows = kGateUpRows<NV>;
  // k is cut into slices of kc steps so that the panel's slice ([kc][kPanel], 2/3 of L1:
  // PanelSliceFloats) stays in L1 while every row tile of this call passes over it.
  const int64_t slice = PanelSliceFloats() / kPanel;
  constexpr int64_t kMaxRows = 64;
  float acc[kMaxRows * 2 * kPanel];
  for (int64_t r0 = 0; r0 < rows; r0 += kMaxRows) {
    const int64_t nr = std::min(kMaxRows, rows - r0);
    for (int64_t k0 = 0; k0 < d; k0 += slice) {
      const int64_t kc = std::min(slice, d - k0);
      const float* pk = panel + k0 * kPanel;
      int64_t r = 0;
      for (; r + kRows <= nr; r += kRows) {
        const int64_t off = (r0 + r) * d + k0;
        GateUpTile<kRows, NV>(gate + off, up + off, d, kc, pk, k0 == 0, acc + r * 2 * kPanel, pf);
      }
      for (; r < nr; ++r) {
        const int64_t off = (r0 + r) * d + k0;
        GateUpTile<1, NV>(gate + off, up + off, d, kc, pk, k0 == 0, acc + r * 2 * kPanel, pf);
      }
    }
    Vec cv[kNV];
    for (int v = 0; v < kNV; ++v) cv[v] = Load(coef + v * kVL);
    for (int64_t r = 0; r < nr; ++r) {
      for (int v = 0; v < kNV; ++v) {
        const Vec g = Load(acc + (2 * r) * kPanel + v * kVL), u = Load(acc + (2 * r + 1) * kPanel + v * kVL);
        Store(h + (r0 + r) * kPanel + v * kVL, GatedVec(act, g, u, cv[v]));
      }
    }
  }
}

// out[r * P + t] (+)= w[r] . panel[:, t] for R rows of w (stride ld) over kc steps of k: the
// gate/up tile with one matrix and no epilogue, twice the rows for the same accumulators.
template <int R, int NV>
inline void DotPanelTile(const float* w, int64_t ld, int64_t kc, const float* panel, bool first, float* out) {
  constexpr int kNV = NV, kPanelWidth = NV * kVL;
  Vec a[R][kNV];
  for (int i = 0; i < R; ++i) {
    for (int v = 0; v < kNV; ++v) a[i][v] = first ? Vec{} : Load(out + i * kPanelWidth + v * kVL);
  }
#pragma GCC unroll 4  // as in GateUpTile
  for (int64_t k = 0; k < kc; ++k) {
    Vec b[kNV];
    for (int v = 0; v < kNV; ++v) b[v] = Load(panel + k * kPanelWidth + v * kVL);
    for (int i = 0; i < R; ++i) {
      const Vec x = Splat(w[i * ld + k]);
      for (int v = 0; v < kNV; ++v) a[i][v] += x * b[v];
    }
  }
  for (int i = 0; i < R; ++i) {
    for (int v = 0; v < kNV; ++v) Store(out + i * kPanelWidth + v * kVL, a[i][v]);
  }
}

template <int NV>
void PanelDot(const float* w, int64_t rows, int64_t k, int64_t ld, const float* panel, float* out) {
  constexpr int kPanelWidth = NV * kVL, kRows = 2 * kGateUpRows<NV>;
  const int64_t slice = PanelSliceFloats() / kPanelWidth;  // the panel's k-slice stays in L1, as in PanelGateUp
  for (int64_t k0 = 0; k0 < k; k0 += slice) {
    const int64_t kc = std::min(slice, k - k0);
    const float* pk = panel + k0 * kPanelWidth;
    int64_t r = 0;
    for (; r + kRows <= rows; r += kRows) DotPanelTile<kRows, NV>(w + r * ld + k0, ld, kc, pk, k0 == 0, out + r * kPanelWidth);
    for (; r < rows; ++r) DotPanelTile<1, NV>(w + r * ld + k0, ld, kc, pk, k0 == 0, out + r * kPanelWidth);
  }
}

// The slab layout's gate/up: register tiles of T tokens x NV vectors of rows x gate and up
// (2 T NV accumulators). Full tiles are 6 tokens: with AVX-512 x 2 vectors (the whole 32-row
// slab; 24 accumulators), with the 16-register sets x 1 vector (12; 2 vectors and their weights
// would need 17 registers): per step of k, 2 NV weight loads and 6 broadcasts of x for 12 NV
// FMAs (the packed panels' tiles: 2 + 2R loads for 4R FMAs, plus packing X and padding the
// tokens). Fewer tokens take wider tiles (SlabNV), so that there are enough accumulators to
// hide the FMA latency: the decode path's one token is 8 accumulators over the whole slab with
// AVX2 (1 vector: 2, and 12 % slower than the rows layout's GEMV). k runs in slices of
// SlabSliceSteps() steps whose 2 x steps x 32 floats of gate and up (36 KB of a 48 KB L1)
// stay in L1 while every tile of a group passes over them; the group's sums wait in `acc`
// between slices, so the slice depth does not change the order of any sum.
constexpr int kSlabTokens = 6;                    // tokens per full register tile
constexpr int kSlabVectors = kSlabRows / kVL;     // vectors per slab row: 2 / 4 / 8
constexpr int kSlabGroup = 8 * kSlabTokens;       // tokens per group
constexpr int kSlabAcc = 2 * kSlabRows;           // floats of sums per token: gate's 32, then up's
static_assert(kSlabRows % kVL == 0, "a slab row is whole vectors");

// Vectors of rows per tile of T tokens: the most (a power of two, at most the slab's) whose
// accumulators, plus the weights and the broadcast they share when T > 1, fit the registers.
// One token counts its accumulators only: the baseline's (4-wide) whole slab is 16 of them, and
// the broadcast spilled costs less than a second pass over the slab (30 layers of d = 576, SSE2:
// 1 / 4 tokens 0.688 / 1.247 of dense -> 0.549 / 0.934, against 0.622 / 0.999 in rows).
template <int T>
constexpr int SlabNV() {
  constexpr int regs = kWideRegs ? 32 : 16;
  int nv = kSlabVectors;
  while (nv > 1 && 2 * T * nv + (T > 1 ? 2 * nv + 1 : 0) > regs - (kWideRegs ? 3 : 0)) nv /= 2;
  return nv;
}

// acc[t * kSlabAcc + {0, kSlabRows} + r] (+)= over k in [k0, k0 + kc) for the NV vectors of rows from
// gate / up (the tile's first column of the slab) and T tokens.
template <int T, int NV>
inline void SlabGateUpTile(const float* gate, const float* up, int64_t k0, int64_t kc, const float* const* x,
                           bool first, float* acc, PrefetchStreams& pf) {
  Vec ag[T][NV], au[T][NV];
  for (int t = 0; t < T; ++t) {
    for (int v = 0; v < NV; ++v) {
      ag[t][v] = first ? Vec{} : Load(acc + t * kSlabAcc + v * kVL);
      au[t][v] = first ? Vec{} : Load(acc + t * kSlabAcc + kSlabRows + v * kVL);
    }
  }
  const float* xt[T];
  for (int t = 0; t < T; ++t) xt[t] = x[t] + k0;
  const float* g = gate + k0 * kSlabRows;
  const float* u = up + k0 * kSlabRows;
  for (int64_t s0 = 0; s0 < kc; s0 += 16) {
    pf.gate.Step();
    pf.up.Step();
    const int64_t s1 = std::min<int64_t>(kc, s0 + 16);
#pragma GCC unroll 4  // as in GateUpTile
    for (int64_t k = s0; k < s1; ++k) {
      Vec gv[NV], uv[NV];
      for (int v = 0; v < NV; ++v) {
        gv[v] = Load(g + k * kSlabRows + v * kVL);
        uv[v] = Load(u + k * kSlabRows + v * kVL);
      }
      for (int t = 0; t < T; ++t) {
        const Vec a = Splat(xt[t][k]);
        for (int v = 0; v < NV; ++v) {
          ag[t][v] += a * gv[v];
          au[t][v] += a * uv[v];
        }
      }
    }
  }
  for (int t = 0; t < T; ++t) {
    for (int v = 0; v < NV; ++v) {
      Store(acc + t * kSlabAcc + v * kVL, ag[t][v]);
      Store(acc + t * kSlabAcc + kSlabRows + v * kVL, au[t][v]);
    }
  }
}

// The tiles of m tokens (1 <= m <= kSlabTokens, run-time) over the slab's first `rows` rows.
template <int M = kSlabTokens>
inline void SlabGateUpTiles(int m, const float* gate, const float* up, int64_t rows, int64_t k0, int64_t kc,
                            const float* const* x, bool first, float* acc, PrefetchStreams& pf) {
  if constexpr (M >= 1) {
    if (m == M) {
      constexpr int64_t kRows = SlabNV<M>() * kVL;
      for (int64_t r0 = 0; r0 < rows; r0 += kRows) {
        SlabGateUpTile<M, SlabNV<M>()>(gate + r0, up + r0, k0, kc, x, first, acc + r0, pf);
      }
      return;
    }
    SlabGateUpTiles<M - 1>(m, gate, up, rows, k0, kc, x, first, acc, pf);
  }
}

// The sums of `count` <= kSlabGroup tokens over all of k for the slab's first `rows` rows, into
// acc, in tiles of at most MaxT tokens; steps pf once every 16 steps of k of each register tile.
template <int MaxT = kSlabTokens>
inline void SlabSums(const float* gate, const float* up, int64_t rows, int64_t d, const float* const* x, int count,
                     float* acc, PrefetchStreams& pf) {
  const int64_t slice = SlabSliceSteps();
  for (int64_t k0 = 0; k0 < d; k0 += slice) {
    const int64_t kc = std::min(slice, d - k0);
    for (int t = 0; t < count; t += MaxT) {
      SlabGateUpTiles<MaxT>(std::min(MaxT, count - t), gate, up, rows, k0, kc, x + t, k0 == 0, acc + t * kSlabAcc,
                            pf);
    }
  }
}

// Tokens per tile of the decode path's dots: the most whose tile still spans the whole slab
// (one pass over its rows), at least one. Weights streamed from memory: a tile over part of the
// rows reads every other line of the slab first and the rest in a second pass, which the
// hardware prefetchers follow poorly (AVX2, 30 layers of d = 576: 4 and 16 tokens 11-12 %
// slower than the rows layout with 6-token tiles of one vector, equal with 1-token tiles).
template <int T = kSlabTokens>
constexpr int SlabDotTokens() {
  if constexpr (T == 1) {
    return 1;
  } else {
    return SlabNV<T>() == kSlabVectors ? T : SlabDotTokens<T - 1>();
  }
}

void SlabGateUp(Activation act, const float* gate, const float* up, int64_t rows, int64_t d, const float* const* x,
                const float* coef, int count, float* const* h, const int64_t* ldh, PrefetchStreams& pf) {
  alignas(64) float acc[kSlabGroup * kSlabAcc];
  for (int t0 = 0; t0 < count; t0 += kSlabGroup) {
    const int group = std::min(kSlabGroup, count - t0);
    SlabSums(gate, up, rows, d, x + t0, group, acc, pf);
    for (int t = 0; t < group; ++t) {
      const Vec c = Splat(coef[t0 + t]);
      const float* at = acc + t * kSlabAcc;
      float* ht = h[t0 + t];
      const int64_t ld = ldh[t0 + t];
      for (int64_t r0 = 0; r0 < rows; r0 += kVL) {
        const Vec hv = GatedVec(act, Load(at + r0), Load(at + kSlabRows + r0), c);
        for (int l = 0; l < kVL && r0 + l < rows; ++l) ht[(r0 + l) * ld] = hv[l];
      }
    }
  }
}

void SlabDots(const float* gate, const float* up, int64_t rows, int64_t d, const float* const* x, int count, float* g,
              float* u, int64_t ldo) {
  static_assert(kMaxDotTokens <= kSlabGroup, "one group of sums");
  alignas(64) float acc[kSlabGroup * kSlabAcc];
  PrefetchStreams none;
  SlabSums<SlabDotTokens()>(gate, up, rows, d, x, count, acc, none);
  for (int t = 0; t < count; ++t) {
    std::memcpy(g + t * ldo, acc + t * kSlabAcc, sizeof(float) * rows);
    std::memcpy(u + t * ldo, acc + t * kSlabAcc + kSlabRows, sizeof(float) * rows);
  }
}

// M tokens x kDownCols columns (2 vectors); h rows are P = NV vectors wide.
constexpr int kDownNV = 2;
constexpr int kDownCols = kDownNV * kVL;

template <int M, int NV>
inline void DownTile(const float* h, const float* v, int64_t rows, int64_t ld, float* const* y, const bool* fresh,
                     int64_t c, PrefetchStreams& pf) {
  constexpr int kNV = kDownNV, kPanel = NV * kVL;
  Vec acc[M][kNV] = {};
  for (int64_t j0 = 0; j0 < rows; j0 += 8) {
    pf.down.Step();  // a row of the next block's tile per 8 rows (per 4: 2-3 % slower, fill buffers full)
    const int64_t j1 = std::min<int64_t>(rows, j0 + 8);
#pragma GCC unroll 4  // as in GateUpTile
    for (int64_t j = j0; j < j1; ++j) {
      Vec b[kNV];
      for (int q = 0; q < kNV; ++q) b[q] = Load(v + j * ld + q * kVL);
      for (int i = 0; i < M; ++i) {
        const Vec a = Splat(h[j * kPanel + i]);
        for (int q = 0; q < kNV; ++q) acc[i][q] += a * b[q];
      }
    }
  }
  // Unrolled, so that acc stays in registers: as a loop GCC kept acc in a stack array,
  // zeroed by `rep stos` at every call (~3 % of the down tiles at B = 96).
#pragma GCC unroll 16
  for (int i = 0; i < M; ++i) {
    float* yi = y[i] + c;
    if (fresh != nullptr && fresh[i]) {
#pragma GCC unroll 2
      for (int q = 0; q < kNV; ++q) Store(yi + q * kVL, acc[i][q]);
    } else {
#pragma GCC unroll 2
      for (int q = 0; q < kNV; ++q) Store(yi + q * kVL, Load(yi + q * kVL) + acc[i][q]);
    }
  }
}

template <int M, int NV>
void DownTokens(const float* h, const float* v, int64_t rows, int64_t ld, int64_t width, float* const* y,
                const bool* fresh, PrefetchStreams& pf) {
  constexpr int kPanel = NV * kVL;
  int64_t c = 0;
  for (; c + kDownCols <= width; c += kDownCols) DownTile<M, NV>(h, v + c, rows, ld, y, fresh, c, pf);
  for (; c < width; ++c) {  // column tail: hidden sizes are usually multiples of the panel
    for (int i = 0; i < M; ++i) {
      float s = 0.0f;
      for (int64_t j = 0; j < rows; ++j) s += h[j * kPanel + i] * v[j * ld + c];
      y[i][c] = (fresh != nullptr && fresh[i] ? 0.0f : y[i][c]) + s;
    }
  }
}

// DownTokens<m> for a run-time m < kDownTokens.
template <int M, int NV>
inline void DownRemainder(int m, const float* h, const float* v, int64_t rows, int64_t ld, int64_t width,
                          float* const* y, const bool* fresh, PrefetchStreams& pf) {
  if constexpr (M >= 1) {
    if (m == M) return DownTokens<M, NV>(h, v, rows, ld, width, y, fresh, pf);
    DownRemainder<M - 1, NV>(m, h, v, rows, ld, width, y, fresh, pf);
  }
}

template <int NV>
void PanelDown(const float* h, const float* v, int64_t rows, int64_t ld, int64_t width, float* const* y,
               const bool* fresh, int count, PrefetchStreams& pf) {
  // Rows j in slices of kKj: the slices of h ([kKj][P]) and of V stay in L1
  // while all token and column tiles pass over them.
  constexpr int kPanel = NV * kVL, kTokens = kDownTokens<NV>;
  constexpr int64_t kKj = 2048 / kPanel;
  for (int64_t j0 = 0; j0 < rows; j0 += kKj) {
    const int64_t kj = std::min(kKj, rows - j0);
    const float* hj = h + j0 * kPanel;
    const float* vj = v + j0 * ld;
    const bool* fj = j0 == 0 ? fresh : nullptr;  // only the first slice may store
    int t = 0;
    for (; t + kTokens <= count; t += kTokens) {
      DownTokens<kTokens, NV>(hj + t, vj, kj, ld, width, y + t, fj ? fj + t : nullptr, pf);
    }
    if (t < count) DownRemainder<kTokens - 1, NV>(count - t, hj + t, vj, kj, ld, width, y + t, fj ? fj + t : nullptr, pf);
  }
}

}  // namespace

const KernelSet& Kernels() {
  static const KernelSet set{
#define DSMOE_STR2(x) #x
#define DSMOE_STR(x) DSMOE_STR2(x)
      DSMOE_STR(DSMOE_ISA), kPanel, DotRows, GatedActivation, AccumulateRows, AccumulateTiles, PackPanel<kWideNV>,
      PanelGateUp<kWideNV>, PanelDown<kWideNV>, kNarrowPanel, PackPanel<1>, PanelGateUp<1>, PanelDown<1>,
      SlabGateUp, SlabDots, PanelDot<kWideNV>,
  };
  return set;
}

}  // namespace dsmoe::cpu::DSMOE_ISA
