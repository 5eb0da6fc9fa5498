// Several dependent phases of work in one pass of ONNX Runtime's pool.
//
// Each parallel section of the pool wakes its sleeping workers (idle workers sleep in the
// project's sessions): about 40 us on the development VM before the second thread starts.
// ProjectedSparseFFN's decode runs four phases (input projection, FFN, the FFN's partial
// sums, output projection), each needing the previous one's results; as four ParallelFor
// calls it would pay that four times. Here every thread of one ParallelFor claims the
// current phase's tasks from a shared counter; the thread that completes a phase's last task
// runs the serial step after it (which sizes the next phase) while the others spin, so
// the workers wake once and a late one simply finds less left to do.
//
// A task or step that throws ends the pass: the spinning threads see `failed` and return,
// and the exception is rethrown to the caller.
#pragma once

#include <array>
#include <atomic>
#include <cstdint>
#include <exception>
#include <mutex>

#include "cpu/parallel.h"

namespace dsmoe::cpu {

inline constexpr int kMaxPhases = 4;

inline void SpinPause() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#elif defined(__aarch64__)
  asm volatile("yield");
#endif
}

// Runs `phases` phases: phase 0 has `first_tasks` tasks; task(p, i) runs task i of phase p;
// after(p) runs once phase p is complete, on one thread, and returns the number of tasks of
// phase p + 1 (its return value after the last phase is ignored). Phases with no task are
// allowed: their step runs right after the previous one's.
template <typename Task, typename After>
void RunPhases(const Ort::KernelContext& ctx, int phases, int64_t first_tasks, const Task& task, const After& after) {
  struct PhaseState {
    std::atomic<int64_t> count{-1}, next{0}, done{0};  // count -1: not sized yet
  };
  std::array<PhaseState, kMaxPhases> state;
  std::atomic<bool> failed{false};
  std::mutex error_mutex;
  std::exception_ptr error;
  auto fail = [&] {
    std::lock_guard<std::mutex> lock(error_mutex);
    if (!error) error = std::current_exception();
    failed.store(true, std::memory_order_release);
  };
  // After phase p is complete: its step, then those of the empty phases after it.
  auto finish = [&](int p) {
    for (; p < phases; ++p) {
      const int64_t next = after(p);
      if (p + 1 >= phases) return;
      state[p + 1].count.store(next, std::memory_order_release);
      if (next > 0) return;
    }
  };
  state[0].count.store(first_tasks, std::memory_order_relaxed);
  // Enough members for every thread of the pool; the surplus find nothing to claim.
  constexpr size_t kMembers = 64;
  if (first_tasks == 0) {  // no member would finish phase 0: its step runs here
    try {
      finish(0);
    } catch (...) {
      fail();
    }
  }
  if (!failed.load()) {
    ParallelFor(ctx, kMembers, [&](size_t) {
      for (int p = 0; p < phases && !failed.load(std::memory_order_relaxed); ++p) {
        int64_t count;
        while ((count = state[p].count.load(std::memory_order_acquire)) < 0) {
          if (failed.load(std::memory_order_relaxed)) return;
          SpinPause();
        }
        for (int64_t i; (i = state[p].next.fetch_add(1, std::memory_order_relaxed)) < count;) {
          try {
            task(p, i);
            if (state[p].done.fetch_add(1, std::memory_order_acq_rel) + 1 == count) finish(p);
          } catch (...) {
            fail();
            return;
          }
        }
      }
    });
  }
  if (error) std::rethrow_exception(error);
}

}  // namespace dsmoe::cpu
