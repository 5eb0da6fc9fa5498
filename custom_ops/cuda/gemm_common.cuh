// Pieces shared by the two grouped GEMMs (gate_up_gemm.cu, down_gemm.cu):
// asynchronous copies to shared memory (sm_80+) and the tile of a CTA.
#pragma once

#include <mma.h>

#include "cuda/kernels.cuh"

namespace dsmoe::cuda {

// 16 bytes global -> shared, asynchronous; zero-filled when !valid (src is not read then).
__device__ __forceinline__ void CpAsync16(void* smem, const void* src, bool valid) {
  const unsigned dst = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  const int bytes = valid ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(bytes));
}
__device__ __forceinline__ void CpAsyncCommit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int kPending>
__device__ __forceinline__ void CpAsyncWait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(kPending));
}

// The M tile of this CTA (blockIdx.x): block i, its pairs [first, first + tile_m) of count_i.
struct MTile {
  int block, first, count;
};

template <typename T>
__device__ __forceinline__ bool CtaMTile(const Params<T>& p, MTile& tile) {
  if (!FindTile(p.tile_start, p.n, static_cast<int>(blockIdx.x), p.tile_m, tile.block, tile.first)) return false;
  tile.count = p.block_count[tile.block];
  return true;
}

// Token of pair `slot` of the tile's block, or -1 past the block's count.
template <typename T>
__device__ __forceinline__ int PairToken(const Params<T>& p, const MTile& tile, int slot) {
  return slot < tile.count ? p.pair_token[static_cast<int64_t>(tile.block) * p.N + slot] : -1;
}

// WMMA fragment types with T = __half or __nv_bfloat16 (tensor cores, float accumulation).
namespace wmma = nvcuda::wmma;
template <typename T>
using FragA = wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major>;
template <typename T, typename Layout>
using FragB = wmma::fragment<wmma::matrix_b, 16, 16, 16, T, Layout>;
using FragC = wmma::fragment<wmma::accumulator, 16, 16, 16, float>;

}  // namespace dsmoe::cuda
