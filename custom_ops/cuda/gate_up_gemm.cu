// Grouped gate/up GEMM (prefill path): for each M tile (up to tile_m active pairs
// of one block i, tokens gathered through pair_token) and each tile of rows j of
// the block, G = X_tile . gate[i, j, :]^T and U = X_tile . up[i, j, :]^T with
// float accumulation, epilogue h = act(G) * U written as T to h[tile rows, j]
// (rows past the block's count and columns in [B, h_ld) are written as 0 so that
// the down GEMM can read whole tiles). The routing coefficient is applied in the
// down GEMM's epilogue (h stays in the range of the dense FFN's intermediate).
//   tensor cores (T = half / bfloat16, d % 8 == 0): 128 x (64 + 64) x 32 tiles,
//     8 warps of 32 x (32 + 32), WMMA 16x16x16, double-buffered cp.async.
//   CUDA cores (float32, or d % 8 != 0): 64 x (64 + 64) x 16 tiles, 4 x 4 per thread.
#include "cuda/gemm_common.cuh"

namespace dsmoe::cuda {
namespace {

template <typename T>
__global__ void __launch_bounds__(kTcThreads) GateUpTcKernel(Params<T> p) {
  constexpr int BM = kTcTileM, BN = kTcGateUpTileN, BK = kTcTileK, LDS = BK + 8;
  constexpr int kStageA = BM * LDS, kStageB = BN * LDS;
  __shared__ __align__(128) T smem[2 * (kStageA + 2 * kStageB)];
  MTile tile;
  if (!CtaMTile(p, tile)) return;
  T* As = smem;
  T* Gs = smem + 2 * kStageA;
  T* Us = Gs + 2 * kStageB;
  const int d = p.d, B = p.B, i = tile.block;
  const int n0 = blockIdx.y * BN;
  const int tid = threadIdx.x;

  // A: 128 rows x 4 chunks of 8 elements = 2 chunks per thread; G, U: 64 x 4 = 1 each.
  const T* a_src[2];
  bool a_ok[2];
  int a_dst[2], a_k[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int c = tid + r * kTcThreads, row = c / 4;
    a_k[r] = (c % 4) * 8;
    a_dst[r] = row * LDS + a_k[r];
    const int tok = PairToken(p, tile, tile.first + row);
    a_ok[r] = tok >= 0;
    a_src[r] = p.x + static_cast<int64_t>(a_ok[r] ? tok : 0) * d + a_k[r];
  }
  const int b_row = tid / 4, b_k = (tid % 4) * 8, b_dst = b_row * LDS + b_k;
  const bool b_ok = n0 + b_row < B;
  const int64_t b_off = (static_cast<int64_t>(i) * B + (b_ok ? n0 + b_row : 0)) * d + b_k;

  auto load_stage = [&](int stage, int k0) {
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const bool ok = a_ok[r] && k0 + a_k[r] < d;
      CpAsync16(As + stage * kStageA + a_dst[r], ok ? a_src[r] + k0 : p.x, ok);
    }
    const bool ok = b_ok && k0 + b_k < d;
    CpAsync16(Gs + stage * kStageB + b_dst, ok ? p.gate + b_off + k0 : p.gate, ok);
    CpAsync16(Us + stage * kStageB + b_dst, ok ? p.up + b_off + k0 : p.up, ok);
    CpAsyncCommit();
  };

  const int warp = tid / 32, lane = tid % 32, wm = warp / 2, wn = warp % 2;
  FragC acc_g[2][2], acc_u[2][2];
#pragma unroll
  for (int a = 0; a < 2; ++a) {
#pragma unroll
    for (int b = 0; b < 2; ++b) {
      wmma::fill_fragment(acc_g[a][b], 0.0f);
      wmma::fill_fragment(acc_u[a][b], 0.0f);
    }
  }
  const int k_tiles = (d + BK - 1) / BK;
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
    const T* as = As + stage * kStageA + wm * 32 * LDS;
    const T* gs = Gs + stage * kStageB + wn * 32 * LDS;
    const T* us = Us + stage * kStageB + wn * 32 * LDS;
#pragma unroll
    for (int kk = 0; kk < BK; kk += 16) {
      FragA<T> a[2];
      FragB<T, wmma::col_major> bg[2], bu[2];
#pragma unroll
      for (int x = 0; x < 2; ++x) {
        wmma::load_matrix_sync(a[x], as + x * 16 * LDS + kk, LDS);
        wmma::load_matrix_sync(bg[x], gs + x * 16 * LDS + kk, LDS);
        wmma::load_matrix_sync(bu[x], us + x * 16 * LDS + kk, LDS);
      }
#pragma unroll
      for (int a_i = 0; a_i < 2; ++a_i) {
#pragma unroll
        for (int b_i = 0; b_i < 2; ++b_i) {
          wmma::mma_sync(acc_g[a_i][b_i], a[a_i], bg[b_i], acc_g[a_i][b_i]);
          wmma::mma_sync(acc_u[a_i][b_i], a[a_i], bu[b_i], acc_u[a_i][b_i]);
        }
      }
    }
    __syncthreads();  // the stage is overwritten by the load two iterations on
  }

  // Epilogue: gate and up fragments have the same element layout, so h is formed
  // element-wise in registers, then staged through 16 x 16 floats per warp.
  float* staged = reinterpret_cast<float*>(smem) + warp * 256;
  const int64_t h_row0 = static_cast<int64_t>(blockIdx.x) * BM;
#pragma unroll
  for (int a_i = 0; a_i < 2; ++a_i) {
#pragma unroll
    for (int b_i = 0; b_i < 2; ++b_i) {
      FragC h;
#pragma unroll
      for (int e = 0; e < h.num_elements; ++e) h.x[e] = Activate(p.act, acc_g[a_i][b_i].x[e]) * acc_u[a_i][b_i].x[e];
      wmma::store_matrix_sync(staged, h, 16, wmma::mem_row_major);
      __syncwarp();
#pragma unroll
      for (int e = lane; e < 256; e += 32) {
        const int r = wm * 32 + a_i * 16 + e / 16, col = n0 + wn * 32 + b_i * 16 + e % 16;
        if (col < p.h_ld) {
          const bool valid = tile.first + r < tile.count;
          p.h[(h_row0 + r) * p.h_ld + col] = FromFloat<T>(valid ? staged[e] : 0.0f);
        }
      }
      __syncwarp();
    }
  }
}

template <typename T>
__global__ void __launch_bounds__(kSimtThreads) GateUpSimtKernel(Params<T> p) {
  constexpr int BM = kSimtTileM, BN = kSimtTileN, BK = kSimtTileK;
  __shared__ float As[BK][BM + 4], Gs[BK][BN + 4], Us[BK][BN + 4];
  MTile tile;
  if (!CtaMTile(p, tile)) return;
  const int d = p.d, B = p.B, i = tile.block, n0 = blockIdx.y * BN;
  const int tid = threadIdx.x, ty = tid / 16, tx = tid % 16;
  // Loads: 64 rows x 16 k = 4 elements per thread for each of A, G, U.
  const T* a_row[4];
  bool a_ok[4];
  int64_t b_off[4];
  bool b_ok[4];
#pragma unroll
  for (int q = 0; q < 4; ++q) {
    const int row = (tid + q * kSimtThreads) / BK;
    const int tok = PairToken(p, tile, tile.first + row);
    a_ok[q] = tok >= 0;
    a_row[q] = p.x + static_cast<int64_t>(a_ok[q] ? tok : 0) * d;
    b_ok[q] = n0 + row < B;
    b_off[q] = (static_cast<int64_t>(i) * B + (b_ok[q] ? n0 + row : 0)) * d;
  }
  float acc_g[4][4] = {}, acc_u[4][4] = {};
  for (int k0 = 0; k0 < d; k0 += BK) {
#pragma unroll
    for (int q = 0; q < 4; ++q) {
      const int e = tid + q * kSimtThreads, row = e / BK, kk = e % BK, k = k0 + kk;
      As[kk][row] = a_ok[q] && k < d ? ToFloat(a_row[q][k]) : 0.0f;
      Gs[kk][row] = b_ok[q] && k < d ? ToFloat(p.gate[b_off[q] + k]) : 0.0f;
      Us[kk][row] = b_ok[q] && k < d ? ToFloat(p.up[b_off[q] + k]) : 0.0f;
    }
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < BK; ++kk) {
      float a[4], g[4], u[4];
#pragma unroll
      for (int x = 0; x < 4; ++x) {
        a[x] = As[kk][ty + 16 * x];
        g[x] = Gs[kk][tx + 16 * x];
        u[x] = Us[kk][tx + 16 * x];
      }
#pragma unroll
      for (int x = 0; x < 4; ++x) {
#pragma unroll
        for (int y = 0; y < 4; ++y) {
          acc_g[x][y] += a[x] * g[y];
          acc_u[x][y] += a[x] * u[y];
        }
      }
    }
    __syncthreads();
  }
  const int64_t h_row0 = static_cast<int64_t>(blockIdx.x) * BM;
#pragma unroll
  for (int x = 0; x < 4; ++x) {
    const int r = ty + 16 * x;
    const bool valid = tile.first + r < tile.count;
#pragma unroll
    for (int y = 0; y < 4; ++y) {
      const int col = n0 + tx + 16 * y;
      if (col < p.h_ld) {
        const float h = valid ? Activate(p.act, acc_g[x][y]) * acc_u[x][y] : 0.0f;
        p.h[(h_row0 + r) * p.h_ld + col] = FromFloat<T>(h);
      }
    }
  }
}

}  // namespace

template <typename T>
cudaError_t LaunchGateUp(const Params<T>& p, const FfnCudaPlan& plan, cudaStream_t stream) {
  if constexpr (kIsHalfType<T>) {
    if (plan.tensor_cores) {
      GateUpTcKernel<T><<<Grid(plan.gate_up), kTcThreads, 0, stream>>>(p);
      return cudaGetLastError();
    }
  }
  GateUpSimtKernel<T><<<Grid(plan.gate_up), kSimtThreads, 0, stream>>>(p);
  return cudaGetLastError();
}

DSMOE_INSTANTIATE_LAUNCHER(LaunchGateUp)

}  // namespace dsmoe::cuda
