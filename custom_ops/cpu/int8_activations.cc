// accuracy_level 4 (cpu/int8_activations.h): the packing of rounded tokens for the int4 x int8
// GEMV, and the run-time choice of that GEMV.
#include "cpu/int8_activations.h"

#include <cstring>

namespace dsmoe::cpu {

#if defined(DSMOE_HAVE_INT4_INT8_DOT)
namespace vnni {
void DotRows(const uint8_t* w, const float* scales, int64_t rows, int64_t d, int64_t group,
             const uint8_t* const* tokens, int count, float* out, int64_t ldo);
void SlabGemm(const uint8_t* w, const float* scales, int64_t rows, int64_t d, int64_t group, const Int8Rows& x,
              const int64_t* tokens, int count, float* out, int64_t ldo, void* scratch);
}  // namespace vnni
#endif

void PackInt8Token(const int8_t* q, const float* scales, const int32_t* corr, int64_t d, int64_t G, uint8_t* out) {
  std::memset(out, 0, static_cast<size_t>(Int8TokenBytes(d)));
  for (int64_t chunk = 0; chunk * 32 < d; ++chunk) {
    uint8_t* unit = out + chunk / 4 * kInt8UnitBytes;
    const int j = static_cast<int>(chunk % 4);
    const int8_t* qc = q + chunk * 32;
    std::memcpy(unit + 16 * j, qc, 16);
    std::memcpy(unit + 64 + 16 * j, qc + 16, 16);
    std::memcpy(unit + 128 + 16 * j, corr + chunk, sizeof *corr);
    const float s = scales[chunk * 32 / G];
    for (int l = 0; l < 4; ++l) std::memcpy(unit + 192 + 4 * (4 * j + l), &s, sizeof s);
  }
}

void Int8ChunkCorrections(const int8_t* q, int64_t count, int64_t d, int32_t* corr) {
  for (int64_t t = 0; t < count; ++t) {
    for (int64_t c0 = 0; c0 + 32 <= d; c0 += 32) {
      int32_t sum = 0;
      for (int c = 0; c < 32; ++c) sum += q[t * d + c0 + c];
      *corr++ = -8 * sum;
    }
  }
}

Int4Int8Kernels SelectInt4Int8Kernels(const QuantKernelSet& chosen) {
#if defined(DSMOE_HAVE_INT4_INT8_DOT)
  // Only beside the AVX-512 set kernels_select.cc picked (DSMOE_CPU_ISA included): a narrower
  // forced set keeps the float path on x_hat, as tests and comparisons expect.
  if (std::strcmp(chosen.name, "avx512") == 0 && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vnni")) {
    return {&vnni::DotRows, &vnni::SlabGemm};
  }
#else
  (void)chosen;
#endif
  return {};
}

}  // namespace dsmoe::cpu
