# Resolve DSMOE_WITH_CUDA (ON / OFF / AUTO) into DSMOE_CUDA_ENABLED.
#
# The CUDA kernels are not written yet: for now an enabled CUDA build only
# checks that nvcc works and defines DSMOE_WITH_CUDA, and custom_ops/cuda/
# registers nothing either way. The library must keep loading on machines
# without a GPU, so whatever CUDA code is added links cudart statically.
include(CheckLanguage)

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
  # enable_language(CUDA) comes with the kernels; until then nothing is compiled by nvcc.
  message(STATUS "CUDA: nvcc found (${CMAKE_CUDA_COMPILER}); no CUDA kernels yet, the CUDA registration is a stub")
else()
  message(STATUS "CUDA: off; custom_ops/cuda registers nothing")
endif()
