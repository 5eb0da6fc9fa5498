#include "cpu/hugepages.h"

#include <cstdint>
#include <cstdlib>
#include <cstring>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace dsmoe::cpu {

void AdviseHugePages(const void* data, size_t bytes) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
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

}  // namespace dsmoe::cpu
