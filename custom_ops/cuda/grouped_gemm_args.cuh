// What the CUTLASS grouped GEMMs of the prefill path share, whichever CUTLASS generation
// runs them (grouped_gemm_sm90.cu: 3.x on Hopper; grouped_gemm_sm80.cu: 2.x on Ampere / Ada):
// the element types, the carving of the per-group argument region, and the small kernel that
// writes both GEMMs' per-group arguments from tile_start before the first GEMM.
//
// A GEMM type G provides `G::Args`, `G::Carve(region, groups)` and
// `G::Write(args, g, GroupGemm, a, b, d)` (device).
#pragma once

#include "cuda/grouped_map.h"
#include "cuda/kernels.cuh"

#include "cutlass/numeric_types.h"

namespace dsmoe::cuda::grouped {

template <typename T> struct CutlassElement;
template <> struct CutlassElement<__half> { using type = cutlass::half_t; };
template <> struct CutlassElement<__nv_bfloat16> { using type = cutlass::bfloat16_t; };

// Consecutive arrays of `groups` entries each from an argument region, every array 16-byte
// aligned (a GEMM's Carve takes its arrays in a fixed order; kGroupGemmArgBytes bounds them).
class ArgCarver {
 public:
  __host__ __device__ ArgCarver(void* region, int groups) : at_(static_cast<char*>(region)), groups_(groups) {}
  template <typename U>
  __host__ __device__ U* Take(int64_t bytes_each) {
    char* p = at_;
    at_ += (bytes_each * groups_ + 15) / 16 * 16;
    return reinterpret_cast<U*>(p);
  }

 private:
  char* at_;
  int64_t groups_;
};

// The gate/up GEMM's 2n groups first in the argument region, then the down GEMM's n.
template <typename GateUp>
typename GateUp::Args GateUpArgs(void* region, int n) {
  return GateUp::Carve(region, 2 * n);
}
template <typename Down>
typename Down::Args DownArgs(void* region, int n) {
  return Down::Carve(static_cast<char*>(region) + 2 * n * kGroupGemmArgBytes, n);
}

template <typename T, typename GateUp, typename Down>
__global__ void WriteGroupArgsKernel(Params<T> p, typename GateUp::Args gate_up, typename Down::Args down) {
  for (int g = blockIdx.x * blockDim.x + threadIdx.x; g < 3 * p.n; g += gridDim.x * blockDim.x) {
    if (g < 2 * p.n) {
      const GroupGemm s = GateUpGroup(p.tile_start, g, p.d, p.B);
      GateUp::Write(gate_up, g, s, p.xp, s.up ? p.up : p.gate, p.gu);
    } else {
      const int i = g - 2 * p.n;
      Down::Write(down, i, DownGroup(p.tile_start, i, p.d, p.B), p.gu, p.down, p.xp);
    }
  }
}

// Writes both GEMMs' per-group arguments into p.gemm_args (on the stream, before the gate/up GEMM).
template <typename T, typename GateUp, typename Down>
cudaError_t LaunchWriteGroupArgs(const Params<T>& p, cudaStream_t stream) {
  const int threads = 256, blocks = (3 * p.n + threads - 1) / threads;
  WriteGroupArgsKernel<T, GateUp, Down>
      <<<blocks, threads, 0, stream>>>(p, GateUpArgs<GateUp>(p.gemm_args, p.n), DownArgs<Down>(p.gemm_args, p.n));
  return cudaGetLastError();
}

// Workspace of GEMM 0 (gate/up) or 1 (down): p.gemm_workspace_bytes each (0 where the kernels need none).
template <typename T>
void* GemmWorkspace(const Params<T>& p, int gemm) {
  return static_cast<char*>(p.gemm_workspace) + gemm * p.gemm_workspace_bytes;
}

// The launches of one CUTLASS generation's GEMM pair, G<T>::Run(args, groups, p, workspace, stream):
// the per-group arguments of both, then the gate/up GEMM; the down GEMM after the activation.
template <typename T, template <typename> class GateUp, template <typename> class Down>
cudaError_t LaunchGateUp(const Params<T>& p, cudaStream_t stream) {
  const cudaError_t err = LaunchWriteGroupArgs<T, GateUp<T>, Down<T>>(p, stream);
  if (err != cudaSuccess) return err;
  return GateUp<T>::Run(GateUpArgs<GateUp<T>>(p.gemm_args, p.n), 2 * p.n, p, GemmWorkspace(p, 0), stream);
}
template <typename T, template <typename> class Down>
cudaError_t LaunchDown(const Params<T>& p, cudaStream_t stream) {
  return Down<T>::Run(DownArgs<Down<T>>(p.gemm_args, p.n), p.n, p, GemmWorkspace(p, 1), stream);
}

// A CUTLASS run's status as a CUDA error: the launch's own error when there is one.
inline cudaError_t LaunchStatus(bool ran) {
  const cudaError_t err = cudaGetLastError();
  if (!ran) return err != cudaSuccess ? err : cudaErrorLaunchFailure;
  return err;
}

}  // namespace dsmoe::cuda::grouped
