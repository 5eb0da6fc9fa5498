// Picks the kernel sets for this CPU (cpu/kernels.h, cpu/kernels_quant.h): one selector
// for the float32 and the quantized inner loops, so that both always run the same ISA.
#include <cstdlib>
#include <cstring>
#include <string>

#include "cpu/cache_blocking.h"
#include "cpu/kernels.h"
#include "cpu/kernels_quant.h"

namespace dsmoe::cpu {

// One definition per compiled instruction set (kernels_isa.cc, kernels_quant_isa.cc;
// see cmake/DsmoeCpuKernels.cmake).
namespace baseline { const KernelSet& Kernels(); const QuantKernelSet& QuantKernels(); }
#if defined(DSMOE_HAVE_AVX2)
namespace avx2 { const KernelSet& Kernels(); const QuantKernelSet& QuantKernels(); }
#endif
#if defined(DSMOE_HAVE_AVX512)
namespace avx512 { const KernelSet& Kernels(); const QuantKernelSet& QuantKernels(); }
#endif

namespace {

// What the set's compiler flags assume (DsmoeCpuKernels.cmake): AVX2 builds with F16C too.
bool Supports(const std::string& isa) {
#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
  if (isa == "avx512") return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("fma");
  if (isa == "avx2") {
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
  }
#endif
  return isa == "baseline";
}

template <typename Set>
const Set* Compiled(const std::string& isa, const Set& (*baseline_set)(), const Set& (*avx2_set)(),
                    const Set& (*avx512_set)()) {
  if (isa == "avx512" && avx512_set != nullptr) return &avx512_set();
  if (isa == "avx2" && avx2_set != nullptr) return &avx2_set();
  if (isa == "baseline") return &baseline_set();
  return nullptr;
}

// DSMOE_CPU_ISA=baseline|avx2|avx512 forces a set (tests, comparisons); else the widest one
// that is built in and that this CPU runs.
template <typename Set>
const Set& Select(const Set& (*baseline_set)(), const Set& (*avx2_set)(), const Set& (*avx512_set)()) {
  if (const char* forced = std::getenv("DSMOE_CPU_ISA"); forced != nullptr && *forced != '\0') {
    const Set* set = Compiled(forced, baseline_set, avx2_set, avx512_set);
    if (set == nullptr || !Supports(forced)) {
      ThrowInvalidArgument(std::string("DSMOE_CPU_ISA=") + forced +
                           ": not built into this library or not supported by this CPU "
                           "(expected baseline, avx2 or avx512)");
    }
    return *set;
  }
  for (const char* isa : {"avx512", "avx2"}) {
    if (const Set* set = Compiled(isa, baseline_set, avx2_set, avx512_set); set != nullptr && Supports(isa)) {
      return *set;
    }
  }
  return baseline_set();
}

// The sets built into this library (nullptr: not compiled for this target).
using Kernels = const KernelSet& (*)();
using QuantKernels = const QuantKernelSet& (*)();
#if defined(DSMOE_HAVE_AVX2)
constexpr Kernels kAvx2 = &avx2::Kernels;
constexpr QuantKernels kAvx2Quant = &avx2::QuantKernels;
#else
constexpr Kernels kAvx2 = nullptr;
constexpr QuantKernels kAvx2Quant = nullptr;
#endif
#if defined(DSMOE_HAVE_AVX512)
constexpr Kernels kAvx512 = &avx512::Kernels;
constexpr QuantKernels kAvx512Quant = &avx512::QuantKernels;
#else
constexpr Kernels kAvx512 = nullptr;
constexpr QuantKernels kAvx512Quant = nullptr;
#endif

}  // namespace

const KernelSet& SelectKernels() {
  (void)L1DataCacheBytes();  // DSMOE_CPU_L1D_BYTES checked at the kernel's creation, not its first run
  return Select<KernelSet>(&baseline::Kernels, kAvx2, kAvx512);
}

const QuantKernelSet& SelectQuantKernels() {
  return Select<QuantKernelSet>(&baseline::QuantKernels, kAvx2Quant, kAvx512Quant);
}

}  // namespace dsmoe::cpu
