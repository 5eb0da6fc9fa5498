// Inner loops of the CPU kernel (float32), one set per instruction set.
//
// kernels_isa.cc is compiled once per instruction set (CMake: AVX-512, AVX2
// and the baseline of the target, which is SSE2 on x86-64 and NEON on
// AArch64) with GCC/Clang vector extensions, so every variant has the same
// source; SelectKernels() picks the widest one this CPU runs.
#pragma once

#include <cstdint>

#include "common/ffn_params.h"
#include "cpu/prefetch.h"

namespace dsmoe::cpu {

// Tokens a GEMV tile reads a slab's rows once for: 12, so that blocks of at most 128 rows,
// which take the GEMV path up to 12 tokens a block (cpu/plan.h), need one pass (30 layers of
// d = 576, n = 16 from DRAM, 16 tokens at ~10 a block: 1.01-1.05 -> 0.92-0.96 of dense with
// AVX-512, 1.09 -> 0.98 with AVX2).
inline constexpr int kMaxDotTokens = 12;

// Rows of a slab of the gate/up slab layout (op-spec gate_up_tile).
inline constexpr int64_t kSlabRows = kGateUpSlabRows;

struct KernelSet {
  const char* name;
  // Tokens per packed panel of the prefill path (two vector registers wide).
  int panel;

  // out[t * ldo + r] = dot(w[r * ld : r * ld + d], x[t]) for r < rows, t < count <= kMaxDotTokens:
  // each weight row is loaded once for all the tokens.
  void (*dot_rows)(const float* w, int64_t ld, int64_t rows, const float* const* x, int count, int64_t d,
                   float* out, int64_t ldo);

  // h[i] = act(g[i]) * u[i] * scale for i < count.
  void (*gated_activation)(Activation act, const float* g, const float* u, float scale, int64_t count, float* h);

  // y[t][c] += sum_{j < rows} h[t][j] * v[j * ld + c] for c < width, t < count <= kMaxDotTokens,
  // each sum in ascending j (the same bits for any count).
  void (*accumulate_rows)(const float* const* h, int count, const float* v, int64_t rows, int64_t ld,
                          int64_t width, float* const* y);

  // The same for V stored in column tiles of kDownTileWidth (op-spec "down_tile"), for
  // count <= kMaxDotTokens tokens at once:
  //   y[t][c] += sum_{j < rows} h[t][j] * v[(c / 64) * tile_stride + j * 64 + c % 64]
  // for c < width, each sum in ascending j as accumulate_rows does it (bitwise equal).
  // The tiles stream together, in bands of 8 in a wavefront: at step s, tile q of a band
  // (q from 0) takes rows 2(s - q) and 2(s - q) + 1 (kernels_isa.cc says why).
  void (*accumulate_tiles)(const float* const* h, int count, const float* v, int64_t rows, int64_t tile_stride,
                           int64_t width, float* const* y);

  // panel[k * P + t] = x[tokens[t] * d + k] for t < count, 0 for count <= t < P (P = panel).
  void (*pack_panel)(const float* x, int64_t d, const int64_t* tokens, int count, float* panel);

  // Fused gate/up of a packed panel for rows [0, rows) of one block:
  //   h[r * P + t] = act(gate[r] . panel[:, t]) * (up[r] . panel[:, t]) * coef[t]
  // gate/up rows have length d (row stride d); coef[t] is 0 for padding tokens.
  // Steps pf.gate and pf.up (cpu/prefetch.h) once every 16 steps of k.
  void (*panel_gate_up)(Activation act, const float* gate, const float* up, int64_t rows, int64_t d,
                        const float* panel, const float* coef, float* h, PrefetchStreams& pf);

  // Down projection of a panel, added into the tokens' output rows:
  //   y[t][c] += sum_{j < rows} h[j * P + t] * v[j * ld + c] for t < count, c < width
  // where y[t] points at column 0 of token t's output slice; for tokens with fresh[t] the
  // sum is stored instead (y[t] not read). Steps pf.down once every 8 rows j of each
  // register tile.
  void (*panel_down)(const float* h, const float* v, int64_t rows, int64_t ld, int64_t width, float* const* y,
                     const bool* fresh, int count, PrefetchStreams& pf);

  // The same three for narrow panels of narrow_panel tokens (one vector register),
  // which hold a block's last few tokens with less padding than a full panel.
  int narrow_panel;
  void (*pack_narrow_panel)(const float* x, int64_t d, const int64_t* tokens, int count, float* panel);
  void (*narrow_panel_gate_up)(Activation act, const float* gate, const float* up, int64_t rows, int64_t d,
                               const float* panel, const float* coef, float* h, PrefetchStreams& pf);
  void (*narrow_panel_down)(const float* h, const float* v, int64_t rows, int64_t ld, int64_t width,
                            float* const* y, const bool* fresh, int count, PrefetchStreams& pf);

  // The slab layout (op-spec gate_up_tile = 32): a slab is kSlabRows rows of gate (and of up)
  // stored k-major, w[k * kSlabRows + r], of which the first `rows` are the block's.
  // Fused gate/up of one slab for `count` tokens read in place (x[t]: token t's row of d):
  //   h[t][r * ldh[t]] = act(gate_slab[:, r] . x[t]) * (up_slab[:, r] . x[t]) * coef[t], r < rows
  // (h[t]: the token's column in its panel, at the slab's first row). Any count: the tokens are
  // the broadcast operand and the rows the lanes, so there is no padding and no packing of X.
  // Steps pf.gate and pf.up once every 16 steps of k.
  void (*slab_gate_up)(Activation act, const float* gate, const float* up, int64_t rows, int64_t d,
                       const float* const* x, const float* coef, int count, float* const* h, const int64_t* ldh,
                       PrefetchStreams& pf);
  // The decode path's dots over one slab: g[t * ldo + r] = gate_slab[:, r] . x[t] and the same
  // for u, r < rows, t < count <= kMaxDotTokens.
  void (*slab_dots)(const float* gate, const float* up, int64_t rows, int64_t d, const float* const* x, int count,
                    float* g, float* u, int64_t ldo);

  // A plain GEMM of a full packed panel (pack_panel's layout, `panel` tokens wide):
  //   out[r * panel + t] = w[r] . panel[:, t] for r < rows (rows of k floats, stride ld).
  // The gate/up tile without the second matrix and the activation (ProjectedSparseFFNInt4's
  // projections over dequantized row tiles).
  void (*panel_dot)(const float* w, int64_t rows, int64_t k, int64_t ld, const float* panel, float* out);
};

// The widest kernel set this CPU supports. DSMOE_CPU_ISA=baseline|avx2|avx512
// (read at every call: kernels call it at creation) forces a narrower one, for
// tests and comparisons; an unknown or unsupported value is an error.
const KernelSet& SelectKernels();

}  // namespace dsmoe::cpu
