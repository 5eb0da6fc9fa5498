// Cache blocking of the CPU kernels sized from this CPU's caches, so that a kernel tuned on one
// machine keeps its working sets in cache on another (the development machines' L1d: 48 KB on
// the Intel Xeon, 32 KB on AMD Zen 2-4, 64 KB and more on many AArch64 cores).
#pragma once

#include <cstdint>

namespace dsmoe::cpu {

// Bytes of one core's L1 data cache: DSMOE_CPU_L1D_BYTES where set (tests, comparisons; bytes,
// or with a K / M suffix, up to 1 GiB, else an error), else what the OS reports (sysconf, then
// sysfs), else 32 KiB.
// Read once per process; SelectKernels() reads it first, so a bad value fails the session's
// creation, not a run.
int64_t L1DataCacheBytes();

// Steps of k per slice of the slab layout's gate/up tiles (kernels_isa.cc): the slice's
// 2 x steps x kSlabRows floats of gate and up take 3/4 of L1 (the tokens' rows and the sums
// share the rest), in multiples of 16 steps (the tiles' prefetch period), within [32, 256]:
// 144 steps (36 KB) with a 48 KB L1, 96 with 32 KB.
int64_t SlabSliceSteps();

// Floats of the packed panel's k-slice in the packed-panel GEMM tiles (kernels_isa.cc; the rows
// layout's prefill): 2/3 of L1 (the weights stream through the rest), in
// multiples of 512 floats, within [2048, 8192]: 8192 (32 KB) with a 48 KB L1, 5120 with 32 KB.
int64_t PanelSliceFloats();

}  // namespace dsmoe::cpu
