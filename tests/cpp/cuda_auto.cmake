# ctest cuda_auto_detection (cmake -P): BNORM_CUDA=AUTO compiles the CUDA backend only where
# an NVIDIA GPU is found, whether or not nvcc exists. Configures bnorm's tree (no build) with
# a stand-in nvidia-smi that lists no GPU (where nvcc exists, AUTO used to compile CUDA
# anyway), then one that lists a GPU (with no usable CUDA compiler, so that the answer does
# not depend on this machine's nvcc), and checks what the configure step says.
# Arguments: -DSOURCE=<bnorm tree> -DWORK=<scratch dir> -DCXX=<compiler>
file(REMOVE_RECURSE ${WORK})
file(MAKE_DIRECTORY ${WORK})

function(fake_smi path exit_code output)
  file(WRITE ${path} "#!/bin/sh\necho '${output}'\nexit ${exit_code}\n")
  execute_process(COMMAND chmod +x ${path})
endfunction()
fake_smi(${WORK}/smi-none 9 "NVIDIA-SMI has failed because it could not communicate with the NVIDIA driver.")
fake_smi(${WORK}/smi-gpu 0 "GPU 0: NVIDIA H100 80GB HBM3 (UUID: GPU-00000000-0000-0000-0000-000000000000)")

# configure(<name> <expected regex> <cmake args...>), with the environment of ENV (a list of
# NAME=VALUE) if set
function(configure name expected)
  execute_process(
    COMMAND ${CMAKE_COMMAND} -E env ${ENV}
            ${CMAKE_COMMAND} -S ${SOURCE} -B ${WORK}/${name} -DCMAKE_CXX_COMPILER=${CXX}
            -DBNORM_PYTHON=OFF -DBNORM_TESTS=OFF -DBNORM_INSTALL=OFF ${ARGN}
    OUTPUT_VARIABLE out ERROR_VARIABLE err RESULT_VARIABLE result)
  if(NOT "${out}${err}" MATCHES "${expected}")
    message(FATAL_ERROR "${name}: expected '${expected}' (exit ${result}), got:\n${out}\n${err}")
  endif()
  message(STATUS "${name}: ${CMAKE_MATCH_0}")
endfunction()

configure(no-gpu "bnorm: CUDA backend OFF \\(BNORM_CUDA=AUTO and no NVIDIA GPU found"
          -DBNORM_NVIDIA_SMI=${WORK}/smi-none)
# a GPU: AUTO looks for a CUDA compiler (and finds none, CUDACXX pointing nowhere)
set(ENV CUDACXX=${WORK}/no-such-nvcc)
configure(gpu "bnorm: CUDA backend OFF \\(no CUDA compiler found\\)" -DBNORM_NVIDIA_SMI=${WORK}/smi-gpu)
configure(off "bnorm: CUDA backend OFF \\(BNORM_CUDA=OFF\\)" -DBNORM_CUDA=OFF -DBNORM_NVIDIA_SMI=${WORK}/smi-gpu)
configure(bad-value "BNORM_CUDA must be AUTO, ON or OFF, got 'maybe'" -DBNORM_CUDA=maybe)
