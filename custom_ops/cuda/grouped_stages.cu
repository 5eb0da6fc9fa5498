// The CUTLASS path's stages around its two grouped GEMMs (grouped_map.h has the layout):
//   permute:  one warp per permuted row r < row_start[n]: xp[r] = x[token]; pair_row.
//   activate: one warp per row: gu[r, j] = act(gu[r, j]) * gu[r, B + j] (float math).
//   combine:  one thread per 8 columns of a token: Y = sum_i coef[t, i] * xp[pair_row[t, i]]
//             over the active blocks in ascending i (fixed order, float sum, no atomics).
// Rows and columns are moved as 16-byte vectors (the path needs d and B multiples of 8).
#include "cuda/grouped_map.h"
#include "cuda/kernels.cuh"

namespace dsmoe::cuda {
namespace {

constexpr int kRowThreads = kGroupedRowsPerCta * 32;

template <typename T>
__global__ void __launch_bounds__(kRowThreads) PermuteKernel(Params<T> p) {
  const int r = blockIdx.x * kGroupedRowsPerCta + threadIdx.x / 32, lane = threadIdx.x % 32;
  int block = 0, token = 0;
  if (!PermutedRow(p.tile_start, p.pair_token, p.n, p.N, r, block, token)) return;
  const uint4* src = reinterpret_cast<const uint4*>(p.x + static_cast<int64_t>(token) * p.d);
  uint4* dst = reinterpret_cast<uint4*>(p.xp + static_cast<int64_t>(r) * p.d);
  for (int c = lane; c < p.d / kVec<T>; c += 32) dst[c] = __ldg(src + c);
  if (lane == 0) p.pair_row[static_cast<int64_t>(token) * p.n + block] = r;
}

template <typename T>
__global__ void __launch_bounds__(kRowThreads) ActivateKernel(Params<T> p) {
  const int r = blockIdx.x * kGroupedRowsPerCta + threadIdx.x / 32, lane = threadIdx.x % 32;
  if (r >= p.tile_start[p.n]) return;
  constexpr int V = kVec<T>;
  T* row = p.gu + static_cast<int64_t>(r) * 2 * p.B;
  for (int c = lane * V; c < p.B; c += 32 * V) {
    float g[V], u[V];
    LoadVec(row + c, g);
    LoadVec(row + p.B + c, u);
    uint4 out;
    T* o = reinterpret_cast<T*>(&out);
#pragma unroll
    for (int e = 0; e < V; ++e) o[e] = FromFloat<T>(Activate(p.act, g[e]) * u[e]);
    *reinterpret_cast<uint4*>(row + c) = out;
  }
}

template <typename T>
__global__ void __launch_bounds__(kCombineThreads) CombineKernel(Params<T> p) {
  constexpr int V = kVec<T>;
  const int t = blockIdx.x;
  const int c = (blockIdx.y * kCombineThreads + threadIdx.x) * V;
  if (c >= p.d) return;
  float acc[V] = {};
  const int64_t base = static_cast<int64_t>(t) * p.n;
  for (int i = 0; i < p.n; ++i) {
    if (!p.active[base + i]) continue;
    const float w = p.coef[base + i];
    float v[V];
    LoadVec(p.xp + static_cast<int64_t>(p.pair_row[base + i]) * p.d + c, v);
#pragma unroll
    for (int e = 0; e < V; ++e) acc[e] += w * v[e];
  }
  uint4 out;
  T* o = reinterpret_cast<T*>(&out);
#pragma unroll
  for (int e = 0; e < V; ++e) o[e] = FromFloat<T>(acc[e]);
  *reinterpret_cast<uint4*>(p.y + static_cast<int64_t>(t) * p.d + c) = out;
}

}  // namespace

template <typename T>
cudaError_t LaunchPermute(const Params<T>& p, const FfnCudaPlan& plan, cudaStream_t stream) {
  if constexpr (kIsHalfType<T>) {
    PermuteKernel<T><<<Grid(plan.permute), kRowThreads, 0, stream>>>(p);
    return cudaGetLastError();
  }
  return cudaErrorInvalidValue;  // the plan takes this path for float16 / bfloat16 only
}

template <typename T>
cudaError_t LaunchActivate(const Params<T>& p, const FfnCudaPlan& plan, cudaStream_t stream) {
  if constexpr (kIsHalfType<T>) {
    ActivateKernel<T><<<Grid(plan.activate), kRowThreads, 0, stream>>>(p);
    return cudaGetLastError();
  }
  return cudaErrorInvalidValue;
}

template <typename T>
cudaError_t LaunchCombine(const Params<T>& p, const FfnCudaPlan& plan, cudaStream_t stream) {
  if constexpr (kIsHalfType<T>) {
    CombineKernel<T><<<Grid(plan.combine), kCombineThreads, 0, stream>>>(p);
    return cudaGetLastError();
  }
  return cudaErrorInvalidValue;
}

DSMOE_INSTANTIATE_LAUNCHER(LaunchPermute)
DSMOE_INSTANTIATE_LAUNCHER(LaunchActivate)
DSMOE_INSTANTIATE_LAUNCHER(LaunchCombine)

}  // namespace dsmoe::cuda
