#!/usr/bin/env bash
# Builds and installs bnorm with its test dependencies into the current Python, then runs
# every test: the pytest suite, the C++ tests (ctest), and the C++ tests again under
# AddressSanitizer + UndefinedBehaviorSanitizer. The CUDA backend is compiled wherever nvcc
# exists (its tests skip without a GPU).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
JOBS=${JOBS:-2}

echo "== install bnorm[test]"
"$PYTHON" -m pip install ".[test]"

echo "== pytest"
"$PYTHON" -m pytest tests/python -q

echo "== C++ tests"
cmake -S . -B build/cpp-tests -DBNORM_TESTS=ON -DBNORM_PYTHON=OFF
cmake --build build/cpp-tests -j "$JOBS"
ctest --test-dir build/cpp-tests --output-on-failure

echo "== C++ tests under ASan + UBSan"
cmake -S . -B build/cpp-asan -DBNORM_TESTS=ON -DBNORM_PYTHON=OFF -DBNORM_CUDA=OFF -DBNORM_SANITIZE=ON \
  -DCMAKE_BUILD_TYPE=Debug
cmake --build build/cpp-asan -j "$JOBS"
ctest --test-dir build/cpp-asan --output-on-failure
