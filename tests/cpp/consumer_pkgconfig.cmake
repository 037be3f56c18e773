# ctest: build examples/cpp/main.cpp with nothing but the compiler and
# `pkg-config --cflags --libs bnorm` from the installed PREFIX, run it, check its output.
# cmake -DPKG_CONFIG=... -DPREFIX=... -DLIBDIR=... -DCXX=... -DSOURCE=... -DOUTPUT=... -DVERSION=... -P consumer_pkgconfig.cmake
set(ENV{PKG_CONFIG_PATH} "${PREFIX}/${LIBDIR}/pkgconfig")
unset(ENV{PKG_CONFIG_LIBDIR})
function(pkg_config out)
  execute_process(COMMAND "${PKG_CONFIG}" ${ARGN} bnorm RESULT_VARIABLE rc
                  OUTPUT_VARIABLE text ERROR_VARIABLE err OUTPUT_STRIP_TRAILING_WHITESPACE)
  if(NOT rc EQUAL 0)
    message(FATAL_ERROR "pkg-config ${ARGN} bnorm failed: ${err}")
  endif()
  message(STATUS "pkg-config ${ARGN} bnorm: ${text}")
  set(${out} "${text}" PARENT_SCOPE)
endfunction()

pkg_config(version --modversion)
if(NOT version STREQUAL VERSION)
  message(FATAL_ERROR "bnorm.pc has version ${version}, expected ${VERSION}")
endif()
pkg_config(cflags --cflags)
pkg_config(libs --libs)
get_filename_component(real_prefix "${PREFIX}" REALPATH)
if(NOT cflags MATCHES "${PREFIX}" AND NOT cflags MATCHES "${real_prefix}")
  message(FATAL_ERROR "--cflags does not point into the (moved) prefix ${PREFIX}")
endif()
separate_arguments(cflags UNIX_COMMAND "${cflags}")
separate_arguments(libs UNIX_COMMAND "${libs}")

get_filename_component(dir "${OUTPUT}" DIRECTORY)
file(MAKE_DIRECTORY "${dir}")
# The rpath is for a shared libbnorm; harmless with the static one.
execute_process(COMMAND "${CXX}" -std=c++17 -O2 ${cflags} "${SOURCE}" -o "${OUTPUT}" ${libs}
                        "-Wl,-rpath,${PREFIX}/${LIBDIR}"
                RESULT_VARIABLE rc)
if(NOT rc EQUAL 0)
  message(FATAL_ERROR "compiling the example with pkg-config's flags failed")
endif()
execute_process(COMMAND "${OUTPUT}" RESULT_VARIABLE rc OUTPUT_VARIABLE out ERROR_VARIABLE out)
message("${out}")
if(NOT rc EQUAL 0 OR NOT out MATCHES "bnorm example: OK")
  message(FATAL_ERROR "the example built with pkg-config failed (${rc})")
endif()
