# Resolve DSMOE_WITH_CUDA (ON / OFF / AUTO) into DSMOE_CUDA_ENABLED and, when
# enabled, turn on CMake's CUDA language for DSMOE_CUDA_ARCHITECTURES.
#
# The CUDA kernels (custom_ops/cuda/*.cu) link the CUDA runtime statically
# (CUDA::cudart_static, its symbols kept local by the version script), so the
# op library has no CUDA library in DT_NEEDED and loads on machines without a
# GPU or a CUDA install; the runtime opens the driver (libcuda.so.1) lazily, on
# the first CUDA call, which only a CUDA EP session makes.
include(CheckLanguage)

set(DSMOE_CUDA_ARCHITECTURES "80-real;89-real;90" CACHE STRING
    "CUDA architectures of the kernels (CMAKE_CUDA_ARCHITECTURES syntax; 90 = sm_90 code + compute_90 PTX)")

set(DSMOE_CUDA_ENABLED OFF)
string(TOUPPER "${DSMOE_WITH_CUDA}" _want)
if(_want STREQUAL "AUTO" OR _want STREQUAL "ON")
  check_language(CUDA)
  if(CMAKE_CUDA_COMPILER)
    set(DSMOE_CUDA_ENABLED ON)
  elseif(_want STREQUAL "ON")
    message(FATAL_ERROR "DSMOE_WITH_CUDA=ON but no CUDA compiler was found (set CMAKE_CUDA_COMPILER or CUDACXX)")
  endif()
elseif(NOT _want STREQUAL "OFF")
  message(FATAL_ERROR "DSMOE_WITH_CUDA must be ON, OFF or AUTO, got '${DSMOE_WITH_CUDA}'")
endif()

if(DSMOE_CUDA_ENABLED)
  if(NOT CMAKE_CUDA_ARCHITECTURES)
    set(CMAKE_CUDA_ARCHITECTURES "${DSMOE_CUDA_ARCHITECTURES}")
  endif()
  enable_language(CUDA)
  find_package(CUDAToolkit REQUIRED)
  message(STATUS "CUDA: kernels for ${CMAKE_CUDA_ARCHITECTURES} with ${CMAKE_CUDA_COMPILER} "
                 "(CUDA ${CUDAToolkit_VERSION}, static runtime)")
else()
  message(STATUS "CUDA: off; custom_ops/cuda registers nothing")
endif()
