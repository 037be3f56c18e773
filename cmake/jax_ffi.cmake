# XLA FFI handlers for bnorm.jax (python/bnorm/_jax_ffi.cpp), compiled into the _core module
# when XLA's FFI headers are available. They are header-only and ship with jaxlib
# (jax.ffi.include_dir()); pip's isolated build environment has no jax, so the default
# AUTO builds without them there. To build them:
#   pip install --no-build-isolation .                          (jax in the build Python), or
#   pip install . -Ccmake.define.BNORM_JAX_FFI_INCLUDE_DIR=$(python -c "import jax.ffi; print(jax.ffi.include_dir())")
set(BNORM_JAX_FFI AUTO CACHE STRING
    "Compile the XLA FFI handlers of bnorm.jax: AUTO (where XLA's FFI headers are found), ON or OFF")
set_property(CACHE BNORM_JAX_FFI PROPERTY STRINGS AUTO ON OFF)
set(BNORM_JAX_FFI_INCLUDE_DIR "" CACHE PATH
    "XLA FFI headers (jax.ffi.include_dir()); found through the build Python's jax when empty")

if(NOT BNORM_JAX_FFI STREQUAL "OFF")
  if(NOT BNORM_JAX_FFI_INCLUDE_DIR)
    execute_process(COMMAND "${Python_EXECUTABLE}" -c "import jax.ffi; print(jax.ffi.include_dir())"
                    OUTPUT_VARIABLE BNORM_JAX_FFI_FOUND_DIR OUTPUT_STRIP_TRAILING_WHITESPACE
                    RESULT_VARIABLE BNORM_JAX_FFI_PROBE ERROR_QUIET)
    if(BNORM_JAX_FFI_PROBE EQUAL 0)
      set(BNORM_JAX_FFI_INCLUDE_DIR "${BNORM_JAX_FFI_FOUND_DIR}")
    endif()
  endif()
  if(BNORM_JAX_FFI_INCLUDE_DIR AND EXISTS "${BNORM_JAX_FFI_INCLUDE_DIR}/xla/ffi/api/ffi.h")
    target_sources(_core PRIVATE ${CMAKE_CURRENT_SOURCE_DIR}/python/bnorm/_jax_ffi.cpp)
    # SYSTEM: XLA's headers are not ours to warn about
    target_include_directories(_core SYSTEM PRIVATE "${BNORM_JAX_FFI_INCLUDE_DIR}")
    target_compile_definitions(_core PRIVATE BNORM_JAX_FFI=1)
    message(STATUS "bnorm: XLA FFI handlers for bnorm.jax ON (${BNORM_JAX_FFI_INCLUDE_DIR})")
  elseif(BNORM_JAX_FFI STREQUAL "ON")
    message(FATAL_ERROR "BNORM_JAX_FFI=ON but XLA's FFI headers were not found: install jax in the "
                        "build Python or set BNORM_JAX_FFI_INCLUDE_DIR to jax.ffi.include_dir()")
  else()
    message(STATUS "bnorm: XLA FFI handlers for bnorm.jax OFF (no jax in the build Python)")
  endif()
endif()
