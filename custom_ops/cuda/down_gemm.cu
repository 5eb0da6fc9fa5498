// Grouped down GEMM (prefill path): for each M tile of block i (rows of h written
// by the gate/up GEMM at rows tile * tile_m + r) and each tile of output columns,
// R = h_tile . down_weight[i] (K = B, float accumulation); epilogue:
// acc[token, c] += coef[token, i] * R[r, c] with float atomics (16-byte ones on sm_90
// for the tensor-core kernel; a token's k active blocks land in its row in any order:
// results can differ between runs by float rounding of that sum, never by more).
// Idle CTAs (tile >= tile_start[n]) return.
//   tensor cores: 128 x 128 x 32 tiles, 8 warps of 32 x 64, WMMA, double-buffered cp.async.
//   CUDA cores:   64 x 64 x 16 tiles, 4 x 4 per thread.
#include "cuda/gemm_common.cuh"

namespace dsmoe::cuda {
namespace {

template <typename T>
__device__ __forceinline__ void AddOutput(const Params<T>& p, const MTile& tile, int r, int col, float v) {
  const int tok = PairToken(p, tile, tile.first + r);
  if (tok >= 0 && col < p.d) {
    const int64_t t = tok;
    atomicAdd(p.acc + t * p.d + col, v * p.coef[t * p.n + tile.block]);
  }
}

// Four consecutive columns of one row: the token and its coefficient looked up once, and
// on sm_90 one 16-byte atomic (the profile of 4096 tokens, k = 8, put this kernel at 5x
// cuBLAS's down GEMM, with 134M scalar atomics and two lookups per element).
template <typename T>
__device__ __forceinline__ void AddOutput4(const Params<T>& p, const MTile& tile, int r, int col, const float* v) {
  const int tok = PairToken(p, tile, tile.first + r);
  if (tok < 0) return;
  const int64_t t = tok;
  const float c = p.coef[t * p.n + tile.block];
  float* out = p.acc + t * p.d + col;
#if __CUDA_ARCH__ >= 900
  if (col + 3 < p.d && reinterpret_cast<uintptr_t>(out) % 16 == 0) {
    atomicAdd(reinterpret_cast<float4*>(out), make_float4(v[0] * c, v[1] * c, v[2] * c, v[3] * c));
    return;
  }
#endif
#pragma unroll
  for (int e = 0; e < 4; ++e) {
    if (col + e < p.d) atomicAdd(out + e, v[e] * c);
  }
}

template <typename T>
__global__ void __launch_bounds__(kTcThreads) DownTcKernel(Params<T> p) {
  constexpr int BM = kTcTileM, BN = kTcDownTileN, BK = kTcTileK, LDA = BK + 8, LDB = BN + 8;
  constexpr int kStageA = BM * LDA, kStageB = BK * LDB;
  __shared__ __align__(128) T smem[2 * (kStageA + kStageB)];
  MTile tile;
  if (!CtaMTile(p, tile)) return;
  T* As = smem;
  T* Bs = smem + 2 * kStageA;
  const int d = p.d, B = p.B, i = tile.block;
  const int n0 = blockIdx.y * BN;
  const int tid = threadIdx.x;
  const T* h0 = p.h + static_cast<int64_t>(blockIdx.x) * BM * p.h_ld;

  // A (h): 128 rows x 4 chunks; B (down rows): 32 rows x 16 chunks. 2 + 2 chunks per thread.
  int a_row[2], a_k[2], b_k[2], b_col[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int c = tid + r * kTcThreads;
    a_row[r] = c / 4;
    a_k[r] = (c % 4) * 8;
    b_k[r] = c / 16;
    b_col[r] = (c % 16) * 8;
  }
  auto load_stage = [&](int stage, int k0) {
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const bool a_ok = k0 + a_k[r] < p.h_ld;
      CpAsync16(As + stage * kStageA + a_row[r] * LDA + a_k[r],
                a_ok ? h0 + static_cast<int64_t>(a_row[r]) * p.h_ld + k0 + a_k[r] : p.h, a_ok);
      const int k = k0 + b_k[r], col = n0 + b_col[r];
      const bool b_ok = k < B && col < d;
      CpAsync16(Bs + stage * kStageB + b_k[r] * LDB + b_col[r], b_ok ? p.down + DownIndex(p, i, k, col) : p.down,
                b_ok);
    }
    CpAsyncCommit();
  };

  const int warp = tid / 32, lane = tid % 32, wm = warp / 2, wn = warp % 2;
  FragC acc[2][4];
#pragma unroll
  for (int a = 0; a < 2; ++a) {
#pragma unroll
    for (int b = 0; b < 4; ++b) wmma::fill_fragment(acc[a][b], 0.0f);
  }
  const int k_tiles = (B + BK - 1) / BK;
  load_stage(0, 0);
  for (int kt = 0; kt < k_tiles; ++kt) {
    const int stage = kt & 1;
    if (kt + 1 < k_tiles) {
      load_stage(stage ^ 1, (kt + 1) * BK);
      CpAsyncWait<1>();
    } else {
      CpAsyncWait<0>();
    }
    __syncthreads();
    const T* as = As + stage * kStageA + wm * 32 * LDA;
    const T* bs = Bs + stage * kStageB + wn * 64;
#pragma unroll
    for (int kk = 0; kk < BK; kk += 16) {
      FragA<T> a[2];
      FragB<T, wmma::row_major> b[4];
#pragma unroll
      for (int x = 0; x < 2; ++x) wmma::load_matrix_sync(a[x], as + x * 16 * LDA + kk, LDA);
#pragma unroll
      for (int y = 0; y < 4; ++y) wmma::load_matrix_sync(b[y], bs + kk * LDB + y * 16, LDB);
#pragma unroll
      for (int x = 0; x < 2; ++x) {
#pragma unroll
        for (int y = 0; y < 4; ++y) wmma::mma_sync(acc[x][y], a[x], b[y], acc[x][y]);
      }
    }
    __syncthreads();
  }

  float* staged = reinterpret_cast<float*>(smem) + warp * 256;
#pragma unroll
  for (int x = 0; x < 2; ++x) {
#pragma unroll
    for (int y = 0; y < 4; ++y) {
      wmma::store_matrix_sync(staged, acc[x][y], 16, wmma::mem_row_major);
      __syncwarp();
#pragma unroll
      for (int q = lane; q < 64; q += 32) {  // 16 rows x 4 groups of 4 columns
        const int rr = q / 4, cc = (q % 4) * 4;
        AddOutput4(p, tile, wm * 32 + x * 16 + rr, n0 + wn * 64 + y * 16 + cc, staged + rr * 16 + cc);
      }
      __syncwarp();
    }
  }
}

template <typename T>
__global__ void __launch_bounds__(kSimtThreads) DownSimtKernel(Params<T> p) {
  constexpr int BM = kSimtTileM, BN = kSimtTileN, BK = kSimtTileK;
  __shared__ float As[BK][BM + 4], Bs[BK][BN + 4];
  MTile tile;
  if (!CtaMTile(p, tile)) return;
  const int d = p.d, B = p.B, i = tile.block, n0 = blockIdx.y * BN;
  const int tid = threadIdx.x, ty = tid / 16, tx = tid % 16;
  const T* h0 = p.h + static_cast<int64_t>(blockIdx.x) * BM * p.h_ld;
  float acc[4][4] = {};
  for (int k0 = 0; k0 < B; k0 += BK) {
#pragma unroll
    for (int q = 0; q < 4; ++q) {
      const int e = tid + q * kSimtThreads;
      const int row = e / BK, kk = e % BK;  // A: h[row, k0 + kk]
      As[kk][row] = k0 + kk < B ? ToFloat(h0[static_cast<int64_t>(row) * p.h_ld + k0 + kk]) : 0.0f;
      const int bk = e / BN, col = e % BN;  // B: down[i, k0 + bk, n0 + col]
      Bs[bk][col] = k0 + bk < B && n0 + col < d ? ToFloat(p.down[DownIndex(p, i, k0 + bk, n0 + col)]) : 0.0f;
    }
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < BK; ++kk) {
      float a[4], b[4];
#pragma unroll
      for (int x = 0; x < 4; ++x) {
        a[x] = As[kk][ty + 16 * x];
        b[x] = Bs[kk][tx + 16 * x];
      }
#pragma unroll
      for (int x = 0; x < 4; ++x) {
#pragma unroll
        for (int y = 0; y < 4; ++y) acc[x][y] += a[x] * b[y];
      }
    }
    __syncthreads();
  }
#pragma unroll
  for (int x = 0; x < 4; ++x) {
#pragma unroll
    for (int y = 0; y < 4; ++y) AddOutput(p, tile, ty + 16 * x, n0 + tx + 16 * y, acc[x][y]);
  }
}

}  // namespace

template <typename T>
cudaError_t LaunchDown(const Params<T>& p, const FfnCudaPlan& plan, cudaStream_t stream) {
  if constexpr (kIsHalfType<T>) {
    if (plan.tensor_cores) {
      DownTcKernel<T><<<Grid(plan.down), kTcThreads, 0, stream>>>(p);
      return cudaGetLastError();
    }
  }
  DownSimtKernel<T><<<Grid(plan.down), kSimtThreads, 0, stream>>>(p);
  return cudaGetLastError();
}

DSMOE_INSTANTIATE_LAUNCHER(LaunchDown)

}  // namespace dsmoe::cuda
