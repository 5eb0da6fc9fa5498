// Several dependent phases of work in one pass of ONNX Runtime's pool.
//
// Each parallel section of the pool wakes its sleeping workers (idle workers sleep in the
// project's sessions): about 40 us on the development VM before the second thread starts.
// ProjectedSparseFFN's decode runs four phases (input projection, FFN, the FFN's partial
// sums, output projection) and the prefill path of the sparse ops 1 + 2 per chunk (routing,
// then per chunk gate/up and down), each needing the previous one's results; as one
// ParallelFor each they would pay that every time. Here every thread of one ParallelFor
// claims the current phase's tasks; the thread that completes a phase's last task runs the
// serial step after it (which sizes the next phase, or ends the pass) while the others spin,
// so the workers wake once and a late one simply finds less left to do.
//
// A phase's tasks are claimed one at a time from a shared counter, or in contiguous ranges
// (TaskRanges) where a thread's consecutive tasks share data: the prefill's row tasks of one
// block share its packed panels, and a task prefetches the weights of the next one.
//
// A task or step that throws ends the pass: the spinning threads see `failed` and return,
// and the exception is rethrown to the caller.
#pragma once

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <exception>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

#include "cpu/parallel.h"

namespace dsmoe::cpu {

inline void SpinPause() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#elif defined(__aarch64__)
  asm volatile("yield");
#endif
}

// One round of a wait for another thread's phase: spin a while (a phase's last task or step
// usually ends within microseconds), then yield the core, so that on a machine whose cores are
// busy with other work the thread being waited for is not kept off a core by the waiters.
inline void WaitPause(int spins) {
  constexpr int kSpinsBeforeYield = 256;  // ~10-30 us of `pause`
  if (spins < kSpinsBeforeYield) {
    SpinPause();
  } else {
    std::this_thread::yield();
  }
}

// The CPUs this process may run on (Linux: its affinity mask), at least 1.
int AvailableCpus();

// Tasks [0, count) cut into contiguous ranges [starts[j], starts[j + 1]). A thread takes an
// untouched range whole and runs it front to back; when none is left it takes tasks from the
// back of the range with the most left (and goes on backwards there), so that its
// consecutive tasks stay neighbours while the last ones still spread over the threads.
class TaskRanges {
 public:
  // Where a thread is: its range (-1: none yet) and the end it claims from.
  struct Cursor {
    int64_t range = -1;
    bool from_back = false;
  };

  void Reset(const std::vector<int64_t>& starts) {
    ranges_ = static_cast<int64_t>(starts.size()) - 1;
    first_.assign(starts.begin(), starts.end() - 1);
    bounds_.reset(new std::atomic<uint64_t>[static_cast<size_t>(std::max<int64_t>(ranges_, 1))]);
    for (int64_t j = 0; j < ranges_; ++j) bounds_[j].store(Pack(starts[j], starts[j + 1]), std::memory_order_relaxed);
    fresh_.store(0, std::memory_order_relaxed);
  }

  // The next task for the thread at `cursor` (updated), or -1 when every task is claimed.
  int64_t Claim(Cursor& cursor) {
    if (cursor.range >= 0) {
      const int64_t task = Take(cursor.range, cursor.from_back);
      if (task >= 0) return task;
    }
    for (int64_t j; (j = fresh_.fetch_add(1, std::memory_order_relaxed)) < ranges_;) {
      cursor = {j, false};
      const int64_t task = Take(j, false);
      if (task >= 0) return task;
    }
    for (;;) {  // steal from the back of the range with the most left
      int64_t best = -1, most = 0;
      for (int64_t j = 0; j < ranges_; ++j) {
        const uint64_t b = bounds_[j].load(std::memory_order_relaxed);
        if (Back(b) - Front(b) > most) most = Back(b) - Front(b), best = j;
      }
      if (best < 0) return -1;
      const int64_t task = Take(best, true);
      if (task >= 0) {
        cursor = {best, true};
        return task;
      }
    }
  }

  // The task this thread would likely claim after its current one (-1: none): for prefetching.
  int64_t Next(const Cursor& cursor) const {
    if (cursor.range >= 0) {
      const uint64_t b = bounds_[cursor.range].load(std::memory_order_relaxed);
      if (Front(b) < Back(b)) return cursor.from_back ? Back(b) - 1 : Front(b);
    }
    const int64_t j = fresh_.load(std::memory_order_relaxed);
    return j < ranges_ ? first_[static_cast<size_t>(j)] : -1;
  }

 private:
  static uint64_t Pack(int64_t front, int64_t back) {
    return static_cast<uint64_t>(front) << 32 | static_cast<uint64_t>(back);
  }
  static int64_t Front(uint64_t b) { return static_cast<int64_t>(b >> 32); }
  static int64_t Back(uint64_t b) { return static_cast<int64_t>(b & 0xffffffffu); }
  int64_t Take(int64_t j, bool from_back) {
    uint64_t b = bounds_[j].load(std::memory_order_relaxed);
    for (;;) {
      const int64_t f = Front(b), e = Back(b);
      if (f >= e) return -1;
      const uint64_t next = from_back ? Pack(f, e - 1) : Pack(f + 1, e);
      if (bounds_[j].compare_exchange_weak(b, next, std::memory_order_relaxed)) return from_back ? e - 1 : f;
    }
  }

  int64_t ranges_ = 0;
  std::vector<int64_t> first_;
  std::unique_ptr<std::atomic<uint64_t>[]> bounds_;  // per range: front << 32 | back
  std::atomic<int64_t> fresh_{0};                     // the next untouched range
};

// A phase's tasks: `count` of them (kEndPass: no more phases), claimed from a shared counter,
// or in `ranges` (reset by the step that sizes the phase).
struct PhaseTasks {
  static constexpr int64_t kEndPass = -2;
  PhaseTasks(int64_t n) : count(n) {}  // NOLINT(google-explicit-constructor): a count alone
  PhaseTasks(int64_t n, TaskRanges* r) : count(n), ranges(r) {}
  int64_t count;
  TaskRanges* ranges = nullptr;
};

// Runs up to `phases` phases: phase 0 has `first` tasks; task(p, i, next) runs task i of phase
// p, `next` being the task the same thread will likely run after it in a phase of ranges (-1:
// unknown); after(p) runs once phase p is complete, on one thread, and returns phase p + 1's
// tasks (its return value after the last phase is ignored; kEndPass ends the pass there).
// Phases with no task are allowed: their step runs right after the previous one's.
template <typename Task, typename After>
void RunPhases(const Ort::KernelContext& ctx, int phases, PhaseTasks first, const Task& task, const After& after) {
  constexpr int64_t kUnsized = -1;
  struct PhaseState {
    std::atomic<int64_t> count{kUnsized}, next{0}, done{0};
    TaskRanges* ranges = nullptr;  // published by count's release store
  };
  std::unique_ptr<PhaseState[]> state(new PhaseState[static_cast<size_t>(std::max(phases, 1))]);
  std::atomic<bool> failed{false};
  std::mutex error_mutex;
  std::exception_ptr error;
  auto fail = [&] {
    std::lock_guard<std::mutex> lock(error_mutex);
    if (!error) error = std::current_exception();
    failed.store(true, std::memory_order_release);
  };
  auto publish = [&](int p, const PhaseTasks& t) {
    state[p].ranges = t.ranges;
    state[p].count.store(t.count, std::memory_order_release);
  };
  // After phase p is complete: its step, then those of the empty phases after it.
  auto finish = [&](int p) {
    for (; p < phases; ++p) {
      const PhaseTasks next = after(p);
      if (p + 1 >= phases) return;
      publish(p + 1, next);
      if (next.count != 0) return;
    }
  };
  publish(0, first);
  if (first.count == 0) {  // no member would finish phase 0: its step runs here
    try {
      finish(0);
    } catch (...) {
      fail();
    }
  }
  // Enough members for every thread of the pool; the surplus find nothing to claim. At most one
  // thread a CPU takes part: waiting threads spin, and a pool larger than the machine (4 threads
  // on 2 cores) took twice the time of one ParallelFor per phase while they did. Any number of
  // members finishes the pass: tasks are claimed, not assigned.
  constexpr size_t kMembers = 64;
  static const int cpus = AvailableCpus();
  std::atomic<int> members{0};
  if (!failed.load() && first.count != PhaseTasks::kEndPass) {
    ParallelFor(ctx, kMembers, [&](size_t) {
      if (members.fetch_add(1, std::memory_order_relaxed) >= cpus) return;
      for (int p = 0; p < phases && !failed.load(std::memory_order_relaxed); ++p) {
        int64_t count;
        for (int spins = 0; (count = state[p].count.load(std::memory_order_acquire)) == kUnsized; ++spins) {
          if (failed.load(std::memory_order_relaxed)) return;
          WaitPause(spins);
        }
        if (count == PhaseTasks::kEndPass) return;
        TaskRanges* ranges = state[p].ranges;
        TaskRanges::Cursor cursor;
        for (;;) {
          const int64_t i = ranges ? ranges->Claim(cursor) : state[p].next.fetch_add(1, std::memory_order_relaxed);
          if (i < 0 || i >= count) break;
          try {
            task(p, i, ranges ? ranges->Next(cursor) : int64_t{-1});
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
