#include "cpu/hugepages.h"

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <map>
#include <vector>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace dsmoe::cpu {

namespace {
std::atomic<bool> advice_enabled{true};
}  // namespace

bool SetHugePageAdvice(bool enabled) { return advice_enabled.exchange(enabled); }

#if defined(__linux__) && defined(MADV_HUGEPAGE)
namespace {
constexpr uintptr_t kHuge = uintptr_t{2} << 20;
constexpr uintptr_t kSmall = 4096;

// MADV_HUGEPAGE then MADV_COLLAPSE (Linux 6.1+: done now, not some time later) on whole 2 MB pages;
// the number of pages collapsed (all or, on any failure, none).
size_t Collapse(uintptr_t begin, uintptr_t end) {
  void* start = reinterpret_cast<void*>(begin);
  if (madvise(start, end - begin, MADV_HUGEPAGE) != 0) return 0;
#ifndef MADV_COLLAPSE
  constexpr int MADV_COLLAPSE = 25;  // older headers; an older kernel answers EINVAL
#endif
  return madvise(start, end - begin, MADV_COLLAPSE) == 0 ? (end - begin) / kHuge : 0;
}

// Whether at least 90 % of the 2 MB page's small pages are mapped and resident: collapsing a page
// makes all of it resident, which must not happen to memory the process never touched.
bool MostlyResident(uintptr_t page) {
  unsigned char resident[kHuge / kSmall];
  if (mincore(reinterpret_cast<void*>(page), kHuge, resident) != 0) return false;  // ENOMEM: a hole
  size_t count = 0;
  for (const unsigned char r : resident) count += r & 1;
  return count * 10 >= (kHuge / kSmall) * 9;
}
}  // namespace
#endif

size_t AdviseHugePages(const std::vector<HugePageRange>& ranges) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  if (!advice_enabled.load()) return 0;
  if (const char* env = std::getenv("DSMOE_HUGEPAGES"); env != nullptr && std::strcmp(env, "0") == 0) return 0;
  size_t collapsed = 0;
  std::map<uintptr_t, uintptr_t> held;  // 2 MB page -> bytes of the ranges in it, for the pages they share
  for (const HugePageRange& r : ranges) {
    if (r.data == nullptr || r.bytes == 0) continue;
    const uintptr_t first = reinterpret_cast<uintptr_t>(r.data), last = first + r.bytes;
    const uintptr_t begin = (first + kHuge - 1) & ~(kHuge - 1), end = last & ~(kHuge - 1);
    if (begin < end) collapsed += Collapse(begin, end);  // the pages that hold nothing but this range
    auto end_page = [&](uintptr_t page) {
      const uintptr_t bytes = std::min(last, page + kHuge) - std::max(first, page);
      if (bytes < kHuge) held[page] += bytes;
    };
    const uintptr_t head = first & ~(kHuge - 1), tail = (last - 1) & ~(kHuge - 1);
    end_page(head);
    if (tail != head) end_page(tail);
  }
  // The pages of the ranges' unaligned ends, which also hold other memory (ONNX Runtime maps each
  // initializer on its own, next to the others): collapsed too where the ranges fill at least a
  // quarter of the page and the page is resident.
  for (const auto& [page, bytes] : held) {
    if (bytes >= kHuge / 4 && MostlyResident(page)) collapsed += Collapse(page, page + kHuge);
  }
  return collapsed;
#else
  (void)ranges;
  return 0;
#endif
}

void AdviseConstantInputs(const Ort::ConstKernelInfo& info, std::initializer_list<size_t> inputs) {
  std::vector<HugePageRange> ranges;
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
      ranges.push_back({weight.GetTensorRawData(), type.GetElementCount() * element_bytes});
    } catch (const Ort::Exception&) {
      // Only an optimisation: a runtime that cannot say which inputs are constant runs without it.
    }
  }
  AdviseHugePages(ranges);
}

}  // namespace dsmoe::cpu
