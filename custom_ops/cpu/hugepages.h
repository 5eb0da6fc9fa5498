// Asks Linux to back weight tensors with 2 MB pages.
//
// ORT copies the initializers into its own memory on 4 KB pages. The prefill's
// down tiles read V's rows d floats apart, a new page per row, so every row
// copied is a TLB miss; on 2 MB pages the op ran 3.6 % faster at d = 2048,
// T = 256 (docs/cpu-kernel-notes.md #17), and the converted SmolLM2's cold
// decode steps took 4-6 % less with all of its float32 op's weights there (#43;
// the quantized ops' weights and scales go there too). The price is paid at
// session creation: MADV_COLLAPSE copies the weights into huge pages there (138
// MB of weights: +26 to +243 ms, the first time in a process the slowest; the
// converted SmolLM2's float32 export, 332 MB on 2 MB pages: 1.80-2.23 s to
// create a session against 1.36-1.64 s with the aligned middles of its weights
// only, 126 MB). Advisory only: the contents do not change, and any failure
// (other OS, THP off, no free huge pages, a read-only file mapping) leaves the
// memory as it was.
#pragma once

#include <cstddef>
#include <initializer_list>
#include <vector>

#include "onnxruntime_cxx_api.h"

namespace dsmoe::cpu {

struct HugePageRange {
  const void* data;
  size_t bytes;
};

// MADV_HUGEPAGE, then MADV_COLLAPSE (Linux 6.1+: done now, not some time later), on the 2 MB
// pages that one of the ranges fills, and on the pages of their unaligned ends where the ranges
// together fill at least a quarter of the page and at least 90 % of the page's small pages are
// resident (the rest of such a page is other memory of the process, which a collapse makes
// resident). Returns the number of 2 MB pages collapsed. Off with DSMOE_HUGEPAGES=0, or while
// SetHugePageAdvice(false) holds.
size_t AdviseHugePages(const std::vector<HugePageRange>& ranges);

// Process-wide switch of AdviseHugePages for the sessions created from now on (on by default);
// returns the previous setting. dsmoe_runtime turns it off while it creates a session whose new
// memory it moves to huge pages itself, in the background (DsmoeOpsSetHugePageAdvice, register.cc).
bool SetHugePageAdvice(bool enabled);

// AdviseHugePages on those of the node's `inputs` that are constant (initializers), together (a
// quantized op's weights and scales are each under 2 MB but share their pages): at session
// creation (a kernel's Prepare). Inputs fed at run time are the caller's memory.
void AdviseConstantInputs(const Ort::ConstKernelInfo& info, std::initializer_list<size_t> inputs);

}  // namespace dsmoe::cpu
