// Integer helpers shared by the op's host code (CPU kernels, the CUDA plan and its host
// tests): plain C++, no ONNX Runtime headers.
#pragma once

#include <cstdint>

namespace dsmoe {

// ceil(a / b) for b > 0, without forming a + b - 1 (shape checks divide sizes up to 2^63 - 1).
inline constexpr int64_t CeilDiv(int64_t a, int64_t b) { return a / b + (a % b > 0); }
inline constexpr int64_t RoundUp(int64_t a, int64_t b) { return CeilDiv(a, b) * b; }

}  // namespace dsmoe
