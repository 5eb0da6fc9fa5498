// The CUDA forward pass: the stages of kernels.cuh in order on one stream.
//   router -> decode GEMVs                           (N <= kDecodeMaxTokens)
//   router -> sort -> align -> gate/up GEMM -> down GEMM   (otherwise)
//   -> finalize (float16 / bfloat16: the float accumulator cast into Y)
//   router -> sort -> align -> permute -> CUTLASS gate/up -> activate -> CUTLASS down
//   -> combine into Y                                (plan.cutlass: sm_80 and up, docs/cuda.md)
// No host synchronisation, no allocation: capturable in a CUDA graph.
#include "cuda/kernels.cuh"

namespace dsmoe::cuda {
namespace {

template <typename T>
__global__ void FinalizeKernel(const float* acc, T* y, int64_t count) {
  for (int64_t e = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; e < count;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    y[e] = FromFloat<T>(acc[e]);
  }
}

template <typename S>
S* At(void* scratch, int64_t offset) {
  return offset < 0 ? nullptr : reinterpret_cast<S*>(static_cast<char*>(scratch) + offset);
}

template <typename T>
cudaError_t LaunchCutlass(const Params<T>& p, const FfnCudaPlan& plan, cudaStream_t stream) {
#if defined(DSMOE_WITH_CUTLASS)
  if constexpr (kIsHalfType<T>) {
    cudaError_t err = LaunchSortAlign(p, plan, stream);
    if (err == cudaSuccess) err = LaunchPermute(p, plan, stream);
    const bool hopper = plan.cutlass_arch == 90;
    if (err == cudaSuccess) err = hopper ? LaunchCutlassSm90GateUp(p, plan, stream) : LaunchCutlassSm80GateUp(p, plan, stream);
    if (err == cudaSuccess) err = LaunchActivate(p, plan, stream);
    if (err == cudaSuccess) err = hopper ? LaunchCutlassSm90Down(p, plan, stream) : LaunchCutlassSm80Down(p, plan, stream);
    if (err == cudaSuccess) err = LaunchCombine(p, plan, stream);
    return err;
  }
#endif
  return cudaErrorNotSupported;  // the plan takes this path only where it is built
}

template <typename T>
std::string Forward(const FfnCudaArgs& a, const FfnCudaPlan& plan) {
  const FfnCudaShape& s = a.shape;
  if (s.tokens == 0) return "";
  Params<T> p{};
  p.x = static_cast<const T*>(a.x);
  p.router = static_cast<const T*>(a.router);
  p.bias = static_cast<const T*>(a.bias);
  p.gate = static_cast<const T*>(a.gate);
  p.up = static_cast<const T*>(a.up);
  p.down = static_cast<const T*>(a.down);
  p.y = static_cast<T*>(a.y);
  const ScratchLayout& l = plan.scratch;
  p.active = a.active != nullptr ? a.active : At<bool>(a.scratch, l.active);
  p.coef = At<float>(a.scratch, l.coef);
  // float32 accumulates in Y itself; the CUTLASS path has no accumulator (combine writes Y).
  p.acc = l.acc >= 0 ? At<float>(a.scratch, l.acc) : plan.cutlass ? nullptr : reinterpret_cast<float*>(a.y);
  p.h_decode = At<float>(a.scratch, l.h_decode);
  p.pair_token = At<int>(a.scratch, l.pair_token);
  p.block_count = At<int>(a.scratch, l.block_count);
  p.tile_start = At<int>(a.scratch, l.tile_start);
  p.h = At<T>(a.scratch, l.h);
  p.pair_row = At<int>(a.scratch, l.pair_row);
  p.xp = At<T>(a.scratch, l.xp);
  p.gu = At<T>(a.scratch, l.gu);
  p.gemm_args = At<char>(a.scratch, l.gemm_args);
  p.gemm_workspace = At<char>(a.scratch, l.gemm_workspace);
  // Each GEMM's workspace, 256-byte aligned (TMA descriptors need 64), as the plan reserved them.
  p.gemm_workspace_bytes =
      plan.cutlass_arch == 90 ? (s.device.gemm_workspace + kScratchAlign - 1) / kScratchAlign * kScratchAlign : 0;
  p.device = s.device.ordinal;
  p.sm_count = s.device.sm_count;
  p.N = static_cast<int>(s.tokens);
  p.d = static_cast<int>(s.hidden);
  p.n = static_cast<int>(s.blocks);
  p.B = static_cast<int>(s.block_size);
  p.h_ld = static_cast<int>(plan.h_ld);
  p.tile_m = static_cast<int>(plan.tile_m);
  p.threshold = a.threshold;
  p.rescale = a.rescale;
  p.binary = a.binary_weighting;
  p.act = a.activation;
  p.decode_down_rows = static_cast<int>(plan.decode_down_rows);
  p.decode_cols = static_cast<int>(plan.decode_cols);
  p.vec = plan.vec_loads;
  p.down_tiled = a.down_tiled;

  cudaStream_t stream = static_cast<cudaStream_t>(a.stream);
  cudaError_t err = LaunchRouter(p, plan, stream);
  if (err == cudaSuccess) {
    if (plan.decode) {
      err = LaunchDecode(p, plan, stream);
    } else if (plan.cutlass) {
      err = LaunchCutlass(p, plan, stream);
    } else {
      err = LaunchSortAlign(p, plan, stream);
      if (err == cudaSuccess) err = LaunchGateUp(p, plan, stream);
      if (err == cudaSuccess) err = LaunchDown(p, plan, stream);
    }
  }
  if (err == cudaSuccess && !plan.cutlass) err = LaunchFinalize(p, plan, stream);  // combine wrote Y
  if (err != cudaSuccess) return std::string(cudaGetErrorName(err)) + ": " + cudaGetErrorString(err);
  return "";
}

}  // namespace

template <typename T>
cudaError_t LaunchFinalize(const Params<T>& p, const FfnCudaPlan& plan, cudaStream_t stream) {
  if constexpr (kIsHalfType<T>) {
    FinalizeKernel<T><<<Grid(plan.finalize), 256, 0, stream>>>(p.acc, p.y, static_cast<int64_t>(p.N) * p.d);
    return cudaGetLastError();
  }
  return cudaSuccess;  // float32 accumulated in Y
}

DSMOE_INSTANTIATE_LAUNCHER(LaunchFinalize)

std::string CudaDeviceCount(int& count) {
  count = 0;
  const cudaError_t err = cudaGetDeviceCount(&count);
  if (err != cudaSuccess) {
    count = 0;
    return std::string(cudaGetErrorName(err)) + ": " + cudaGetErrorString(err);
  }
  return "";
}

std::string DescribeDevice(CudaDevice& device, int64_t blocks, CutlassChoice cutlass) {
  device = CudaDevice{};
  int major = 0, minor = 0;
  cudaError_t err = cudaGetDevice(&device.ordinal);
  if (err == cudaSuccess) err = cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device.ordinal);
  if (err == cudaSuccess) err = cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device.ordinal);
  if (err == cudaSuccess) {
    err = cudaDeviceGetAttribute(&device.sm_count, cudaDevAttrMultiProcessorCount, device.ordinal);
  }
  if (err != cudaSuccess) return std::string(cudaGetErrorName(err)) + ": " + cudaGetErrorString(err);
  device.arch = 10 * major + minor;
#if defined(DSMOE_WITH_CUTLASS)
  device.cutlass = cutlass != CutlassChoice::kOff;
  device.force_sm80 = cutlass == CutlassChoice::kSm80;
  if (device.cutlass && device.arch == 90 && blocks >= 1 && blocks <= kMaxRouterBlocks) {
    device.gemm_workspace = CutlassGemmWorkspaceBytes(static_cast<int>(blocks), device.sm_count, device.ordinal);
  }
#else
  (void)cutlass;
  (void)blocks;
#endif
  return "";
}

std::string FfnCudaForward(const FfnCudaArgs& args, const FfnCudaPlan& plan) {
  switch (args.shape.dtype) {
    case DType::kFloat32:
      return Forward<float>(args, plan);
    case DType::kFloat16:
      return Forward<__half>(args, plan);
    case DType::kBFloat16:
      return Forward<__nv_bfloat16>(args, plan);
  }
  return "unknown element type";
}

}  // namespace dsmoe::cuda
