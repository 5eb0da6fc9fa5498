# Locate the ONNX Runtime C/C++ API headers; sets DSMOE_ORT_INCLUDE_DIR (the
# folder holding onnxruntime_c_api.h) and DSMOE_ORT_API_VERSION. Only headers are needed: the op library never
# links against libonnxruntime (ORT_API_MANUAL_INIT, see custom_ops/register.cc).
#
# Order: 1. ORT_INCLUDE_DIR (cache variable or environment variable), which
# must then be right; 2. a system install; 3. cmake/fetch_ort_headers.sh
# (Debian's libonnxruntime-dev, verified, cached per user).

# Oldest API the kernels use: KernelContext::ParallelFor (1.17), status-returning
# custom ops (1.16). The runtime loading the library must be at least as new as
# the headers it was built with (checked in RegisterCustomOps).
set(DSMOE_ORT_MIN_API_VERSION 17)

function(_dsmoe_ort_api_version dir out_var)
  file(STRINGS "${dir}/onnxruntime_c_api.h" _line REGEX "^#define ORT_API_VERSION [0-9]+")
  string(REGEX REPLACE ".* ([0-9]+)$" "\\1" _ver "${_line}")
  set(${out_var} "${_ver}" PARENT_SCOPE)
endfunction()

function(_dsmoe_usable_ort_headers dir out_var)
  set(${out_var} FALSE PARENT_SCOPE)
  if(EXISTS "${dir}/onnxruntime_c_api.h" AND EXISTS "${dir}/onnxruntime_cxx_api.h")
    _dsmoe_ort_api_version("${dir}" _ver)
    if(_ver AND _ver GREATER_EQUAL DSMOE_ORT_MIN_API_VERSION)
      set(${out_var} TRUE PARENT_SCOPE)
    endif()
  endif()
endfunction()

set(ORT_INCLUDE_DIR "" CACHE PATH
    "ONNX Runtime include dir (holds onnxruntime_c_api.h); empty: env ORT_INCLUDE_DIR, a system install, else fetch")
set(_dir "${ORT_INCLUDE_DIR}")
if(NOT _dir AND DEFINED ENV{ORT_INCLUDE_DIR})
  set(_dir "$ENV{ORT_INCLUDE_DIR}")
endif()

if(_dir)
  # Explicit choice: never fall back silently to other headers.
  _dsmoe_usable_ort_headers("${_dir}" _ok)
  if(NOT _ok)
    message(FATAL_ERROR
      "ORT_INCLUDE_DIR=${_dir} holds no usable ONNX Runtime headers "
      "(need onnxruntime_c_api.h and onnxruntime_cxx_api.h with ORT_API_VERSION >= ${DSMOE_ORT_MIN_API_VERSION}).")
  endif()
  set(_source "ORT_INCLUDE_DIR")
else()
  find_path(_DSMOE_SYSTEM_ORT_INCLUDE onnxruntime_c_api.h
    PATH_SUFFIXES onnxruntime onnxruntime/core/session include/onnxruntime
    PATHS /usr/include /usr/local/include /opt/homebrew/include /opt/onnxruntime/include
    NO_CACHE)
  if(_DSMOE_SYSTEM_ORT_INCLUDE)
    _dsmoe_usable_ort_headers("${_DSMOE_SYSTEM_ORT_INCLUDE}" _ok)
    if(_ok)
      set(_dir "${_DSMOE_SYSTEM_ORT_INCLUDE}")
      set(_source "system install")
    else()
      message(STATUS "Ignoring ONNX Runtime headers in ${_DSMOE_SYSTEM_ORT_INCLUDE} (too old or incomplete)")
    endif()
  endif()
endif()

if(NOT _dir)
  if(DEFINED ENV{XDG_CACHE_HOME} AND NOT "$ENV{XDG_CACHE_HOME}" STREQUAL "")
    set(_cache_root "$ENV{XDG_CACHE_HOME}")
  else()
    set(_cache_root "$ENV{HOME}/.cache")
  endif()
  set(DSMOE_ORT_HEADER_CACHE "${_cache_root}/dsmoe-export/ort-headers-1.21.0" CACHE PATH
      "Where cmake/fetch_ort_headers.sh keeps the downloaded headers")
  message(STATUS "ONNX Runtime headers: none given or installed; fetching into ${DSMOE_ORT_HEADER_CACHE}")
  execute_process(
    COMMAND sh "${CMAKE_CURRENT_LIST_DIR}/fetch_ort_headers.sh" "${DSMOE_ORT_HEADER_CACHE}"
    RESULT_VARIABLE _rc
    OUTPUT_VARIABLE _out
    OUTPUT_STRIP_TRAILING_WHITESPACE)
  if(_rc EQUAL 0)
    string(REGEX REPLACE ".*\n" "" _fetched "${_out}")
    _dsmoe_usable_ort_headers("${_fetched}" _ok)
  else()
    set(_ok FALSE)
  endif()
  if(NOT _ok)
    message(FATAL_ERROR
      "No ONNX Runtime headers found. Tried: ORT_INCLUDE_DIR (unset), a system install "
      "(onnxruntime/onnxruntime_c_api.h under /usr/include, /usr/local/include, ...), and "
      "cmake/fetch_ort_headers.sh (exit code ${_rc}; its messages are above). Fix: pass "
      "-DORT_INCLUDE_DIR=<dir> or set the environment variable ORT_INCLUDE_DIR to a folder that "
      "holds onnxruntime_c_api.h and onnxruntime_cxx_api.h (the include/ folder of an official "
      "onnxruntime release archive, 1.17 or newer), or install Debian's libonnxruntime-dev.")
  endif()
  set(_dir "${_fetched}")
  set(_source "fetched, cached")
endif()

set(DSMOE_ORT_INCLUDE_DIR "${_dir}")
_dsmoe_ort_api_version("${_dir}" DSMOE_ORT_API_VERSION)
message(STATUS "ONNX Runtime headers: ${_dir} (${_source}, ORT_API_VERSION ${DSMOE_ORT_API_VERSION})")
