// Test-only C entry points of the CUDA forward pass (libdsmoe_cuda_harness.so; not
// installed, not loaded by ONNX Runtime): scripts/gpu_check.sh and
// tests/test_op_cuda.py call the kernels on torch device buffers through ctypes,
// which checks them without onnxruntime-gpu. Same code path as the op kernel
// (ffn_cuda.cc) from MakePlan on.
#include <cstdint>
#include <cstring>
#include <string>

#include "cuda/forward.h"
#include "cuda/plan.h"

#define DSMOE_HARNESS_API extern "C" __attribute__((visibility("default")))

namespace {

int Fail(const std::string& message, char* error, int error_len) {
  if (error != nullptr && error_len > 0) {
    std::strncpy(error, message.c_str(), static_cast<size_t>(error_len - 1));
    error[error_len - 1] = '\0';
  }
  return 1;
}

bool Aligned16(const void* p) { return p == nullptr || reinterpret_cast<uintptr_t>(p) % 16 == 0; }

// Number of CUDA devices; 1 with the CUDA error in `error` when there is no usable driver.
DSMOE_HARNESS_API int dsmoe_cuda_device_count(int* count, char* error, int error_len) {
  const std::string e = dsmoe::cuda::CudaDeviceCount(*count);
  return e.empty() ? 0 : Fail(e, error, error_len);
}

// The shape of a call on the current device (16-byte aligned buffers); "" or the error.
std::string Shape(int64_t tokens, int64_t hidden, int64_t blocks, int64_t block_size, int dtype, int down_tile,
                  int cutlass, dsmoe::cuda::FfnCudaShape& shape) {
  shape = {tokens, hidden, blocks, block_size, static_cast<dsmoe::cuda::DType>(dtype), true};
  shape.down_tiled = down_tile != 0;
  return dsmoe::cuda::DescribeDevice(shape.device, blocks, static_cast<dsmoe::cuda::CutlassChoice>(cutlass));
}

}  // namespace

// Scratch bytes of one call (the plan for 16-byte aligned buffers), or -1 with the error.
// cutlass: 0 the WMMA grouped GEMMs, 1 the CUTLASS ones for this device, 2 CUTLASS 2.x's sm_80
// kernels on any arch >= 80 (CutlassChoice).
DSMOE_HARNESS_API int64_t dsmoe_cuda_scratch_bytes(int64_t tokens, int64_t hidden, int64_t blocks,
                                                  int64_t block_size, int dtype, int down_tile, int cutlass,
                                                  char* error, int error_len) {
  dsmoe::cuda::FfnCudaShape shape;
  dsmoe::cuda::FfnCudaPlan plan;
  std::string e = Shape(tokens, hidden, blocks, block_size, dtype, down_tile, cutlass, shape);
  if (!e.empty() || !dsmoe::cuda::MakePlan(shape, plan, e)) return Fail(e, error, error_len), -1;
  return plan.scratch.bytes;
}

// Y = GatedBlockSparseFFN(...) on device pointers (dtype 0 float32, 1 float16, 2 bfloat16;
// activation 0 silu, 1 gelu, 2 gelu_tanh; down_tile 0 or 64, down's layout as the op
// attribute), enqueued on `stream` (a cudaStream_t, e.g.
// torch.cuda.current_stream().cuda_stream). 0, or 1 with the error.
DSMOE_HARNESS_API int dsmoe_cuda_forward(int dtype, const void* x, const void* router, const void* bias,
                                         const void* gate, const void* up, const void* down, void* y, bool* active,
                                         int64_t tokens, int64_t hidden, int64_t blocks, int64_t block_size,
                                         float threshold, int rescale, int binary_weighting, int activation,
                                         int down_tile, int cutlass, void* scratch, int64_t scratch_bytes, void* stream,
                                         char* error, int error_len) {
  if (dtype < 0 || dtype > 2 || activation < 0 || activation > 2) return Fail("bad dtype or activation", error, error_len);
  if (cutlass < 0 || cutlass > 2) return Fail("cutlass must be 0, 1 or 2", error, error_len);
  if (down_tile != 0 && down_tile != 64) return Fail("down_tile must be 0 or 64", error, error_len);
  dsmoe::cuda::FfnCudaArgs args;
  std::string e = Shape(tokens, hidden, blocks, block_size, dtype, down_tile, cutlass, args.shape);
  if (!e.empty()) return Fail(e, error, error_len);
  for (const void* p : {x, router, bias, gate, up, down, static_cast<const void*>(y)}) {
    if (!Aligned16(p)) args.shape.aligned = false;
  }
  dsmoe::cuda::FfnCudaPlan plan;
  if (!dsmoe::cuda::MakePlan(args.shape, plan, e)) return Fail(e, error, error_len);
  if (scratch_bytes < plan.scratch.bytes) {
    return Fail("scratch too small: " + std::to_string(scratch_bytes) + " < " + std::to_string(plan.scratch.bytes),
                error, error_len);
  }
  args.x = x;
  args.router = router;
  args.bias = bias;
  args.gate = gate;
  args.up = up;
  args.down = down;
  args.y = y;
  args.active = active;
  args.threshold = threshold;
  args.rescale = rescale != 0;
  args.binary_weighting = binary_weighting != 0;
  args.activation = static_cast<dsmoe::cuda::Act>(activation);
  args.down_tiled = down_tile != 0;
  args.scratch = scratch;
  args.stream = stream;
  e = dsmoe::cuda::FfnCudaForward(args, plan);
  return e.empty() ? 0 : Fail(e, error, error_len);
}

// Which path a call takes on the current device: 1 decode (gather-GEMV), 2 grouped GEMM on
// tensor cores (WMMA), 3 grouped GEMM on CUDA cores, 4 CUTLASS sm_90a grouped GEMMs, 5 CUTLASS
// 2.x (sm_80) grouped GEMMs; -1 on error.
DSMOE_HARNESS_API int dsmoe_cuda_path(int64_t tokens, int64_t hidden, int64_t blocks, int64_t block_size, int dtype,
                                      int down_tile, int cutlass) {
  dsmoe::cuda::FfnCudaShape shape;
  dsmoe::cuda::FfnCudaPlan plan;
  std::string e = Shape(tokens, hidden, blocks, block_size, dtype, down_tile, cutlass, shape);
  if (!e.empty() || !dsmoe::cuda::MakePlan(shape, plan, e)) return -1;
  if (plan.cutlass) return plan.cutlass_arch == 90 ? 4 : 5;
  return plan.decode ? 1 : plan.tensor_cores ? 2 : 3;
}
