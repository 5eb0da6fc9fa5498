// A minimal stand-in for the parts of ONNX Runtime's C API that the op's kernel uses
// (kernel info attributes, kernel context inputs/outputs, tensor shapes and data,
// ParallelFor, statuses), so that the fuzz harness can drive the real kernel code
// (common/ + cpu/, through the Ort C++ wrappers and the CustomOpBase function table)
// without onnxruntime. Every tensor buffer is its own exact-size heap allocation, so
// AddressSanitizer sees any access outside it. Functions the kernel is not expected
// to call stay null: calling one crashes, which the fuzzer reports.
#pragma once

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <variant>
#include <vector>

#include "onnxruntime_c_api.h"

namespace fake_ort {

// The table to pass to Ort::InitApi and to OrtCustomOp::CreateKernelV2.
const OrtApi& Api();

struct Status {
  OrtErrorCode code;
  std::string message;
};

struct Tensor {
  ONNXTensorElementDataType type = ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;  // FLOAT, FLOAT16, UINT8 or BOOL
  std::vector<int64_t> shape;
  std::unique_ptr<unsigned char[]> data;  // exactly bytes() long (a 0-byte allocation for empty tensors)
  size_t bytes() const;
  int64_t elements() const;
  void Allocate();  // allocates bytes() for `shape`
};

using Attribute = std::variant<int64_t, float, std::string>;

struct KernelInfo {
  std::vector<std::pair<std::string, Attribute>> attributes;
};

// The order ParallelFor runs its items in (all on the calling thread).
enum class Order { kForward, kReverse, kOddsFirst };

struct KernelContext {
  // Inputs in op order; a null entry is an absent optional input.
  std::vector<Tensor*> inputs;
  // Output slots; an entry false = present in the node but with an empty name (ORT then
  // returns a null OrtValue for it).
  std::vector<bool> output_present;
  std::vector<std::unique_ptr<Tensor>> outputs;  // filled by KernelContext_GetOutput
  Order order = Order::kForward;
  size_t parallel_for_calls = 0;
};

// The ops a registration function (RegisterOps, RegisterQuantOps) added to an
// Ort::CustomOpDomain made on this API, in order.
std::vector<const OrtCustomOp*> DomainOps(const OrtCustomOpDomain* domain);

inline OrtKernelInfo* AsOrt(KernelInfo* p) { return reinterpret_cast<OrtKernelInfo*>(p); }
inline OrtKernelContext* AsOrt(KernelContext* p) { return reinterpret_cast<OrtKernelContext*>(p); }
inline Status* FromOrt(OrtStatus* p) { return reinterpret_cast<Status*>(p); }

}  // namespace fake_ort
