// The C++ / ONNX Runtime boundary: every exception becomes an OrtStatus.
#pragma once

#include <exception>
#include <new>
#include <string>

#include "common/ffn_params.h"

namespace dsmoe {

// Runs f() and returns nullptr, or the error as a status (ORT owns it).
// Nothing may escape: an exception crossing ORT's C API would abort.
template <typename F>
OrtStatus* StatusFromCall(F&& f) noexcept {
  try {
    f();
    return nullptr;
  } catch (const Ort::Exception& e) {
    return Ort::Status(e).release();
  } catch (const std::bad_alloc&) {
    return Ort::Status((std::string(kOpName) + ": out of memory").c_str(), ORT_FAIL).release();
  } catch (const std::exception& e) {
    return Ort::Status((std::string(kOpName) + ": " + e.what()).c_str(), ORT_FAIL).release();
  } catch (...) {
    return Ort::Status((std::string(kOpName) + ": unknown error").c_str(), ORT_FAIL).release();
  }
}

}  // namespace dsmoe
