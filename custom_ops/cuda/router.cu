// Router stage (docs/op-spec.md "Semantics"): one CTA per token.
//   s_i = sigmoid(x . router_weight[i] + router_bias[i])   (float32 accumulation)
//   active_i = s_i > threshold; k = sum active_i; c = n / k (rescale, k > 0) else 1
//   coef[t, i] = active_i ? (score: s_i, binary: 1) * c : 0
// and the token's row of the float accumulator is zeroed (a k = 0 token stays
// exactly 0: nothing is ever added to it).
#include "cuda/kernels.cuh"

namespace dsmoe::cuda {
namespace {

template <typename T>
__global__ void __launch_bounds__(kRouterThreads) RouterKernel(Params<T> p) {
  extern __shared__ float gate_weight[];  // [n]: logit, then g_i (-1: inactive)
  __shared__ int k_shared;
  const int t = blockIdx.x;
  const int d = p.d, n = p.n;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, warps = blockDim.x / 32;
  const T* xt = p.x + static_cast<int64_t>(t) * d;
  for (int i = warp; i < n; i += warps) {
    const T* w = p.router + static_cast<int64_t>(i) * d;
    float s = 0.0f;
    for (int c = lane; c < d; c += 32) s += ToFloat(xt[c]) * ToFloat(w[c]);
    s = WarpSum(s);
    if (lane == 0) gate_weight[i] = s + (p.bias != nullptr ? ToFloat(p.bias[i]) : 0.0f);
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
