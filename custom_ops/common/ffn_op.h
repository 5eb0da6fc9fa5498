// The ops' description for ONNX Runtime, one template for every variant and device
// (float32 / float16 / bfloat16 on CUDA, float32 and the quantized Int4 / Int8 / F16
// ops on the CPU, the float32 ProjectedSparseFFN on the CPU). A kernel type supplies
//   using Variant = ...;                                   // what tells its ops apart (e.g. QuantKind)
//   static OpSignature Signature(const Variant&);          // name, EP, input and output types
//   Kernel(const Variant&, const Ort::ConstKernelInfo&);   // parses its attributes (may throw)
//   void Compute(Ort::KernelContext&);                     // may throw Ort::Exception
// and optionally
//   void Prepare(const Ort::ConstKernelInfo&);             // once, at session creation
// Every exception becomes an OrtStatus that names the op (StatusFromCall).
#pragma once

#include <memory>
#include <type_traits>
#include <utility>
#include <vector>

#include "common/ffn_params.h"
#include "common/status.h"

namespace dsmoe {

struct OpSignature {
  const char* name = kOpName;
  const char* execution_provider = "CPUExecutionProvider";
  std::vector<ONNXTensorElementDataType> inputs;   // by input index
  size_t optional_input = kRouterBias;             // router_bias
  std::vector<ONNXTensorElementDataType> outputs;  // by output index
  size_t optional_output = kActive;                // `active`
};

// Outputs of a GatedBlockSparseFFN variant (FfnOutput): Y of type `y`, `active` bool.
inline std::vector<ONNXTensorElementDataType> FfnOutputTypes(ONNXTensorElementDataType y) {
  return {y, ONNX_TENSOR_ELEMENT_DATA_TYPE_BOOL};
}

// GatedBlockSparseFFN with element type T everywhere (inputs per FfnInput).
inline OpSignature FloatOpSignature(const char* execution_provider, ONNXTensorElementDataType type) {
  return {kOpName, execution_provider, std::vector<ONNXTensorElementDataType>(kNumFfnInputs, type), kRouterBias,
          FfnOutputTypes(type), kActive};
}

struct NoVariant {};

template <typename Kernel, typename = void>
struct HasPrepare : std::false_type {};
template <typename Kernel>
struct HasPrepare<Kernel, std::void_t<decltype(std::declval<Kernel&>().Prepare(
                              std::declval<const Ort::ConstKernelInfo&>()))>> : std::true_type {};

template <typename Kernel>
struct FfnKernelAdapter {
  FfnKernelAdapter(const typename Kernel::Variant& variant, const Ort::ConstKernelInfo& info, const char* name)
      : kernel(variant, info), op_name(name) {}
  OrtStatus* ComputeV2(OrtKernelContext* context) {
    return StatusFromCall(op_name, [&] {
      Ort::KernelContext ctx(context);
      kernel.Compute(ctx);
    });
  }
  Kernel kernel;
  const char* op_name;
};

template <typename Kernel>
struct FfnOp : Ort::CustomOpBase<FfnOp<Kernel>, FfnKernelAdapter<Kernel>, /*WithStatus=*/true> {
  using Adapter = FfnKernelAdapter<Kernel>;

  explicit FfnOp(typename Kernel::Variant v = {}) : variant(v), signature(Kernel::Signature(v)) {}

  OrtStatusPtr CreateKernelV2(const OrtApi& /*api*/, const OrtKernelInfo* info, void** op_kernel) const {
    *op_kernel = nullptr;
    return StatusFromCall(signature.name, [&] {
      const Ort::ConstKernelInfo kernel_info(info);
      auto adapter = std::make_unique<Adapter>(variant, kernel_info, signature.name);
      if constexpr (HasPrepare<Kernel>::value) adapter->kernel.Prepare(kernel_info);
      *op_kernel = adapter.release();  // ORT's from here on (KernelDestroy)
    });
  }

  const char* GetName() const { return signature.name; }
  const char* GetExecutionProviderType() const { return signature.execution_provider; }

  size_t GetInputTypeCount() const { return signature.inputs.size(); }
  ONNXTensorElementDataType GetInputType(size_t index) const { return signature.inputs[index]; }
  OrtCustomOpInputOutputCharacteristic GetInputCharacteristic(size_t index) const {
    return index == signature.optional_input ? INPUT_OUTPUT_OPTIONAL : INPUT_OUTPUT_REQUIRED;
  }

  size_t GetOutputTypeCount() const { return signature.outputs.size(); }
  ONNXTensorElementDataType GetOutputType(size_t index) const { return signature.outputs[index]; }
  OrtCustomOpInputOutputCharacteristic GetOutputCharacteristic(size_t index) const {
    return index == signature.optional_output ? INPUT_OUTPUT_OPTIONAL : INPUT_OUTPUT_REQUIRED;
  }

  // No InferOutputShape: with the 1.21 headers in onnxruntime 1.31 it was
  // called but its shapes never reached the graph, and ORT's context reads
  // every input's type, so a node with an empty optional input name is a
  // crash risk in some ORT versions. Output shapes come at run time.

  typename Kernel::Variant variant;
  OpSignature signature;
};

}  // namespace dsmoe
