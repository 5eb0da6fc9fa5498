// Inner loops of the CPU kernel (float32). Portable C++ written so that the
// compiler auto-vectorises it: contiguous unit-stride inner loops over
// fixed-size register tiles, no horizontal reductions in the hot loops.
#pragma once

#include <cstdint>

#include "common/ffn_params.h"

#if defined(_MSC_VER)
#define DSMOE_RESTRICT __restrict
#else
#define DSMOE_RESTRICT __restrict__
#endif

namespace dsmoe::cpu {

// Tokens per packed panel of the prefill path: the vector dimension of the
// gate/up tiles and the token dimension of the down tiles.
inline constexpr int kPanel = 8;

// out[r] = dot(w[r, :], x) for r < rows; w has row stride ld.
void DotRows(const float* w, int64_t ld, int64_t rows, const float* x, int64_t d, float* out);

// y[c] += sum_j h[j] * v[j, c] for c < width, j < rows; v has row stride ld.
void AccumulateRows(const float* h, const float* v, int64_t rows, int64_t ld, int64_t width, float* y);

// panel[k * kPanel + t] = x[tokens[t], k] for t < count, 0 for count <= t < kPanel.
void PackPanel(const float* x, int64_t d, const int64_t* tokens, int count, float* panel);

// out[r * kPanel + t] = dot(w[r, :], panel[:, t]) for r < rows (w: rows x d, row stride d).
void PanelRowsProduct(const float* w, int64_t rows, int64_t d, const float* panel, float* out);

// acc[t * width + c] += sum_j h[j * kPanel + t] * v[j, c] for t < kPanel, c < width, j < rows;
// v has row stride ld.
void PanelAccumulateRows(const float* h, const float* v, int64_t rows, int64_t ld, int64_t width, float* acc);

// h[i] = act(g[i]) * u[i] * scale, where g/u/h may have a stride (for panel layouts).
void GatedActivation(Activation act, const float* g, const float* u, float scale, int64_t count, int64_t stride,
                     float* h);

}  // namespace dsmoe::cpu
