// Integer helpers shared by the op's host code (CPU kernels, the CUDA plan and its host
// tests): plain C++, no ONNX Runtime headers.
#pragma once

#include <cstdint>

namespace dsmoe {

inline constexpr int64_t CeilDiv(int64_t a, int64_t b) { return (a + b - 1) / b; }
inline constexpr int64_t RoundUp(int64_t a, int64_t b) { return CeilDiv(a, b) * b; }

}  // namespace dsmoe
