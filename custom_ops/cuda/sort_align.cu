// Sort/align stage of the grouped GEMM path (no host synchronisation: every
// count stays on the device).
//   sort:  one CTA per block i scans the active column of the block over the
//          tokens (a CTA-wide prefix count per chunk of 256 tokens) and writes
//          the block's tokens, ascending, to pair_token[i * N + r]; count_i.
//   align: one thread: tile_start[i] = sum_{j < i} ceil(count_j / tile_m)
//          (AlignTiles of tile_map.h, tested on the host).
// The GEMMs run on a grid of plan.max_m_tiles M tiles (the bound over all
// routings); tiles past tile_start[n] return at once.
#include "cuda/kernels.cuh"

namespace dsmoe::cuda {
namespace {

__global__ void __launch_bounds__(kSortThreads) SortKernel(const bool* active, int N, int n, int* pair_token,
                                                           int* block_count) {
  __shared__ int warp_total[kSortThreads / 32];
  const int i = blockIdx.x;
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  int* out = pair_token + static_cast<int64_t>(i) * N;
  int base = 0;
  for (int t0 = 0; t0 < N; t0 += kSortThreads) {
    const int t = t0 + threadIdx.x;
    const bool a = t < N && active[static_cast<int64_t>(t) * n + i];
    const unsigned mask = __ballot_sync(0xffffffffu, a);
    if (lane == 0) warp_total[warp] = __popc(mask);
    __syncthreads();
    int before = 0, total = 0;
#pragma unroll
    for (int w = 0; w < kSortThreads / 32; ++w) {
      before += w < warp ? warp_total[w] : 0;
      total += warp_total[w];
    }
    if (a) out[base + before + __popc(mask & ((1u << lane) - 1u))] = t;
    base += total;
    __syncthreads();  // warp_total is rewritten by the next chunk
  }
  if (threadIdx.x == 0) block_count[i] = base;
}

__global__ void AlignKernel(const int* block_count, int n, int tile_m, int* tile_start) {
  AlignTiles(block_count, n, tile_m, tile_start);
}

}  // namespace

template <typename T>
cudaError_t LaunchSortAlign(const Params<T>& p, const FfnCudaPlan& plan, cudaStream_t stream) {
  SortKernel<<<Grid(plan.sort), kSortThreads, 0, stream>>>(p.active, p.N, p.n, p.pair_token, p.block_count);
  AlignKernel<<<1, 1, 0, stream>>>(p.block_count, p.n, p.tile_m, p.tile_start);
  return cudaGetLastError();
}

DSMOE_INSTANTIATE_LAUNCHER(LaunchSortAlign)

}  // namespace dsmoe::cuda
