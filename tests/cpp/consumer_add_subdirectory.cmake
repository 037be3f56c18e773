# ctest: configure examples/cpp with bnorm's source tree as a subproject (add_subdirectory),
# build it with JOBS parallel jobs and run the example. (ctest --build-and-test cannot build
# in parallel: it drops MAKEFLAGS and ignores CMAKE_BUILD_PARALLEL_LEVEL.)
# cmake -DSOURCE=examples/cpp -DBINARY=... -DBNORM_SOURCE_DIR=... -DGENERATOR=... -DCXX=...
#       -DBUILD_TYPE=... -DCONFIG=... -DJOBS=... -P consumer_add_subdirectory.cmake
function(run what)
  execute_process(COMMAND ${ARGN} RESULT_VARIABLE rc OUTPUT_VARIABLE out ERROR_VARIABLE out)
  if(NOT rc EQUAL 0)
    message(FATAL_ERROR "${what} failed:\n${out}")
  endif()
  set(output "${out}" PARENT_SCOPE)
endfunction()

set(configure_args -S "${SOURCE}" -B "${BINARY}" -G "${GENERATOR}" "-DCMAKE_CXX_COMPILER=${CXX}"
                   "-DBNORM_SOURCE_DIR=${BNORM_SOURCE_DIR}" -DBNORM_CUDA=OFF
                   # the baseline kernels only, unoptimized: this tests the subproject, not
                   # the kernels (their -O3 build took most of this test's 36 s)
                   "-DBNORM_KERNEL_ISAS=" -DBNORM_KERNEL_OPTIMIZATION=-O0)
if(BUILD_TYPE)
  list(APPEND configure_args "-DCMAKE_BUILD_TYPE=${BUILD_TYPE}")
endif()
run("configuring examples/cpp with add_subdirectory" "${CMAKE_COMMAND}" ${configure_args})
run("building examples/cpp" "${CMAKE_COMMAND}" --build "${BINARY}" --config "${CONFIG}" --parallel "${JOBS}")
run("the example (ctest in ${BINARY})" "${CMAKE_CTEST_COMMAND}" --test-dir "${BINARY}" -C "${CONFIG}"
    -V)  # -V: the example's own output, which the test matches
message("${output}")
