// Picks the kernel set for this CPU (cpu/kernels.h).
#include <cstdlib>
#include <cstring>
#include <string>

#include "cpu/kernels.h"

namespace dsmoe::cpu {

// One definition per compiled instruction set (kernels_isa.cc, see CMakeLists.txt).
namespace baseline { const KernelSet& Kernels(); }
#if defined(DSMOE_HAVE_AVX2)
namespace avx2 { const KernelSet& Kernels(); }
#endif
#if defined(DSMOE_HAVE_AVX512)
namespace avx512 { const KernelSet& Kernels(); }
#endif

namespace {

bool Supports(const char* isa) {
#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
  if (std::strcmp(isa, "avx512") == 0) return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("fma");
  if (std::strcmp(isa, "avx2") == 0) return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#endif
  return std::strcmp(isa, "baseline") == 0;
}

const KernelSet* Compiled(const std::string& isa) {
#if defined(DSMOE_HAVE_AVX512)
  if (isa == "avx512") return &avx512::Kernels();
#endif
#if defined(DSMOE_HAVE_AVX2)
  if (isa == "avx2") return &avx2::Kernels();
#endif
  if (isa == "baseline") return &baseline::Kernels();
  return nullptr;
}

}  // namespace

const KernelSet& SelectKernels() {
  if (const char* forced = std::getenv("DSMOE_CPU_ISA"); forced != nullptr && *forced != '\0') {
    const KernelSet* set = Compiled(forced);
    if (set == nullptr || !Supports(forced)) {
      ThrowInvalidArgument(std::string("DSMOE_CPU_ISA=") + forced +
                           ": not built into this library or not supported by this CPU "
                           "(expected baseline, avx2 or avx512)");
    }
    return *set;
  }
  for (const char* isa : {"avx512", "avx2"}) {
    if (const KernelSet* set = Compiled(isa); set != nullptr && Supports(isa)) return *set;
  }
  return baseline::Kernels();
}

}  // namespace dsmoe::cpu
