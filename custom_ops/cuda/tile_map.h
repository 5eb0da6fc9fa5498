// Tile bookkeeping of the grouped GEMM, the same code on the host (tests) and the
// device (the align kernel and every GEMM CTA). Plain C++ when not compiled by nvcc.
#pragma once

#if defined(__CUDACC__)
#define DSMOE_HD __host__ __device__
#else
#define DSMOE_HD
#endif

namespace dsmoe::cuda {

// tile_start[i] = sum_{j < i} ceil(count[j] / tile_m), tile_start[n] = tiles in use.
DSMOE_HD inline void AlignTiles(const int* count, int n, int tile_m, int* tile_start) {
  int total = 0;
  for (int i = 0; i < n; ++i) {
    tile_start[i] = total;
    total += (count[i] + tile_m - 1) / tile_m;
  }
  tile_start[n] = total;
}

// The M tile `tile`: its block i (tile_start[i] <= tile < tile_start[i + 1]) and the
// index of its first pair within the block. False when tile >= tile_start[n] (an idle
// CTA of the grid, which is sized for the worst case).
DSMOE_HD inline bool FindTile(const int* tile_start, int n, int tile, int tile_m, int& block, int& first) {
  if (tile < 0 || tile >= tile_start[n]) return false;
  int lo = 0, hi = n;  // invariant: tile_start[lo] <= tile < tile_start[hi]
  while (hi - lo > 1) {
    const int mid = (lo + hi) / 2;
    if (tile_start[mid] <= tile) {
      lo = mid;
    } else {
      hi = mid;
    }
  }
  block = lo;
  first = (tile - tile_start[lo]) * tile_m;
  return true;
}

}  // namespace dsmoe::cuda
