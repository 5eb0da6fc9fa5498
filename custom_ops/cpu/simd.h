// Vector types and helpers shared by the per-instruction-set inner loops
// (kernels_isa.cc, kernels_quant_isa.cc). Those files are compiled once per
// instruction set with -DDSMOE_ISA=<name> and the matching flags, so this header
// defines everything in dsmoe::cpu::DSMOE_ISA: vectors are GCC/Clang vector
// extensions of kVL floats (16 with AVX-512, 8 with AVX2, 4 for the SSE2 / NEON
// baseline).
#pragma once

#include <cstdint>
#include <cstring>

#ifndef DSMOE_ISA
#error "compile with -DDSMOE_ISA=<name>"
#endif

namespace dsmoe::cpu::DSMOE_ISA {
namespace {

#if defined(__AVX512F__)
constexpr int kVL = 16;
#elif defined(__AVX2__)
constexpr int kVL = 8;
#else
constexpr int kVL = 4;
#endif

using Vec = float __attribute__((vector_size(kVL * sizeof(float))));
using VecI = int32_t __attribute__((vector_size(kVL * sizeof(int32_t))));

inline Vec Load(const float* p) {
  Vec v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
inline void Store(float* p, Vec v) { std::memcpy(p, &v, sizeof v); }
// `s - 0` is exact for every s (unlike `0 + s`, which turns -0 into +0), so the
// compiler drops the subtraction and emits a plain broadcast.
inline Vec Splat(float s) { return s - Vec{}; }
inline float HorizontalSum(Vec v) {
  float s = 0.0f;
  for (int l = 0; l < kVL; ++l) s += v[l];
  return s;
}

}  // namespace
}  // namespace dsmoe::cpu::DSMOE_ISA
