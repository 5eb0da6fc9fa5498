// Index bookkeeping of the CUTLASS grouped-GEMM prefill path (docs/cuda.md), the same
// code on the host (tests/test_cuda_host.py) and the device (the permute kernel and the
// kernel that writes the GEMMs' per-group arguments). Plain C++ when not compiled by nvcc.
//
// The active (token, block) pairs are laid out in block order: block i owns the permuted
// rows [row_start[i], row_start[i + 1]) (row_start = AlignTiles with tile_m = 1), its
// tokens ascending (the counting sort's order). Per permuted row r, with P = row_start[n]:
//   xp[r, :d]        the token's input row             (aliased later by the down output)
//   gu[r, :B]        gate product, then h = act(gate) * up in place
//   gu[r, B:2B]      up product
#pragma once

#include <cstdint>

#include "cuda/tile_map.h"

namespace dsmoe::cuda {

// One GEMM of a group: D[m, n] = A[m, k] . B, offsets and leading dimensions in elements.
// A and D are row-major; B is [n, k] row-major (K-major) for gate/up, [k, n] row-major
// (N-major) for down.
struct GroupGemm {
  int m = 0, n = 0, k = 0;
  int64_t a = 0, b = 0, d = 0;
  int64_t lda = 0, ldb = 0, ldd = 0;
  bool up = false;  // gate/up GEMM: B is in up_weight (else gate_weight)
};

// The gate/up GEMM has 2n groups: 2i = gate of block i, 2i + 1 = up of block i; both
// read block i's permuted rows and write their half of gu's rows.
DSMOE_HD inline GroupGemm GateUpGroup(const int* row_start, int group, int d, int B) {
  const int i = group / 2;
  const bool up = group % 2 == 1;
  const int r0 = row_start[i];
  GroupGemm g;
  g.m = row_start[i + 1] - r0;
  g.n = B;
  g.k = d;
  g.a = static_cast<int64_t>(r0) * d;
  g.b = static_cast<int64_t>(i) * B * d;
  g.d = static_cast<int64_t>(r0) * 2 * B + (up ? B : 0);
  g.lda = d;
  g.ldb = d;
  g.ldd = 2 * static_cast<int64_t>(B);
  g.up = up;
  return g;
}

// The down GEMM has n groups: h of block i's rows (gu's first half) times down_weight[i]
// ([B, d], the rows layout), written to the block's rows of the down output.
DSMOE_HD inline GroupGemm DownGroup(const int* row_start, int i, int d, int B) {
  const int r0 = row_start[i];
  GroupGemm g;
  g.m = row_start[i + 1] - r0;
  g.n = d;
  g.k = B;
  g.a = static_cast<int64_t>(r0) * 2 * B;
  g.b = static_cast<int64_t>(i) * B * d;
  g.d = static_cast<int64_t>(r0) * d;
  g.lda = 2 * static_cast<int64_t>(B);
  g.ldb = d;
  g.ldd = d;
  return g;
}

// Permuted row r < row_start[n]: its block and token (pair_token[i * N + j] holds block
// i's tokens ascending). False for r >= row_start[n] (an idle thread of a grid sized for
// the worst case).
DSMOE_HD inline bool PermutedRow(const int* row_start, const int* pair_token, int n, int N, int r, int& block,
                                 int& token) {
  int j = 0;
  if (!FindTile(row_start, n, r, 1, block, j)) return false;
  token = pair_token[static_cast<int64_t>(block) * N + j];
  return true;
}

}  // namespace dsmoe::cuda
