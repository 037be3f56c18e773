#!/usr/bin/env bash
# Everything the CUDA backend needs checked on a GPU, in one run (issue 17; DEVELOPERS.md):
# builds (the C++ CUDA tests and the Python package, CUDA for this GPU's architecture), the
# C++ CUDA tests, the Python CUDA tests (PyTorch, CuPy and JAX arrays; SyncBatchNorm's GPU
# path over NCCL and Gloo), compute-sanitizer's memcheck, racecheck and synccheck on the C++
# CUDA tests, and benchmarks/bench_gpu.py. Every step has a time limit and the run goes on
# after a failure; logs go to $OUT (default build/gpu-out), the benchmark's report too.
#
#   OUT=/some/dir bash scripts/gpu_check.sh        # PYTHON (default python3), CUDA_ARCH (90),
#                                                  # GPU_CHECK_NCU=0 skips the Nsight Compute step
#
# Uses the Python environment as it is (no downloads: pip builds with --no-build-isolation
# and installs no dependencies), so numpy, nanobind, scikit-build-core, cmake, ninja, pytest
# and the frameworks to test with must be there.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-build/gpu-out}
PYTHON=${PYTHON:-python3}
CUDA_ARCH=${CUDA_ARCH:-90}
JOBS=$(nproc)
mkdir -p "$OUT"
exec > >(tee -a "$OUT/gpu_check.log") 2>&1
failed=()
step() {  # step NAME SECONDS COMMAND...: runs it with a time limit, logs its status and time
  local name=$1 limit=$2 start=$SECONDS rc
  shift 2
  echo "== $name [at ${SECONDS} s]"
  timeout --kill-after=10 "$limit" "$@"
  rc=$?
  echo "== $name: exit $rc after $((SECONDS - start)) s"
  [ $rc -eq 0 ] || failed+=("$name (exit $rc)")
  return $rc
}

step "machine" 60 bash -c "nvidia-smi; nvcc --version | tail -2; $PYTHON -c 'import sys, numpy, torch; print(sys.version); print(\"numpy\", numpy.__version__, \"torch\", torch.__version__, torch.version.cuda, torch.cuda.get_device_name(0))'; $PYTHON -c 'import cupy; print(\"cupy\", cupy.__version__)'; $PYTHON -c 'import jax; print(\"jax\", jax.__version__, jax.devices())'; lscpu | grep -E \"Model name|^CPU\\(s\\)\""

# The two builds at once (each is a few files wide; the machine has $JOBS cores).
step "build: C++ CUDA tests and Python package (logs: build.log)" 600 bash -c "
  (cmake -S . -B build/gpu -G Ninja -DBNORM_TESTS=ON -DBNORM_PYTHON=OFF -DBNORM_CUDA=ON \
     -DCMAKE_CUDA_ARCHITECTURES=$CUDA_ARCH -DBNORM_KERNEL_ISAS=avx2 > $OUT/build-cpp.txt 2>&1 &&
   cmake --build build/gpu -j $JOBS --target test_cuda >> $OUT/build-cpp.txt 2>&1; echo \"C++ build: exit \$?\" >> $OUT/build-cpp.txt) &
  BNORM_CUDA=ON CMAKE_BUILD_PARALLEL_LEVEL=$JOBS $PYTHON -m pip install --no-build-isolation --no-deps -v . \
    -Cbuild-dir=build/gpu-py -Ccmake.define.CMAKE_CUDA_ARCHITECTURES=$CUDA_ARCH \
    -Ccmake.define.BNORM_TORCH_OPS=OFF -Ccmake.define.BNORM_KERNEL_ISAS=avx2 > $OUT/build-py.txt 2>&1
  py=\$?
  wait
  cat $OUT/build-cpp.txt $OUT/build-py.txt > $OUT/build.log; rm $OUT/build-cpp.txt $OUT/build-py.txt
  tail -5 $OUT/build.log
  grep -q 'C++ build: exit 0' $OUT/build.log && [ \$py -eq 0 ]"

step "C++ CUDA tests (test_cuda)" 240 build/gpu/tests/cpp/test_cuda

# The sanitizers in the background while pytest runs (both are mostly host-bound).
(
  for tool in memcheck racecheck synccheck; do
    step "compute-sanitizer $tool" 300 env BNORM_TEST_SKIP_HUGE=1 compute-sanitizer --tool "$tool" \
      --error-exitcode 99 build/gpu/tests/cpp/test_cuda
  done > "$OUT/sanitizer.log" 2>&1
) &
sanitizers=$!

step "pytest: the CUDA tests" 420 "$PYTHON" -m pytest tests/python -q -p no:cacheprovider -k "cuda or gpu" -rs \
  > "$OUT/pytest.log" 2>&1
tail -30 "$OUT/pytest.log"
# NCCL with two ranks on one GPU: NCCL refuses it ("Duplicate GPU detected"); run for the
# record where there is a single GPU, not counted as a failed step
if [ "$(nvidia-smi -L 2>/dev/null | wc -l)" -lt 2 ]; then
  echo "== NCCL with two ranks on one GPU (for the record: NCCL refuses it)"
  BNORM_NCCL_SAME_GPU=1 timeout 120 "$PYTHON" -m pytest tests/python/test_cuda_distributed.py -q \
    -p no:cacheprovider -k "nccl-2" >> "$OUT/pytest.log" 2>&1
  grep -m1 -E "Duplicate GPU" "$OUT/pytest.log" || echo "   (no 'Duplicate GPU' message: see pytest.log)"
fi
wait $sanitizers
grep -E "^== |ERROR SUMMARY|RACECHECK SUMMARY|test_cuda: " "$OUT/sanitizer.log"
grep -q "compute-sanitizer .*: exit [^0]" "$OUT/sanitizer.log" && failed+=("compute-sanitizer (see sanitizer.log)")

# A native backtrace of the legacy-stream capture case should it crash again (it segfaulted once)
# (a diagnostic, not counted as a step: its test above says whether it passes)
if command -v cuda-gdb > /dev/null && ! timeout 120 "$PYTHON" tests/python/cuda_capture_script.py legacy > /dev/null 2>&1; then
  echo "== cuda-gdb: backtrace of cuda_capture_script.py legacy"
  timeout 150 cuda-gdb -batch -ex "set pagination off" -ex run -ex bt -ex "info threads" \
    --args "$PYTHON" tests/python/cuda_capture_script.py legacy 2>&1 | tail -60
fi

step "benchmarks/bench_gpu.py" 300 "$PYTHON" benchmarks/bench_gpu.py --out-dir "$OUT"
step "benchmarks/bench_gpu.py --graphs (each call replayed from a CUDA graph: no host time)" 200 \
  "$PYTHON" benchmarks/bench_gpu.py --graphs --no-record --rounds 20

# Each kernel's time and DRAM traffic (Nsight Compute; see benchmarks/gpu_kernels.py)
if [ "${GPU_CHECK_NCU:-1}" = 1 ] && command -v ncu > /dev/null; then
  step "ncu: per-kernel time and traffic (kernels.csv)" 240 ncu --clock-control none --csv \
    --kernel-name-base function \
    --kernel-name "regex:plane_reduce|row_reduce|flat_elementwise|rows_elementwise|prep_kernel|bn_|batch_norm|BatchNorm|nhwc" \
    --metrics gpu__time_duration.sum,dram__bytes_read.sum,dram__bytes_write.sum,launch__grid_size \
    "$PYTHON" benchmarks/gpu_kernels.py > "$OUT/kernels.csv" 2> "$OUT/kernels-stderr.txt"
  grep -E "^##|n/a" "$OUT/kernels-stderr.txt"
  "$PYTHON" benchmarks/gpu_kernels.py --summary "$OUT/kernels.csv" | head -150
  rm -f "$OUT/kernels-stderr.txt"
fi

echo "== done at ${SECONDS} s; failed steps: ${#failed[@]}"
for f in "${failed[@]}"; do echo "   $f"; done
[ ${#failed[@]} -eq 0 ]
