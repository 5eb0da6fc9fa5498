// Decode path (N <= kDecodeMaxTokens tokens): memory-bound, so every active
// block's rows are streamed once for all the tokens that use it, and inactive
// blocks cost one early-exiting CTA.
//   gate/up GEMV: CTA (block i, 8 rows), one warp per row j: the gate and up rows
//     (16-byte loads along d, past L1) against the x of each token that uses
//     block i; h[t, i, j] = act(gate . x) * (up . x) * coef[t, i] (float).
//   down GEMV: CTA (block i, decode_down_rows rows, decode_cols columns): each
//     warp takes rows j, each lane 16 bytes of columns of down_weight[i, j, :],
//     accumulating h[t, i, j] * down[i, j, c] per token in registers; the warps
//     are summed in shared memory and added (float atomics) to acc[t, c].
// Only active (token, block) pairs are computed: no NaN/inf of an inactive
// block can reach Y.
// Both kernels are instantiated per token bucket M (1, 2, 4, 8 >= N): per-token
// accumulators are registers, and sizing them for 8 tokens at N = 1 cut the down
// kernel's occupancy to where it streamed 0.4-0.6 TB/s on an H200 (docs/cuda.md).
#include "cuda/kernels.cuh"

namespace dsmoe::cuda {
namespace {

constexpr int kMaxTok = static_cast<int>(kDecodeMaxTokens);
constexpr int kWarps = kDecodeThreads / 32;
constexpr int kMaxDownRows = 128;

// The tokens that use block i (ascending), in shared memory; returns their count.
template <typename T>
__device__ __forceinline__ int BlockTokens(const Params<T>& p, int i, int* tokens) {
  __shared__ int count;
  if (threadIdx.x == 0) {
    int m = 0;
    for (int t = 0; t < p.N; ++t) {
      if (p.active[static_cast<int64_t>(t) * p.n + i]) tokens[m++] = t;
    }
    count = m;
  }
  __syncthreads();
  return count;
}

template <typename T, int M>
__global__ void __launch_bounds__(kDecodeThreads) DecodeGateUpKernel(Params<T> p) {
  __shared__ int tokens[kMaxTok];
  const int row_tiles = (p.B + kDecodeGateUpRows - 1) / kDecodeGateUpRows;
  const int i = blockIdx.x / row_tiles;
  const int m = BlockTokens(p, i, tokens);
  if (m == 0) return;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int j = (blockIdx.x % row_tiles) * kDecodeGateUpRows + warp;
  if (j >= p.B) return;
  const int d = p.d;
  const int64_t offset = (static_cast<int64_t>(i) * p.B + j) * d;
  const T* g = p.gate + offset;
  const T* u = p.up + offset;
  const T* xs[M];
#pragma unroll
  for (int q = 0; q < M; ++q) xs[q] = p.x + static_cast<int64_t>(tokens[q < m ? q : 0]) * d;
  float ag[M] = {}, au[M] = {};
  if (p.vec) {
    constexpr int V = kVec<T>;
    constexpr int kBatch = 4;  // 16-byte loads of gate and up in flight per lane, per step
    for (int c0 = lane * V; c0 < d; c0 += kBatch * 32 * V) {
      uint4 graw[kBatch], uraw[kBatch];
#pragma unroll
      for (int b = 0; b < kBatch; ++b) {
        const int c = c0 + b * 32 * V;
        if (c < d) {
          graw[b] = LoadRawStreaming(g + c);
          uraw[b] = LoadRawStreaming(u + c);
        }
      }
#pragma unroll
      for (int b = 0; b < kBatch; ++b) {
        const int c = c0 + b * 32 * V;
        if (c < d) {
          float gv[V], uv[V];
          ToFloats<T>(graw[b], gv);
          ToFloats<T>(uraw[b], uv);
#pragma unroll
          for (int q = 0; q < M; ++q) {
            if (q < m) {
              float xv[V];
              LoadVec(xs[q] + c, xv);
#pragma unroll
              for (int v = 0; v < V; ++v) {
                ag[q] += gv[v] * xv[v];
                au[q] += uv[v] * xv[v];
              }
            }
          }
        }
      }
    }
  } else {
    for (int c = lane; c < d; c += 32) {
      const float gv = ToFloat(g[c]), uv = ToFloat(u[c]);
#pragma unroll
      for (int q = 0; q < M; ++q) {
        if (q < m) {
          const float xv = ToFloat(xs[q][c]);
          ag[q] += gv * xv;
          au[q] += uv * xv;
        }
      }
    }
  }
#pragma unroll
  for (int q = 0; q < M; ++q) {
    if (q < m) {  // m is uniform over the CTA: whole warps take the branch
      const float G = WarpSum(ag[q]), U = WarpSum(au[q]);
      if (lane == 0) {
        const int64_t pair = static_cast<int64_t>(tokens[q]) * p.n + i;
        p.h_decode[pair * p.B + j] = Activate(p.act, G) * U * p.coef[pair];
      }
    }
  }
}

// At least 2 CTAs (16 warps) per SM (up to 2 tokens need no bound: 64-80 registers): 8
// warps per SM (172 registers at 8 tokens) could not keep enough loads in flight.
template <typename T, int M>
__global__ void __launch_bounds__(kDecodeThreads, M <= 2 ? 1 : 2) DecodeDownKernel(Params<T> p) {
  constexpr int V = kVec<T>;
  constexpr int kCols = 32 * V;  // == p.decode_cols
  __shared__ int tokens[kMaxTok];
  __shared__ float hs[kMaxTok][kMaxDownRows];
  __shared__ float partial[kWarps][kCols];
  const int d = p.d, rows_per_cta = p.decode_down_rows;
  const int col_tiles = (d + kCols - 1) / kCols;
  const int row_tiles = (p.B + rows_per_cta - 1) / rows_per_cta;
  int b = blockIdx.x;
  const int ct = b % col_tiles;
  b /= col_tiles;
  const int j0 = (b % row_tiles) * rows_per_cta;
  const int i = b / row_tiles;
  const int m = BlockTokens(p, i, tokens);
  if (m == 0) return;
  const int rows = min(rows_per_cta, p.B - j0);
  for (int e = threadIdx.x; e < m * rows_per_cta; e += blockDim.x) {
    const int q = e / rows_per_cta, r = e % rows_per_cta;
    hs[q][r] = r < rows ? p.h_decode[(static_cast<int64_t>(tokens[q]) * p.n + i) * p.B + j0 + r] : 0.0f;
  }
  __syncthreads();

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int c0 = ct * kCols;
  // Column of element v of this lane: contiguous 16 bytes (vector loads) or strided by 32.
  auto local_col = [&](int v) { return p.vec ? lane * V + v : v * 32 + lane; };
  float acc[M][V] = {};
  if (p.vec) {
    // kBatch rows' 16-byte loads in flight per lane before any is used.
    constexpr int kBatch = 8;
    const bool in_cols = c0 + lane * V < d;  // d % V == 0: a vector is wholly inside or outside
    for (int r0 = warp; r0 < rows; r0 += kBatch * kWarps) {
      uint4 raw[kBatch];
#pragma unroll
      for (int b = 0; b < kBatch; ++b) {
        const int r = r0 + b * kWarps;
        raw[b] = r < rows && in_cols ? LoadRawStreaming(p.down + DownIndex(p, i, j0 + r, c0 + lane * V))
                                     : make_uint4(0, 0, 0, 0);
      }
#pragma unroll
      for (int b = 0; b < kBatch; ++b) {
        const int r = r0 + b * kWarps;
        if (r < rows) {
          float wv[V];
          ToFloats<T>(raw[b], wv);
#pragma unroll
          for (int q = 0; q < M; ++q) {
            if (q < m) {
              const float hq = hs[q][r];
#pragma unroll
              for (int v = 0; v < V; ++v) acc[q][v] += hq * wv[v];
            }
          }
        }
      }
    }
  } else {
    for (int r = warp; r < rows; r += kWarps) {
      float wv[V];
#pragma unroll
      for (int v = 0; v < V; ++v) {
        const int c = c0 + v * 32 + lane;
        wv[v] = c < d ? ToFloat(p.down[DownIndex(p, i, j0 + r, c)]) : 0.0f;
      }
#pragma unroll
      for (int q = 0; q < M; ++q) {
        if (q < m) {
          const float hq = hs[q][r];
#pragma unroll
          for (int v = 0; v < V; ++v) acc[q][v] += hq * wv[v];
        }
      }
    }
  }
#pragma unroll
  for (int q = 0; q < M; ++q) {
    if (q < m) {  // uniform over the CTA
#pragma unroll
      for (int v = 0; v < V; ++v) partial[warp][local_col(v)] = acc[q][v];
      __syncthreads();
      float* out = p.acc + static_cast<int64_t>(tokens[q]) * d;
      for (int cc = threadIdx.x; cc < kCols; cc += blockDim.x) {
        float s = 0.0f;
#pragma unroll
        for (int w = 0; w < kWarps; ++w) s += partial[w][cc];
        if (c0 + cc < d) atomicAdd(out + c0 + cc, s);
      }
      __syncthreads();
    }
  }
}

template <typename T, int M>
void LaunchDecodeKernels(const Params<T>& p, const FfnCudaPlan& plan, cudaStream_t stream) {
  DecodeGateUpKernel<T, M><<<Grid(plan.decode_gate_up), kDecodeThreads, 0, stream>>>(p);
  DecodeDownKernel<T, M><<<Grid(plan.decode_down), kDecodeThreads, 0, stream>>>(p);
}

}  // namespace

template <typename T>
cudaError_t LaunchDecode(const Params<T>& p, const FfnCudaPlan& plan, cudaStream_t stream) {
  if (plan.decode_cols != 32 * kVec<T> || plan.decode_down_rows > kMaxDownRows) return cudaErrorInvalidValue;
  if (p.N <= 1) {
    LaunchDecodeKernels<T, 1>(p, plan, stream);
  } else if (p.N <= 2) {
    LaunchDecodeKernels<T, 2>(p, plan, stream);
  } else if (p.N <= 4) {
    LaunchDecodeKernels<T, 4>(p, plan, stream);
  } else {
    static_assert(kMaxTok == 8, "token buckets 1, 2, 4, 8");
    LaunchDecodeKernels<T, kMaxTok>(p, plan, stream);
  }
  return cudaGetLastError();
}

DSMOE_INSTANTIATE_LAUNCHER(LaunchDecode)

}  // namespace dsmoe::cuda
