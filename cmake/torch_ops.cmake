# bnorm.torch's operator library (python/bnorm/_torch_ops.cpp): the C++ eager path of the
# PyTorch adapter, built against the PyTorch it will run with. PyTorch's C++ ABI changes
# between releases, so the library is only built from source for a given torch (never in
# the wheels) and bnorm.torch loads it only when torch.__version__ is the one it was built
# with (recorded next to it, _torch_ops.version); otherwise it runs the same computation
# through Python. pip's isolated build environment has no torch, so AUTO builds it only when
# the build Python has torch; to build it:
#   pip install --no-build-isolation .                                   (torch in the build Python), or
#   pip install . -Ccmake.define.BNORM_TORCH_OPS_PYTHON=$(command -v python)  (a Python with torch)
set(BNORM_TORCH_OPS AUTO CACHE STRING
    "Build bnorm.torch's C++ operator library: AUTO (where a Python with torch is found), ON or OFF")
set_property(CACHE BNORM_TORCH_OPS PROPERTY STRINGS AUTO ON OFF)
set(BNORM_TORCH_OPS_PYTHON "" CACHE FILEPATH
    "The Python whose torch the operator library is built against (default: the build Python)")

if(NOT BNORM_TORCH_OPS STREQUAL "OFF" AND NOT WIN32)
  # AUTO asks the build environment as it is: pip's isolated build (the wheels) points
  # PYTHONPATH at packages without torch, even where the Python it runs on has torch, so no
  # wheel gets the library. A Python named in BNORM_TORCH_OPS_PYTHON is asked with
  # PYTHONPATH unset, i.e. with its own packages.
  set(torch_python "${BNORM_TORCH_OPS_PYTHON}")
  set(torch_probe_env "")
  if(torch_python)
    set(torch_probe_env --unset=PYTHONPATH)
  else()
    set(torch_python "${Python_EXECUTABLE}")
  endif()
  execute_process(
    COMMAND "${CMAKE_COMMAND}" -E env ${torch_probe_env} "${torch_python}" -c
            "import os, torch; print(torch.__version__); print(os.path.dirname(torch.__file__)); print(int(torch._C._GLIBCXX_USE_CXX11_ABI))"
    OUTPUT_VARIABLE torch_probe OUTPUT_STRIP_TRAILING_WHITESPACE RESULT_VARIABLE torch_probe_result
    ERROR_VARIABLE torch_probe_error ERROR_STRIP_TRAILING_WHITESPACE)
  if(torch_probe_result EQUAL 0)
    string(REPLACE "\n" ";" torch_probe "${torch_probe}")
    list(GET torch_probe 0 BNORM_TORCH_VERSION)
    list(GET torch_probe 1 torch_dir)
    list(GET torch_probe 2 torch_cxx11_abi)
    unset(BNORM_TORCH_C10 CACHE)  # (found again each time: BNORM_TORCH_OPS_PYTHON may name another torch)
    unset(BNORM_TORCH_CPU CACHE)
    find_library(BNORM_TORCH_C10 c10 PATHS "${torch_dir}/lib" NO_DEFAULT_PATH)
    find_library(BNORM_TORCH_CPU torch_cpu PATHS "${torch_dir}/lib" NO_DEFAULT_PATH)
  endif()
  if(BNORM_TORCH_VERSION AND BNORM_TORCH_C10 AND BNORM_TORCH_CPU AND EXISTS "${torch_dir}/include/torch/library.h")
    add_library(_torch_ops MODULE python/bnorm/_torch_ops.cpp)
    # SYSTEM: PyTorch's headers are not ours to warn about
    target_include_directories(_torch_ops SYSTEM PRIVATE "${torch_dir}/include"
                               "${torch_dir}/include/torch/csrc/api/include")
    target_include_directories(_torch_ops PRIVATE ${CMAKE_CURRENT_SOURCE_DIR}/python/bnorm)
    target_compile_definitions(_torch_ops PRIVATE _GLIBCXX_USE_CXX11_ABI=${torch_cxx11_abi})
    target_compile_options(_torch_ops PRIVATE -O2 -Wall -Wextra)
    # libc10 and libtorch_cpu are loaded by `import torch` before this library: no RPATH
    target_link_libraries(_torch_ops PRIVATE "${BNORM_TORCH_C10}" "${BNORM_TORCH_CPU}")
    set_target_properties(_torch_ops PROPERTIES PREFIX "" CXX_VISIBILITY_PRESET hidden
                          VISIBILITY_INLINES_HIDDEN ON SKIP_BUILD_RPATH ON)
    file(GENERATE OUTPUT ${CMAKE_CURRENT_BINARY_DIR}/_torch_ops.version CONTENT "${BNORM_TORCH_VERSION}\n")
    install(TARGETS _torch_ops LIBRARY DESTINATION bnorm)
    install(FILES ${CMAKE_CURRENT_BINARY_DIR}/_torch_ops.version DESTINATION bnorm)
    message(STATUS "bnorm: bnorm.torch's operator library ON (torch ${BNORM_TORCH_VERSION}, ${torch_dir})")
  elseif(BNORM_TORCH_OPS STREQUAL "ON")
    string(REGEX REPLACE ".*\n" "" torch_probe_error "${torch_probe_error}")  # the exception's line
    message(FATAL_ERROR "BNORM_TORCH_OPS=ON but ${torch_python} has no torch with its C++ headers "
                        "(${torch_probe_error}): install torch there or set BNORM_TORCH_OPS_PYTHON to a Python that has it")
  else()
    message(STATUS "bnorm: bnorm.torch's operator library OFF (no torch in ${torch_python}); "
                   "bnorm.torch runs its Python path")
  endif()
endif()
