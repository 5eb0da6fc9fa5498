// The C++ / ONNX Runtime boundary: every exception becomes an OrtStatus.
#pragma once

#include <exception>
#include <new>
#include <string>
#include <utility>

#include "common/ffn_params.h"

namespace dsmoe {

// Runs f() and returns nullptr, or the error as a status (ORT owns it) naming `op`
// (an Ort::Exception is passed on as it is: ORT's own, or one that names its op).
// Nothing may escape: an exception crossing ORT's C API would abort.
template <typename F>
OrtStatus* StatusFromCall(const char* op, F&& f) noexcept {
  try {
    f();
    return nullptr;
  } catch (const Ort::Exception& e) {
    return Ort::Status(e).release();
  } catch (const InvalidArgument& e) {
    return Ort::Status((std::string(op) + ": " + e.what()).c_str(), ORT_INVALID_ARGUMENT).release();
  } catch (const std::bad_alloc&) {
    return Ort::Status((std::string(op) + ": out of memory").c_str(), ORT_FAIL).release();
  } catch (const std::exception& e) {
    return Ort::Status((std::string(op) + ": " + e.what()).c_str(), ORT_FAIL).release();
  } catch (...) {
    return Ort::Status((std::string(op) + ": unknown error").c_str(), ORT_FAIL).release();
  }
}

template <typename F>
OrtStatus* StatusFromCall(F&& f) noexcept {
  return StatusFromCall(kOpName, std::forward<F>(f));
}

}  // namespace dsmoe
