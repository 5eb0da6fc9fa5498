// The library's one exported entry point, called by ONNX Runtime from
// SessionOptions.register_custom_ops_library: creates the "org.dsmoe" domain
// and lets each device add its kernels.
#include <cstdint>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "common/ffn_params.h"
#include "common/status.h"
#include "cpu/cache_blocking.h"
#include "cpu/ffn_cpu.h"
#include "cpu/ffn_cpu_quant.h"
#include "cpu/hugepages.h"
#include "cpu/projected_cpu.h"
#include "cuda/register_cuda.h"

#if defined(_WIN32)
#define DSMOE_EXPORT __declspec(dllexport)
#else
#define DSMOE_EXPORT __attribute__((visibility("default")))
#endif

static_assert(ORT_API_VERSION >= 17, "needs the ONNX Runtime 1.17+ headers (KernelContext::ParallelFor)");

namespace {

// Domains must outlive every session that uses them: keep them for the life
// of the process (one per registration, as ORT's own example library does).
std::mutex domains_mutex;
std::vector<Ort::CustomOpDomain>& Domains() {
  static auto* domains = new std::vector<Ort::CustomOpDomain>();  // never destroyed: ORT may outlive us at exit
  return *domains;
}

}  // namespace

// The ONNX Runtime C API version this library was built against (its headers' ORT_API_VERSION,
// = the minor version of the oldest onnxruntime 1.x that can load it). dsmoe_runtime reads it
// to refuse an older onnxruntime with a clear message before registering; RegisterCustomOps
// refuses it too (below) for applications that register the library themselves.
extern "C" DSMOE_EXPORT int DsmoeOpsOrtApiVersion(void) { return ORT_API_VERSION; }

// The library's own API level (dsmoe_runtime/_library.py): what the runtime may rely on (op
// versions, optional outputs, registration behaviour). Raise it when that changes.
extern "C" DSMOE_EXPORT int DsmoeOpsApiVersion(void) { return 1; }

// The CPU kernels' cache blocking as sized on this machine (cpu/cache_blocking.h), for the
// benchmark's run info and tests: 0, or -1 when DSMOE_CPU_L1D_BYTES is malformed.
extern "C" DSMOE_EXPORT int DsmoeOpsCpuCacheBlocking(int64_t* l1d_bytes, int64_t* slab_slice_steps,
                                                     int64_t* panel_slice_floats) {
  try {
    *l1d_bytes = dsmoe::cpu::L1DataCacheBytes();
    *slab_slice_steps = dsmoe::cpu::SlabSliceSteps();
    *panel_slice_floats = dsmoe::cpu::PanelSliceFloats();
    return 0;
  } catch (...) {
    return -1;
  }
}

// Turns the kernels' huge-page advice at session creation (cpu/hugepages.h) on (1) or off
// (0) for the sessions this process creates from now on; returns the previous setting (1 or 0).
// DSMoESession turns it off while it creates a session whose memory it then moves to huge pages
// itself in the background, where the synchronous advice would only add to the creation time.
extern "C" DSMOE_EXPORT int DsmoeOpsSetHugePageAdvice(int enabled) {
  return dsmoe::cpu::SetHugePageAdvice(enabled != 0) ? 1 : 0;
}

// The huge-page advice the kernels give their constant weights at session creation
// (cpu/hugepages.h), on `count` ranges of the caller's memory (data[i], bytes[i]) taken together as
// one node's weights: the number of 2 MB pages collapsed, or -1 when count > 0 and an array is
// null. For tests, which lay out memory to check which pages it takes, and for callers with weights
// of their own.
extern "C" DSMOE_EXPORT int64_t DsmoeOpsAdviseHugePages(const void* const* data, const size_t* bytes, int64_t count) {
  if (count > 0 && (data == nullptr || bytes == nullptr)) return -1;
  std::vector<dsmoe::cpu::HugePageRange> ranges;
  for (int64_t i = 0; i < count; ++i) ranges.push_back({data[i], bytes[i]});
  return static_cast<int64_t>(dsmoe::cpu::AdviseHugePages(ranges));
}

extern "C" DSMOE_EXPORT OrtStatus* ORT_API_CALL RegisterCustomOps(OrtSessionOptions* options,
                                                                  const OrtApiBase* api_base) {
  const OrtApi* api = api_base->GetApi(ORT_API_VERSION);
  if (api == nullptr) {
    // This runtime is older than the headers the library was built with; the
    // version-1 API can still report it.
    const std::string message = std::string("dsmoe_ops was built against ONNX Runtime API version ") +
                                std::to_string(ORT_API_VERSION) + " but this onnxruntime (" +
                                api_base->GetVersionString() + ") does not provide it; use a newer onnxruntime";
    return api_base->GetApi(1)->CreateStatus(ORT_FAIL, message.c_str());
  }
  Ort::InitApi(api);
  return dsmoe::StatusFromCall([&] {
    Ort::CustomOpDomain domain{dsmoe::kDomain};
    dsmoe::cpu::RegisterOps(domain);
    dsmoe::cpu::RegisterQuantOps(domain);
    dsmoe::cpu::RegisterProjectedOps(domain);
    dsmoe::cuda::RegisterOps(domain);
    std::lock_guard<std::mutex> lock(domains_mutex);
    Domains().push_back(std::move(domain));  // kept first: ORT holds on to the pointer
    Ort::UnownedSessionOptions(options).Add(Domains().back());
  });
}
