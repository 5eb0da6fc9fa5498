// ONNX Runtime's intra-op thread pool for the CPU kernels, so that the
// session's intra_op_num_threads is honoured (1 thread: runs inline).
#pragma once

#include <atomic>
#include <cstddef>
#include <exception>
#include <mutex>

#include "onnxruntime_cxx_api.h"

namespace dsmoe::cpu {

// Calls fn(i) for i in [0, total), spread over the pool. An exception in a task (a
// per-thread buffer's bad_alloc, say) must not cross ORT's C API on a pool thread, where
// it would end the process: the first one is kept, the remaining tasks are skipped, and
// it is rethrown here once the pool is done (the op's adapter turns it into a status).
template <typename F>
void ParallelFor(const Ort::KernelContext& ctx, size_t total, const F& fn) {
  if (total == 0) return;
  if (total == 1) {
    fn(size_t{0});
    return;
  }
  struct Call {
    explicit Call(const F& f) : fn(f) {}
    const F& fn;
    std::atomic<bool> failed{false};
    std::mutex mutex;
    std::exception_ptr error;
  } call(fn);
  auto trampoline = [](void* data, size_t i) {
    Call& c = *static_cast<Call*>(data);
    if (c.failed.load(std::memory_order_relaxed)) return;
    try {
      c.fn(i);
    } catch (...) {
      std::lock_guard<std::mutex> lock(c.mutex);
      if (!c.error) c.error = std::current_exception();
      c.failed.store(true, std::memory_order_relaxed);
    }
  };
  ctx.ParallelFor(trampoline, total, /*num_batch=*/0, &call);
  if (call.error) std::rethrow_exception(call.error);
}

}  // namespace dsmoe::cpu
