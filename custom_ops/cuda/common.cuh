// Device helpers shared by the CUDA kernels of org.dsmoe::GatedBlockSparseFFN:
// element types, activations, vector loads, the per-call parameters.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

#include "cuda/forward.h"
#include "cuda/tile_map.h"

namespace dsmoe::cuda {

// Everything a kernel needs, by value (device pointers into the inputs, outputs and scratch).
template <typename T>
struct Params {
  const T* x;
  const T* router;
  const T* bias;  // or nullptr
  const T* gate;
  const T* up;
  const T* down;
  T* y;
  bool* active;   // or nullptr
  float* coef;    // [N, n]
  float* acc;     // [N, d] float accumulator (== y for float32)
  float* h_decode;
  int* pair_token;
  int* block_count;
  int* tile_start;
  T* h;
  // CUTLASS path (grouped_map.h; tile_start holds row_start there)
  int* pair_row;          // [N, n]
  T* xp;                  // [N * n, d]
  T* gu;                  // [N * n, 2B]
  void* gemm_args;        // 3n x kGroupGemmArgBytes
  void* gemm_workspace;   // 2 x gemm_workspace_bytes
  int64_t gemm_workspace_bytes;
  int device, sm_count;
  int N, d, n, B;
  int h_ld;
  int tile_m;
  float threshold;
  bool rescale, binary;
  Act act;
  int decode_down_rows, decode_cols;
  bool vec;  // 16-byte loads along d
  bool down_tiled;  // down in [n, ceil(d / 64), B, 64] column tiles
};

// Index of down_weight[i][j][c] (block i, row j < B, column c < d) in either layout
// (op-spec "down_tile"). A 16-byte vector at a column that is a multiple of its
// width stays inside one 64-column tile.
template <typename T>
__device__ __forceinline__ int64_t DownIndex(const Params<T>& p, int i, int j, int c) {
  if (!p.down_tiled) return (static_cast<int64_t>(i) * p.B + j) * p.d + c;
  const int tiles = (p.d + 63) / 64;
  return ((static_cast<int64_t>(i) * tiles + c / 64) * p.B + j) * 64 + c % 64;
}

template <typename T> __device__ __forceinline__ float ToFloat(T v);
template <> __device__ __forceinline__ float ToFloat<float>(float v) { return v; }
template <> __device__ __forceinline__ float ToFloat<__half>(__half v) { return __half2float(v); }
template <> __device__ __forceinline__ float ToFloat<__nv_bfloat16>(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T> __device__ __forceinline__ T FromFloat(float v);
template <> __device__ __forceinline__ float FromFloat<float>(float v) { return v; }
template <> __device__ __forceinline__ __half FromFloat<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 FromFloat<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

// float16 / bfloat16 (tensor-core types) as opposed to float32.
template <typename T>
constexpr bool kIsHalfType = !std::is_same<T, float>::value;

// Elements per 16-byte vector.
template <typename T> constexpr int kVec = 16 / sizeof(T);

// 16 bytes = kVec<T> elements, as floats.
template <typename T>
__device__ __forceinline__ void LoadVec(const T* p, float (&out)[kVec<T>]) {
  const uint4 raw = __ldg(reinterpret_cast<const uint4*>(p));
  const T* e = reinterpret_cast<const T*>(&raw);
#pragma unroll
  for (int i = 0; i < kVec<T>; ++i) out[i] = ToFloat(e[i]);
}

// Weights are read once per call: stream them past L1 (ld.global.nc.L1::no_allocate).
// Raw, so that callers batching many loads keep 4 registers per load in flight (not 8
// floats); ToFloats converts at use.
__device__ __forceinline__ uint4 LoadRawStreaming(const void* p) {
  uint4 raw;
  asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];"
               : "=r"(raw.x), "=r"(raw.y), "=r"(raw.z), "=r"(raw.w)
               : "l"(p));
  return raw;
}

template <typename T>
__device__ __forceinline__ void ToFloats(const uint4& raw, float (&out)[kVec<T>]) {
  const T* e = reinterpret_cast<const T*>(&raw);
#pragma unroll
  for (int i = 0; i < kVec<T>; ++i) out[i] = ToFloat(e[i]);
}

__device__ __forceinline__ float Sigmoid(float z) { return 1.0f / (1.0f + expf(-z)); }

// act(g) per docs/op-spec.md: silu, gelu (erf), gelu_tanh.
__device__ __forceinline__ float Activate(Act act, float z) {
  switch (act) {
    case Act::kGelu:
      return 0.5f * z * (1.0f + erff(z * 0.70710678118654752f));
    case Act::kGeluTanh:
      return 0.5f * z * (1.0f + tanhf(0.79788456080286536f * (z + 0.044715f * z * z * z)));
    case Act::kSilu:
    default:
      return z / (1.0f + expf(-z));
  }
}

__device__ __forceinline__ float WarpSum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

}  // namespace dsmoe::cuda
