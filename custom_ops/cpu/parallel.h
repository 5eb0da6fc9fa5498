// ONNX Runtime's intra-op thread pool for the CPU kernels, so that the
// session's intra_op_num_threads is honoured (1 thread: runs inline).
#pragma once

#include <cstddef>

#include "onnxruntime_cxx_api.h"

namespace dsmoe::cpu {

// Calls fn(i) for i in [0, total), spread over the pool. fn must not throw:
// it runs on pool threads behind ORT's C API.
template <typename F>
void ParallelFor(const Ort::KernelContext& ctx, size_t total, const F& fn) {
  if (total == 0) return;
  if (total == 1) {
    fn(size_t{0});
    return;
  }
  auto trampoline = [](void* data, size_t i) { (*static_cast<const F*>(data))(i); };
  ctx.ParallelFor(trampoline, total, /*num_batch=*/0, const_cast<F*>(&fn));
}

}  // namespace dsmoe::cpu
