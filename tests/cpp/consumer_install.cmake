# ctest fixture: install the bnorm build BUILD_DIR into STAGE, then move STAGE to PREFIX.
# The move proves the package is relocatable: nothing in it may point back at STAGE.
# CLEAN: the consumers' build folders, removed so that they configure afresh.
# cmake -DBUILD_DIR=... -DCONFIG=... -DSTAGE=... -DPREFIX=... -DLIBDIR=... -DINCLUDEDIR=...
#       [-DCLEAN=dir;dir] -P consumer_install.cmake
file(REMOVE_RECURSE "${STAGE}" "${PREFIX}" ${CLEAN})
set(config_args)
if(CONFIG)
  set(config_args --config "${CONFIG}")
endif()
execute_process(COMMAND "${CMAKE_COMMAND}" --install "${BUILD_DIR}" --prefix "${STAGE}" ${config_args}
                RESULT_VARIABLE rc)
if(NOT rc EQUAL 0)
  message(FATAL_ERROR "cmake --install ${BUILD_DIR} failed (${rc})")
endif()
file(RENAME "${STAGE}" "${PREFIX}")

foreach(f
    "${INCLUDEDIR}/bnorm/bnorm.hpp" "${INCLUDEDIR}/bnorm/cpu.hpp" "${INCLUDEDIR}/bnorm/cuda.hpp"
    "${INCLUDEDIR}/bnorm/types.hpp" "${INCLUDEDIR}/bnorm/version.hpp"
    "${LIBDIR}/cmake/bnorm/bnormConfig.cmake" "${LIBDIR}/cmake/bnorm/bnormConfigVersion.cmake"
    "${LIBDIR}/cmake/bnorm/bnormTargets.cmake" "${LIBDIR}/pkgconfig/bnorm.pc")
  if(NOT EXISTS "${PREFIX}/${f}")
    message(FATAL_ERROR "not installed: ${f}")
  endif()
endforeach()
file(GLOB libs "${PREFIX}/${LIBDIR}/*bnorm*" "${PREFIX}/bin/*bnorm*.dll")
if(NOT libs)
  message(FATAL_ERROR "no libbnorm in ${PREFIX}/${LIBDIR}")
endif()
if(EXISTS "${PREFIX}/${INCLUDEDIR}/bnorm/version.hpp.in")
  message(FATAL_ERROR "the template version.hpp.in was installed")
endif()
# No installed text file may name the staging prefix.
file(GLOB_RECURSE texts "${PREFIX}/*.cmake" "${PREFIX}/*.pc" "${PREFIX}/*.hpp")
foreach(f IN LISTS texts)
  file(READ "${f}" content)
  string(FIND "${content}" "${STAGE}" at)
  if(NOT at EQUAL -1)
    message(FATAL_ERROR "${f} names the install-time prefix ${STAGE}: not relocatable")
  endif()
endforeach()
message(STATUS "bnorm installed and relocated to ${PREFIX}")
