// Router stage (docs/op-spec.md "Semantics"): one CTA per token.
//   s_i = sigmoid(x . router_weight[i] + router_bias[i])   (float32 accumulation)
//   active_i = s_i > threshold; k = sum active_i; c = n / k (rescale, k > 0) else 1
//   coef[t, i] = active_i ? (score: s_i, binary: 1) * c : 0
// and the token's row of the float accumulator is zeroed (a k = 0 token stays
// exactly 0: nothing is ever added to it).
#include "cuda/kernels.cuh"

namespace dsmoe::cuda {
namespace {

// Logits are summed in a fixed order (lanes, then warps in shared memory): the same
// inputs give the same active set on every run. kRouterGroup blocks per pass, so that
// their weight loads are in flight together: a decode call is a chain of dependent
// kernels, and a pass over one block at a time (scalar loads) was its longest link.
constexpr int kRouterGroup = 4;

template <typename T>
__global__ void __launch_bounds__(kRouterThreads) RouterKernel(Params<T> p) {
  extern __shared__ float gate_weight[];  // [n]: logit, then g_i (-1: inactive)
  __shared__ float warp_part[kRouterThreads / 32][kRouterGroup];
  __shared__ int k_shared;
  const int t = blockIdx.x;
  const int d = p.d, n = p.n;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const T* xt = p.x + static_cast<int64_t>(t) * d;
  for (int i0 = 0; i0 < n; i0 += kRouterGroup) {
    float s[kRouterGroup] = {};
    const T* w = p.router + static_cast<int64_t>(i0) * d;
    if (p.vec) {
      constexpr int V = kVec<T>;
      for (int c = threadIdx.x * V; c < d; c += kRouterThreads * V) {
        float xv[V];
        LoadVec(xt + c, xv);
#pragma unroll
        for (int g = 0; g < kRouterGroup; ++g) {
          if (i0 + g < n) {
            float wv[V];
            LoadVec(w + static_cast<int64_t>(g) * d + c, wv);
#pragma unroll
            for (int v = 0; v < V; ++v) s[g] += xv[v] * wv[v];
          }
        }
      }
    } else {
      for (int c = threadIdx.x; c < d; c += kRouterThreads) {
        const float xv = ToFloat(xt[c]);
#pragma unroll
        for (int g = 0; g < kRouterGroup; ++g) {
          if (i0 + g < n) s[g] += xv * ToFloat(w[static_cast<int64_t>(g) * d + c]);
        }
      }
    }
#pragma unroll
    for (int g = 0; g < kRouterGroup; ++g) {
      const float r = WarpSum(s[g]);
      if (lane == 0) warp_part[warp][g] = r;
    }
    __syncthreads();
    if (threadIdx.x < kRouterGroup && i0 + threadIdx.x < n) {
      float z = 0.0f;
#pragma unroll
      for (int q = 0; q < kRouterThreads / 32; ++q) z += warp_part[q][threadIdx.x];
      gate_weight[i0 + threadIdx.x] = z + (p.bias != nullptr ? ToFloat(p.bias[i0 + threadIdx.x]) : 0.0f);
    }
    __syncthreads();
  }
  if (threadIdx.x == 0) k_shared = 0;
  __syncthreads();
  int local = 0;
  for (int i = threadIdx.x; i < n; i += blockDim.x) {
    const float s = Sigmoid(gate_weight[i]);
    const bool a = s > p.threshold;  // false for a NaN logit
    local += a;
    gate_weight[i] = a ? (p.binary ? 1.0f : s) : -1.0f;
  }
  if (local != 0) atomicAdd(&k_shared, local);
  __syncthreads();
  const int k = k_shared;
  const float c = p.rescale && k > 0 ? static_cast<float>(n) / static_cast<float>(k) : 1.0f;
  const int64_t row = static_cast<int64_t>(t) * n;
  for (int i = threadIdx.x; i < n; i += blockDim.x) {
    const float g = gate_weight[i];
    const bool a = g >= 0.0f;
    p.coef[row + i] = a ? g * c : 0.0f;
    p.active[row + i] = a;
  }
  if (p.acc == nullptr) return;  // CUTLASS path: the combine writes every row of Y
  float* acc = p.acc + static_cast<int64_t>(t) * d;
  for (int j = threadIdx.x; j < d; j += blockDim.x) acc[j] = 0.0f;
}

}  // namespace

template <typename T>
cudaError_t LaunchRouter(const Params<T>& p, const FfnCudaPlan& plan, cudaStream_t stream) {
  const size_t smem = static_cast<size_t>(p.n) * sizeof(float);
  if (smem > 48 * 1024) return cudaErrorInvalidConfiguration;  // n > 12288 blocks
  RouterKernel<T><<<Grid(plan.router), kRouterThreads, smem, stream>>>(p);
  return cudaGetLastError();
}

DSMOE_INSTANTIATE_LAUNCHER(LaunchRouter)

}  // namespace dsmoe::cuda
