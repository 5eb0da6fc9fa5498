// The ONNX Runtime side of the CUDA kernel: shape checks (common/), outputs,
// scratch, stream; the launches are FfnCudaForward (forward.cu).
#include "cuda/ffn_cuda.h"

#include <cstdint>
#include <cstdlib>
#include <string>

#include "common/scratch.h"
#include "cuda/forward.h"
#include "cuda/plan.h"

namespace dsmoe::cuda {
namespace {

constexpr DType ToDType(ONNXTensorElementDataType t) {
  return t == ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16    ? DType::kFloat16
         : t == ONNX_TENSOR_ELEMENT_DATA_TYPE_BFLOAT16 ? DType::kBFloat16
                                                       : DType::kFloat32;
}

bool Aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

// DSMOE_CUDA_CUTLASS=0 keeps prefill on the WMMA grouped GEMMs (A/B timing, a fallback
// should the CUTLASS path misbehave on some driver), =sm80 takes CUTLASS 2.x's kernels on any
// GPU from sm_80 on (to check them on a Hopper machine); read once per process, a bad value
// fails every call of the op with the message.
CutlassChoice CutlassFromEnvironment() {
  struct Parsed {
    CutlassChoice choice = CutlassChoice::kAuto;
    std::string error;
  };
  static const Parsed parsed = [] {
    Parsed p;
    ParseCutlassChoice(std::getenv("DSMOE_CUDA_CUTLASS"), p.choice, p.error);
    return p;
  }();
  if (!parsed.error.empty()) ThrowInvalidArgument(parsed.error);
  return parsed.choice;
}

}  // namespace

template <ONNXTensorElementDataType kType>
void FfnCudaKernel<kType>::Compute(Ort::KernelContext& ctx) const {
  const FfnInputs in = GetInputs(ctx, attrs_);
  const FfnDims& dims = in.dims;
  void* y = ctx.GetOutput(kY, dims.y_shape).GetTensorMutableRawData();
  bool* active = nullptr;
  if (ctx.GetOutputCount() > kActive) {
    Ort::UnownedValue out = ctx.GetOutput(kActive, dims.active_shape);
    if (out) active = out.GetTensorMutableData<bool>();
  }
  if (dims.num_tokens == 0) return;

  FfnCudaArgs args;
  args.x = in.x.GetTensorRawData();
  args.router = in.router_weight.GetTensorRawData();
  args.bias = in.router_bias ? in.router_bias.GetTensorRawData() : nullptr;
  args.gate = in.gate_weight.GetTensorRawData();
  args.up = in.up_weight.GetTensorRawData();
  args.down = in.down_weight.GetTensorRawData();
  args.y = y;
  args.active = active;
  args.shape = {dims.num_tokens, dims.hidden, dims.num_blocks, dims.block_size, ToDType(kType), true};
  for (const void* p : {args.x, args.router, args.bias, args.gate, args.up, args.down, static_cast<const void*>(y)}) {
    if (p != nullptr && !Aligned16(p)) args.shape.aligned = false;
  }
  args.threshold = attrs_.threshold;
  args.rescale = attrs_.rescale;
  args.binary_weighting = attrs_.weighting == Weighting::kBinary;
  args.activation = attrs_.activation == Activation::kGelu       ? Act::kGelu
                    : attrs_.activation == Activation::kGeluTanh ? Act::kGeluTanh
                                                                 : Act::kSilu;
  args.down_tiled = attrs_.down_tile != 0;
  args.shape.down_tiled = args.down_tiled;
  std::string error = DescribeDevice(args.shape.device, dims.num_blocks, CutlassFromEnvironment());
  if (!error.empty()) throw Ort::Exception(std::string(kOpName) + ": CUDA device query failed: " + error, ORT_EP_FAIL);
  FfnCudaPlan plan;
  if (!MakePlan(args.shape, plan, error)) ThrowInvalidArgument(error);

  const Ort::ConstMemoryInfo memory = in.x.GetTensorMemoryInfo();
  // Freed when the call returns: the arena hands the bytes out again to later
  // work on the same compute stream, which runs after these kernels.
  Scratch scratch(ctx, *static_cast<const OrtMemoryInfo*>(memory), static_cast<size_t>(plan.scratch.bytes), "CUDA");
  args.scratch = scratch.data();
  args.stream = ctx.GetGPUComputeStream();
  error = FfnCudaForward(args, plan);
  if (!error.empty()) throw Ort::Exception(std::string(kOpName) + ": CUDA launch failed: " + error, ORT_EP_FAIL);
}

template class FfnCudaKernel<ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT>;
template class FfnCudaKernel<ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16>;
template class FfnCudaKernel<ONNX_TENSOR_ELEMENT_DATA_TYPE_BFLOAT16>;

}  // namespace dsmoe::cuda
