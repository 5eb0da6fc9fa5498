// The CUDA forward pass of org.dsmoe::GatedBlockSparseFFN on device buffers,
// independent of ONNX Runtime: the op kernel (ffn_cuda.cc) and the test harness
// (harness.cc) both call it. Plain C++ header (no CUDA headers).
#pragma once

#include <cstdint>
#include <string>

#include "cuda/plan.h"

namespace dsmoe::cuda {

enum class Act : int { kSilu = 0, kGelu = 1, kGeluTanh = 2 };

struct FfnCudaArgs {
  FfnCudaShape shape;
  // Device pointers of shape.dtype (bias may be null; active may be null).
  const void* x = nullptr;       // [N, d]
  const void* router = nullptr;  // [n, d]
  const void* bias = nullptr;    // [n]
  const void* gate = nullptr;    // [n, B, d]
  const void* up = nullptr;      // [n, B, d]
  const void* down = nullptr;    // [n, B, d], or [n, ceil(d / 64), B, 64] when down_tiled
  void* y = nullptr;             // [N, d]
  bool* active = nullptr;        // [N, n]
  float threshold = 0.5f;
  bool rescale = true;
  bool binary_weighting = false;
  Act activation = Act::kSilu;
  bool down_tiled = false;       // op attribute down_tile = 64 (docs/op-spec.md)
  void* scratch = nullptr;       // plan.scratch.bytes bytes of device memory, 256-byte aligned
  void* stream = nullptr;        // cudaStream_t
};

// Enqueues the kernels of `plan` (made by MakePlan for args.shape) on args.stream:
// no synchronisation, no allocation. Returns "" or the CUDA error of a launch.
std::string FfnCudaForward(const FfnCudaArgs& args, const FfnCudaPlan& plan);

// The current device as the plan of an op with `blocks` blocks needs it (arch, SM count,
// whether the CUTLASS path is built and allowed here, its GEMM workspace). "" or the CUDA error.
std::string DescribeDevice(CudaDevice& device, int64_t blocks, CutlassChoice cutlass = CutlassChoice::kAuto);

// cudaGetDeviceCount through this library's (static) CUDA runtime: "" and the count,
// or the error (e.g. no driver: the library loads and reports it, it does not crash).
std::string CudaDeviceCount(int& count);

}  // namespace dsmoe::cuda
