# dsmoe_add_cpu_kernels(target source ort_include_dir [OPS_DIR dir] [OPTIONS opt...]):
# builds `source` once per instruction set as an object library (namespace
# dsmoe::cpu::<isa>) and adds the objects and DSMOE_HAVE_<ISA> definitions to
# `target`. OPS_DIR: the custom_ops/ folder the sources include from (default: this
# project's); OPTIONS: extra compile options (the fuzz target's sanitizers).
function(dsmoe_add_cpu_kernels target source ort_include_dir)
  cmake_parse_arguments(PARSE_ARGV 3 _arg "" "OPS_DIR" "OPTIONS")
  if(NOT _arg_OPS_DIR)
    set(_arg_OPS_DIR "${CMAKE_CURRENT_SOURCE_DIR}/custom_ops")
  endif()
  set(_isas baseline)
  set(_flags_baseline "")
  if(CMAKE_CXX_COMPILER_ID MATCHES "GNU|Clang" AND CMAKE_SYSTEM_PROCESSOR MATCHES "x86_64|AMD64|amd64")
    list(APPEND _isas avx2 avx512)
    set(_flags_avx2 -mavx2 -mfma -mf16c)  # F16C: float16 weights (every AVX2 CPU has it)
    set(_flags_avx512 -mavx512f -mavx512vl -mavx2 -mfma)
  endif()
  get_filename_component(_stem ${source} NAME_WE)
  foreach(_isa IN LISTS _isas)
    set(_obj ${target}_${_stem}_${_isa})
    add_library(${_obj} OBJECT ${source})
    target_include_directories(${_obj} PRIVATE "${_arg_OPS_DIR}")
    target_include_directories(${_obj} SYSTEM PRIVATE "${ort_include_dir}")
    target_compile_features(${_obj} PRIVATE cxx_std_17)
    target_compile_definitions(${_obj} PRIVATE DSMOE_ISA=${_isa} ORT_API_MANUAL_INIT)
    set_target_properties(${_obj} PROPERTIES POSITION_INDEPENDENT_CODE ON CXX_EXTENSIONS OFF
                          CXX_VISIBILITY_PRESET hidden VISIBILITY_INLINES_HIDDEN ON)
    if(CMAKE_CXX_COMPILER_ID MATCHES "GNU|Clang")
      # ISO C++ mode turns off FMA contraction in GCC; the kernels are written for it.
      target_compile_options(${_obj} PRIVATE -Wall -Wextra -ffp-contract=fast ${_flags_${_isa}}
                             $<$<CONFIG:Release>:-O3> ${_arg_OPTIONS})
    endif()
    target_sources(${target} PRIVATE $<TARGET_OBJECTS:${_obj}>)
    string(TOUPPER ${_isa} _ISA)
    target_compile_definitions(${target} PRIVATE DSMOE_HAVE_${_ISA})
  endforeach()
endfunction()

# dsmoe_add_int4_int8_dot(target source... [OPTIONS opt...]): the int4 x int8 kernels of
# accuracy_level 4 (cpu/int4_int8_dot.cc: the decode GEMV, cpu/int4_int8_gemm.cc: the prefill's
# slab GEMM), x86-64 GCC / Clang only, built with AVX-512 BW + VNNI and defining
# DSMOE_HAVE_INT4_INT8_DOT on `target` (cpu/int8_activations.cc picks them at run time when the
# CPU has them).
function(dsmoe_add_int4_int8_dot target)
  cmake_parse_arguments(PARSE_ARGV 1 _arg "" "" "OPTIONS")
  if(NOT (CMAKE_CXX_COMPILER_ID MATCHES "GNU|Clang" AND CMAKE_SYSTEM_PROCESSOR MATCHES "x86_64|AMD64|amd64"))
    return()
  endif()
  target_sources(${target} PRIVATE ${_arg_UNPARSED_ARGUMENTS})
  set_source_files_properties(${_arg_UNPARSED_ARGUMENTS} TARGET_DIRECTORY ${target} PROPERTIES COMPILE_OPTIONS
    "-mavx512f;-mavx512bw;-mavx512vl;-mavx512vnni;-mfma;-Wall;-Wextra;${_arg_OPTIONS}")
  target_compile_definitions(${target} PRIVATE DSMOE_HAVE_INT4_INT8_DOT)
endfunction()
