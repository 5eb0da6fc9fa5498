#include "cpu/cache_blocking.h"

#include <algorithm>
#include <cerrno>
#include <cstdlib>
#include <fstream>
#include <string>

#include "common/ffn_params.h"
#include "cpu/kernels.h"

#if defined(__unix__) || defined(__APPLE__)
#include <unistd.h>
#endif

namespace dsmoe::cpu {
namespace {

constexpr int64_t kDefaultL1d = 32 * 1024;  // the smallest of the machines above: a slice never spills

// "48K", "32768", "1M" (sysfs' cache sizes) -> bytes; 0 when unreadable or over 1 GiB (no L1 is).
int64_t ParseSize(const std::string& text) {
  char* end = nullptr;
  errno = 0;
  const long long value = std::strtoll(text.c_str(), &end, 10);
  if (errno != 0 || end == text.c_str() || value <= 0) return 0;
  const std::string unit(end);
  const int64_t scale = unit.empty() ? 1 : unit == "K" ? 1024 : unit == "M" ? 1024 * 1024 : 0;
  constexpr int64_t kMaxBytes = int64_t{1} << 30;
  if (scale == 0 || value > kMaxBytes / scale) return 0;
  return value * scale;
}

std::string ReadLine(const std::string& path) {
  std::ifstream in(path);
  std::string line;
  std::getline(in, line);
  return line;
}

// The first level-1 data (or unified) cache of cpu0 in sysfs.
int64_t SysfsL1d() {
  for (int index = 0; index < 8; ++index) {
    const std::string dir = "/sys/devices/system/cpu/cpu0/cache/index" + std::to_string(index) + "/";
    const std::string level = ReadLine(dir + "level"), type = ReadLine(dir + "type");
    if (level.empty()) break;
    if (level == "1" && (type == "Data" || type == "Unified")) return ParseSize(ReadLine(dir + "size"));
  }
  return 0;
}

int64_t DetectL1d() {
  if (const char* forced = std::getenv("DSMOE_CPU_L1D_BYTES"); forced != nullptr && *forced != '\0') {
    const int64_t bytes = ParseSize(forced);
    if (bytes <= 0) {
      ThrowInvalidArgument(std::string("DSMOE_CPU_L1D_BYTES=") + forced +
                           ": expected a positive number of bytes up to 1 GiB (e.g. 32768, 32K or 1M)");
    }
    return bytes;
  }
#if defined(_SC_LEVEL1_DCACHE_SIZE)
  if (const long bytes = sysconf(_SC_LEVEL1_DCACHE_SIZE); bytes > 0) return bytes;
#endif
  if (const int64_t bytes = SysfsL1d(); bytes > 0) return bytes;
  return kDefaultL1d;
}

}  // namespace

int64_t L1DataCacheBytes() {
  static const int64_t bytes = DetectL1d();  // a throw leaves it unset: the next call reports again
  return bytes;
}

int64_t SlabSliceSteps() {
  static const int64_t steps = [] {
    const int64_t slice_bytes = L1DataCacheBytes() * 3 / 4;
    const int64_t steps = slice_bytes / (2 * kSlabRows * static_cast<int64_t>(sizeof(float)));
    return std::clamp<int64_t>(steps / 16 * 16, 32, 256);
  }();
  return steps;
}

int64_t PanelSliceFloats() {
  static const int64_t floats = [] {
    const int64_t slice = L1DataCacheBytes() * 2 / 3 / static_cast<int64_t>(sizeof(float));
    return std::clamp<int64_t>(slice / 512 * 512, 2048, 8192);
  }();
  return floats;
}

}  // namespace dsmoe::cpu
