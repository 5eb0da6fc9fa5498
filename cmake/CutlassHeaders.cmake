# Resolve DSMOE_WITH_CUTLASS (ON / OFF / AUTO) into DSMOE_CUTLASS_ENABLED and
# DSMOE_CUTLASS_INCLUDE_DIR: the CUTLASS 4.2 headers of the Hopper grouped GEMMs
# (custom_ops/cuda/grouped_gemm_sm90.cu). Only headers; nothing is linked.
#
# Order: 1. CUTLASS_INCLUDE_DIR (cache or environment variable), which must then
# hold cutlass/cutlass.h; 2. cmake/fetch_cutlass_headers.sh (the nvidia-cutlass
# wheel from PyPI, pinned by version and sha256, cached per user). AUTO turns the
# CUTLASS path off, saying why, when neither works; the other CUDA kernels stay.
set(DSMOE_WITH_CUTLASS AUTO CACHE STRING
    "Build the CUTLASS grouped GEMMs (sm_90a): ON, OFF or AUTO (on with CUDA when the headers are found)")
set_property(CACHE DSMOE_WITH_CUTLASS PROPERTY STRINGS AUTO ON OFF)
set(CUTLASS_INCLUDE_DIR "" CACHE PATH "CUTLASS include dir (holds cutlass/cutlass.h); empty: env, else fetch")

set(DSMOE_CUTLASS_ENABLED OFF)
string(TOUPPER "${DSMOE_WITH_CUTLASS}" _want)
if(NOT _want MATCHES "^(AUTO|ON|OFF)$")
  message(FATAL_ERROR "DSMOE_WITH_CUTLASS must be ON, OFF or AUTO, got '${DSMOE_WITH_CUTLASS}'")
endif()

if(DSMOE_CUDA_ENABLED AND NOT _want STREQUAL "OFF")
  if(CMAKE_CUDA_COMPILER_VERSION VERSION_LESS 12.3)
    set(_why "nvcc ${CMAKE_CUDA_COMPILER_VERSION} is older than 12.3 (CUTLASS's SM90 grouped GEMMs need 12.3)")
  else()
    set(_dir "${CUTLASS_INCLUDE_DIR}")
    if(NOT _dir AND DEFINED ENV{CUTLASS_INCLUDE_DIR})
      set(_dir "$ENV{CUTLASS_INCLUDE_DIR}")
    endif()
    if(_dir)
      if(NOT EXISTS "${_dir}/cutlass/cutlass.h" OR NOT EXISTS "${_dir}/cute/tensor.hpp")
        message(FATAL_ERROR "CUTLASS_INCLUDE_DIR=${_dir} holds no cutlass/cutlass.h and cute/tensor.hpp")
      endif()
      set(DSMOE_CUTLASS_INCLUDE_DIR "${_dir}")
    else()
      if(DEFINED ENV{XDG_CACHE_HOME} AND NOT "$ENV{XDG_CACHE_HOME}" STREQUAL "")
        set(_cache_root "$ENV{XDG_CACHE_HOME}")
      else()
        set(_cache_root "$ENV{HOME}/.cache")
      endif()
      set(DSMOE_CUTLASS_CACHE "${_cache_root}/dsmoe-export/cutlass-4.2.0.0" CACHE PATH
          "Where cmake/fetch_cutlass_headers.sh keeps the downloaded headers")
      execute_process(
        COMMAND sh "${CMAKE_CURRENT_LIST_DIR}/fetch_cutlass_headers.sh" "${DSMOE_CUTLASS_CACHE}"
        RESULT_VARIABLE _rc OUTPUT_VARIABLE _out OUTPUT_STRIP_TRAILING_WHITESPACE)
      string(REGEX REPLACE ".*\n" "" _fetched "${_out}")
      if(_rc EQUAL 0 AND EXISTS "${_fetched}/cutlass/cutlass.h")
        set(DSMOE_CUTLASS_INCLUDE_DIR "${_fetched}")
      else()
        set(_why "no CUTLASS headers: CUTLASS_INCLUDE_DIR is unset and cmake/fetch_cutlass_headers.sh failed (exit ${_rc}; its messages are above)")
      endif()
    endif()
  endif()
  if(DSMOE_CUTLASS_INCLUDE_DIR)
    set(DSMOE_CUTLASS_ENABLED ON)
    message(STATUS "CUTLASS: grouped GEMMs for sm_90a with headers in ${DSMOE_CUTLASS_INCLUDE_DIR}")
  elseif(_want STREQUAL "ON")
    message(FATAL_ERROR "DSMOE_WITH_CUTLASS=ON but ${_why}")
  else()
    message(STATUS "CUTLASS: off (${_why}); prefill on Hopper uses the WMMA grouped GEMMs")
  endif()
elseif(_want STREQUAL "ON")
  message(FATAL_ERROR "DSMOE_WITH_CUTLASS=ON needs the CUDA kernels (DSMOE_WITH_CUDA)")
else()
  message(STATUS "CUTLASS: off")
endif()
