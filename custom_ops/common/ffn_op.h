// The op's description for ONNX Runtime, shared by every device: a device
// supplies a Kernel type with
//   static constexpr const char* kExecutionProvider;     // e.g. "CPUExecutionProvider"
//   static constexpr ONNXTensorElementDataType kElementType;  // T of docs/op-spec.md
//   explicit Kernel(const FfnAttributes&);
//   void Compute(Ort::KernelContext&);                   // may throw Ort::Exception
// and optionally
//   void Prepare(const Ort::ConstKernelInfo&);           // once, at session creation
#pragma once

#include <memory>
#include <type_traits>
#include <utility>

#include "common/ffn_params.h"
#include "common/status.h"

namespace dsmoe {

template <typename Kernel, typename = void>
struct HasPrepare : std::false_type {};
template <typename Kernel>
struct HasPrepare<Kernel, std::void_t<decltype(std::declval<Kernel&>().Prepare(
                              std::declval<const Ort::ConstKernelInfo&>()))>> : std::true_type {};

template <typename Kernel>
struct FfnKernelAdapter {
  explicit FfnKernelAdapter(const FfnAttributes& attrs) : kernel(attrs) {}
  OrtStatus* ComputeV2(OrtKernelContext* context) {
    return StatusFromCall([&] {
      Ort::KernelContext ctx(context);
      kernel.Compute(ctx);
    });
  }
  Kernel kernel;
};

template <typename Kernel>
struct GatedBlockSparseFfnOp
    : Ort::CustomOpBase<GatedBlockSparseFfnOp<Kernel>, FfnKernelAdapter<Kernel>, /*WithStatus=*/true> {
  using Adapter = FfnKernelAdapter<Kernel>;

  OrtStatusPtr CreateKernelV2(const OrtApi& /*api*/, const OrtKernelInfo* info, void** op_kernel) const {
    *op_kernel = nullptr;
    return StatusFromCall([&] {
      const Ort::ConstKernelInfo kernel_info(info);
      auto adapter = std::make_unique<Adapter>(ParseAttributes(kernel_info));
      if constexpr (HasPrepare<Kernel>::value) adapter->kernel.Prepare(kernel_info);
      *op_kernel = adapter.release();  // ORT's from here on (KernelDestroy)
    });
  }

  const char* GetName() const { return kOpName; }
  const char* GetExecutionProviderType() const { return Kernel::kExecutionProvider; }

  size_t GetInputTypeCount() const { return kNumFfnInputs; }
  ONNXTensorElementDataType GetInputType(size_t /*index*/) const { return Kernel::kElementType; }
  OrtCustomOpInputOutputCharacteristic GetInputCharacteristic(size_t index) const {
    return index == kRouterBias ? INPUT_OUTPUT_OPTIONAL : INPUT_OUTPUT_REQUIRED;
  }

  size_t GetOutputTypeCount() const { return kNumFfnOutputs; }
  ONNXTensorElementDataType GetOutputType(size_t index) const {
    return index == kActive ? ONNX_TENSOR_ELEMENT_DATA_TYPE_BOOL : Kernel::kElementType;
  }
  OrtCustomOpInputOutputCharacteristic GetOutputCharacteristic(size_t index) const {
    return index == kActive ? INPUT_OUTPUT_OPTIONAL : INPUT_OUTPUT_REQUIRED;
  }

  // No InferOutputShape: with the 1.21 headers in onnxruntime 1.31 it was
  // called but its shapes never reached the graph, and ORT's context reads
  // every input's type, so a node with an empty optional input name is a
  // crash risk in some ORT versions. Output shapes come at run time.
};

}  // namespace dsmoe
