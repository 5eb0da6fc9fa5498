#include "cpu/hugepages.h"

#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <cstring>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace dsmoe::cpu {

namespace {
std::atomic<bool> advice_enabled{true};
}  // namespace

bool SetHugePageAdvice(bool enabled) { return advice_enabled.exchange(enabled); }

void AdviseHugePages(const void* data, size_t bytes) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  if (!advice_enabled.load()) return;
  if (const char* env = std::getenv("DSMOE_HUGEPAGES"); env != nullptr && std::strcmp(env, "0") == 0) return;
  constexpr uintptr_t kHuge = uintptr_t{2} << 20;
  const uintptr_t begin = (reinterpret_cast<uintptr_t>(data) + kHuge - 1) & ~(kHuge - 1);
  const uintptr_t end = (reinterpret_cast<uintptr_t>(data) + bytes) & ~(kHuge - 1);
  if (data == nullptr || end <= begin) return;  // under one aligned huge page: nothing to gain
  void* start = reinterpret_cast<void*>(begin);
  if (madvise(start, end - begin, MADV_HUGEPAGE) != 0) return;
#ifndef MADV_COLLAPSE
  constexpr int MADV_COLLAPSE = 25;  // older headers; an older kernel answers EINVAL
#endif
  (void)madvise(start, end - begin, MADV_COLLAPSE);
#else
  (void)data;
  (void)bytes;
#endif
}

void AdviseConstantInputs(const Ort::ConstKernelInfo& info, std::initializer_list<size_t> inputs) {
  for (const size_t index : inputs) {
    try {
      int is_constant = 0;
      Ort::ConstValue weight = info.GetTensorConstantInput(index, &is_constant);
      if (!is_constant || !weight || !weight.IsTensor()) continue;
      const Ort::TensorTypeAndShapeInfo type = weight.GetTensorTypeAndShapeInfo();
      const ONNXTensorElementDataType element = type.GetElementType();
      const size_t element_bytes = element == ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT     ? 4
                                   : element == ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16 ? 2
                                                                                      : 1;
      AdviseHugePages(weight.GetTensorRawData(), type.GetElementCount() * element_bytes);
    } catch (const Ort::Exception&) {
      // Only an optimisation: a runtime that cannot say which inputs are constant runs without it.
    }
  }
}

}  // namespace dsmoe::cpu
