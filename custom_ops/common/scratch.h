// Per-call scratch memory from ONNX Runtime's allocator for a device (the
// session's arena unless it is disabled), returned when the call ends: the
// arena keeps the chunks, so later calls reuse them instead of mapping fresh
// pages (CPU: page faults and zeroing cost about 1 ms per 10 MB, every call).
#pragma once

#include <cstddef>
#include <stdexcept>
#include <string>

#include "common/ffn_params.h"

namespace dsmoe {

class Scratch {
 public:
  Scratch(const Ort::KernelContext& ctx, const OrtMemoryInfo& memory, size_t bytes, const char* what)
      : allocator_(ctx.GetAllocator(memory)) {
    if (bytes == 0) return;
    data_ = allocator_->Alloc(allocator_, bytes);
    if (data_ == nullptr) {
      Release();
      // std::runtime_error: the op's adapter names the op (StatusFromCall), with ORT_FAIL.
      throw std::runtime_error("could not allocate " + std::to_string(bytes) + " bytes of " + std::string(what) +
                               " scratch memory");
    }
  }
  ~Scratch() { Release(); }
  Scratch(Scratch&& other) noexcept : allocator_(other.allocator_), data_(other.data_) {
    other.allocator_ = nullptr;
    other.data_ = nullptr;
  }
  Scratch(const Scratch&) = delete;
  Scratch& operator=(const Scratch&) = delete;
  Scratch& operator=(Scratch&&) = delete;
  void* data() const { return data_; }

 private:
  void Release() {
    if (allocator_ == nullptr) return;
    if (data_ != nullptr) allocator_->Free(allocator_, data_);
    Ort::GetApi().ReleaseAllocator(allocator_);
    allocator_ = nullptr;
    data_ = nullptr;
  }
  OrtAllocator* allocator_ = nullptr;
  void* data_ = nullptr;
};

// A Scratch of `count` elements of T (uninitialised).
template <typename T>
class ScratchArray {
 public:
  ScratchArray(const Ort::KernelContext& ctx, const OrtMemoryInfo& memory, int64_t count, const char* what)
      : scratch_(ctx, memory, static_cast<size_t>(count > 0 ? count : 0) * sizeof(T), what) {}
  T* get() const { return static_cast<T*>(scratch_.data()); }
  T& operator[](int64_t i) const { return get()[i]; }

 private:
  Scratch scratch_;
};

}  // namespace dsmoe
