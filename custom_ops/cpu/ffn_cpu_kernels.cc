#include "cpu/ffn_cpu_kernels.h"

#include <cmath>
#include <cstring>

// The register tiles below are fixed-size arrays whose innermost loop is one
// vector operation; `omp simd` (compiled with -fopenmp-simd: no OpenMP runtime)
// tells the compiler to vectorise exactly that loop instead of an outer one,
// which measured 3x faster with GCC 12 on the portable x86-64 target.
#if defined(_OPENMP) || defined(DSMOE_OPENMP_SIMD)
#define DSMOE_SIMD _Pragma("omp simd")
#else
#define DSMOE_SIMD
#endif

namespace dsmoe::cpu {
namespace {

// Independent partial sums per dot product: a fixed-size loop over them is a
// vector register (or two) without -ffast-math, since no reassociation is needed.
constexpr int kLanes = 8;
// Rows sharing one pass over x (GEMV) or over a packed panel (GEMM tile).
constexpr int kRowTile = 4;
// Output columns per register tile of the down projection.
constexpr int kColTile = 16;

inline float Sum(const float (&a)[kLanes]) {
  float s = 0.0f;
  for (int l = 0; l < kLanes; ++l) s += a[l];
  return s;
}

}  // namespace

void DotRows(const float* DSMOE_RESTRICT w, int64_t ld, int64_t rows, const float* DSMOE_RESTRICT x, int64_t d,
             float* DSMOE_RESTRICT out) {
  const int64_t d_main = d - d % kLanes;
  int64_t r = 0;
  for (; r + kRowTile <= rows; r += kRowTile) {
    const float* w0 = w + (r + 0) * ld;
    const float* w1 = w + (r + 1) * ld;
    const float* w2 = w + (r + 2) * ld;
    const float* w3 = w + (r + 3) * ld;
    float a[kRowTile][kLanes] = {};
    for (int64_t k = 0; k < d_main; k += kLanes) {
      DSMOE_SIMD
      for (int l = 0; l < kLanes; ++l) {
        const float xv = x[k + l];
        a[0][l] += w0[k + l] * xv;
        a[1][l] += w1[k + l] * xv;
        a[2][l] += w2[k + l] * xv;
        a[3][l] += w3[k + l] * xv;
      }
    }
    float s0 = Sum(a[0]), s1 = Sum(a[1]), s2 = Sum(a[2]), s3 = Sum(a[3]);
    for (int64_t k = d_main; k < d; ++k) {
      s0 += w0[k] * x[k];
      s1 += w1[k] * x[k];
      s2 += w2[k] * x[k];
      s3 += w3[k] * x[k];
    }
    out[r + 0] = s0;
    out[r + 1] = s1;
    out[r + 2] = s2;
    out[r + 3] = s3;
  }
  for (; r < rows; ++r) {
    const float* w0 = w + r * ld;
    float a0[kLanes] = {};
    for (int64_t k = 0; k < d_main; k += kLanes) {
      DSMOE_SIMD
      for (int l = 0; l < kLanes; ++l) a0[l] += w0[k + l] * x[k + l];
    }
    float s0 = Sum(a0);
    for (int64_t k = d_main; k < d; ++k) s0 += w0[k] * x[k];
    out[r] = s0;
  }
}

void AccumulateRows(const float* DSMOE_RESTRICT h, const float* DSMOE_RESTRICT v, int64_t rows, int64_t ld,
                    int64_t width, float* DSMOE_RESTRICT y) {
  int64_t j = 0;
  // Four rows per pass over y: y stays in L1, each pass streams 4 row segments.
  for (; j + 4 <= rows; j += 4) {
    const float h0 = h[j], h1 = h[j + 1], h2 = h[j + 2], h3 = h[j + 3];
    const float* v0 = v + (j + 0) * ld;
    const float* v1 = v + (j + 1) * ld;
    const float* v2 = v + (j + 2) * ld;
    const float* v3 = v + (j + 3) * ld;
    DSMOE_SIMD
    for (int64_t c = 0; c < width; ++c) y[c] += h0 * v0[c] + h1 * v1[c] + h2 * v2[c] + h3 * v3[c];
  }
  for (; j < rows; ++j) {
    const float h0 = h[j];
    const float* v0 = v + j * ld;
    DSMOE_SIMD
    for (int64_t c = 0; c < width; ++c) y[c] += h0 * v0[c];
  }
}

void PackPanel(const float* DSMOE_RESTRICT x, int64_t d, const int64_t* tokens, int count,
               float* DSMOE_RESTRICT panel) {
  for (int t = 0; t < kPanel; ++t) {
    if (t < count) {
      const float* row = x + tokens[t] * d;
      for (int64_t k = 0; k < d; ++k) panel[k * kPanel + t] = row[k];
    } else {
      for (int64_t k = 0; k < d; ++k) panel[k * kPanel + t] = 0.0f;
    }
  }
}

void PanelRowsProduct(const float* DSMOE_RESTRICT w, int64_t rows, int64_t d, const float* DSMOE_RESTRICT panel,
                      float* DSMOE_RESTRICT out) {
  // Register tile kRowTile x kPanel: per k, one panel vector and kRowTile broadcasts.
  int64_t r = 0;
  for (; r + kRowTile <= rows; r += kRowTile) {
    const float* w0 = w + (r + 0) * d;
    const float* w1 = w + (r + 1) * d;
    const float* w2 = w + (r + 2) * d;
    const float* w3 = w + (r + 3) * d;
    float a[kRowTile][kPanel] = {};
    for (int64_t k = 0; k < d; ++k) {
      const float* p = panel + k * kPanel;
      const float b0 = w0[k], b1 = w1[k], b2 = w2[k], b3 = w3[k];
      DSMOE_SIMD
      for (int t = 0; t < kPanel; ++t) {
        a[0][t] += b0 * p[t];
        a[1][t] += b1 * p[t];
        a[2][t] += b2 * p[t];
        a[3][t] += b3 * p[t];
      }
    }
    std::memcpy(out + r * kPanel, a, sizeof(a));
  }
  for (; r < rows; ++r) {
    const float* w0 = w + r * d;
    float a0[kPanel] = {};
    for (int64_t k = 0; k < d; ++k) {
      const float* p = panel + k * kPanel;
      const float b0 = w0[k];
      DSMOE_SIMD
      for (int t = 0; t < kPanel; ++t) a0[t] += b0 * p[t];
    }
    for (int t = 0; t < kPanel; ++t) out[r * kPanel + t] = a0[t];
  }
}

namespace {

// Register tile kTokens x kColTile of the down projection, over all rows.
template <int kTokens>
void PanelAccumulateTile(const float* DSMOE_RESTRICT h, const float* DSMOE_RESTRICT v, int64_t rows, int64_t ld,
                         int64_t width, float* DSMOE_RESTRICT acc) {
  float a[kTokens][kColTile] = {};
  for (int64_t j = 0; j < rows; ++j) {
    const float* vj = v + j * ld;
    const float* hj = h + j * kPanel;
    for (int t = 0; t < kTokens; ++t) {
      const float ht = hj[t];
      DSMOE_SIMD
      for (int c = 0; c < kColTile; ++c) a[t][c] += ht * vj[c];
    }
  }
  for (int t = 0; t < kTokens; ++t) {
    for (int c = 0; c < kColTile; ++c) acc[t * width + c] += a[t][c];
  }
}

}  // namespace

void PanelAccumulateRows(const float* DSMOE_RESTRICT h, const float* DSMOE_RESTRICT v, int64_t rows, int64_t ld,
                         int64_t width, float* DSMOE_RESTRICT acc) {
  constexpr int kHalf = kPanel / 2;  // 4 x 16 accumulators fit the registers of SSE..AVX-512
  const int64_t w_main = width - width % kColTile;
  for (int64_t c = 0; c < w_main; c += kColTile) {
    for (int t = 0; t < kPanel; t += kHalf) {
      PanelAccumulateTile<kHalf>(h + t, v + c, rows, ld, width, acc + t * width + c);
    }
  }
  if (w_main == width) return;
  for (int t = 0; t < kPanel; ++t) {  // column tail (width % kColTile), rare: hidden sizes are multiples of 16
    float* a = acc + t * width;
    for (int64_t j = 0; j < rows; ++j) {
      const float ht = h[j * kPanel + t];
      const float* vj = v + j * ld;
      for (int64_t c = w_main; c < width; ++c) a[c] += ht * vj[c];
    }
  }
}

namespace {

inline float Silu(float v) { return v / (1.0f + std::exp(-v)); }
inline float Gelu(float v) { return 0.5f * v * (1.0f + std::erf(v * 0.70710678118654752f)); }
inline float GeluTanh(float v) {
  constexpr float kSqrt2OverPi = 0.79788456080286536f;
  return 0.5f * v * (1.0f + std::tanh(kSqrt2OverPi * (v + 0.044715f * v * v * v)));
}

template <float (*Act)(float)>
void GatedActivationImpl(const float* g, const float* u, float scale, int64_t count, int64_t stride, float* h) {
  for (int64_t i = 0; i < count; ++i) h[i * stride] = Act(g[i * stride]) * u[i * stride] * scale;
}

}  // namespace

void GatedActivation(Activation act, const float* g, const float* u, float scale, int64_t count, int64_t stride,
                     float* h) {
  switch (act) {
    case Activation::kSilu:
      return GatedActivationImpl<Silu>(g, u, scale, count, stride, h);
    case Activation::kGelu:
      return GatedActivationImpl<Gelu>(g, u, scale, count, stride, h);
    case Activation::kGeluTanh:
      return GatedActivationImpl<GeluTanh>(g, u, scale, count, stride, h);
  }
}

}  // namespace dsmoe::cpu
