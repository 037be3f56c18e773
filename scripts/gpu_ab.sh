#!/usr/bin/env bash
# A/B of CUDA kernel variants on a GPU, in one run: builds the Python package as it is
# ("base") and once per variant script (a bash snippet run in a copy of the tree, e.g. a
# sed on cuda/reduce.hpp, or `patch -p1 < benchmarks/ab/x.patch`), all builds at once; then
# for each build its tests/python/test_cuda.py (GPU_AB_TESTS=0 skips them), bench_gpu.py
# (whole ops, median of rounds, L2 flushed, checked against float64) and Nsight Compute over
# gpu_kernels.py (each kernel's time and DRAM traffic). Nothing is installed: each build goes
# to its own --target directory.
#
#   OUT=/some/dir bash scripts/gpu_ab.sh benchmarks/ab/variant1.sh [benchmarks/ab/variant2.sh ...]
#
# Same environment needs as scripts/gpu_check.sh (no downloads).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-build/gpu-ab}
PYTHON=${PYTHON:-python3}
CUDA_ARCH=${CUDA_ARCH:-90}
mkdir -p "$OUT"
exec > >(tee -a "$OUT/gpu_ab.log") 2>&1
root=$(pwd)
names=(base)
for v in "$@"; do names+=("$(basename "$v" .sh)"); done

build() {  # build NAME [SNIPPET]
  local name=$1 snippet=${2:-} src=/tmp/bnorm-ab/$1
  rm -rf "$src" && mkdir -p "$src"
  tar -C "$root" --exclude=./build --exclude=./.git -cf - . | tar -C "$src" -xf -
  if [ -n "$snippet" ]; then (cd "$src" && bash "$root/$snippet") || { echo "$name: snippet failed"; return 1; }; fi
  (cd "$src" && git diff --no-index --stat "$root/cuda" cuda 2>/dev/null | tail -1)
  BNORM_CUDA=ON CMAKE_BUILD_PARALLEL_LEVEL=4 "$PYTHON" -m pip install -q --no-build-isolation --no-deps \
    --target "$OUT/site-$name" "$src" -Cbuild-dir="$src/build" -Ccmake.define.CMAKE_CUDA_ARCHITECTURES=$CUDA_ARCH \
    -Ccmake.define.BNORM_TORCH_OPS=OFF -Ccmake.define.BNORM_KERNEL_ISAS=avx2 > "$OUT/build-$name.log" 2>&1
  echo "build $name: exit $?"
}

start=$SECONDS
pids=()
build base & pids+=($!)
for v in "$@"; do build "$(basename "$v" .sh)" "$v" & pids+=($!); done
wait "${pids[@]}"  # (a bare wait would also wait for the tee above, forever)
echo "== builds done after $((SECONDS - start)) s"

for name in "${names[@]}"; do
  [ -d "$OUT/site-$name/bnorm" ] || { echo "== $name: no build"; continue; }
  if [ "${GPU_AB_TESTS:-1}" = 1 ]; then  # the variant's own CUDA tests, on its own build
    echo "== $name: pytest tests/python/test_cuda.py"
    (cd "/tmp/bnorm-ab/$name" && PYTHONPATH="$OUT/site-$name" timeout 300 "$PYTHON" -m pytest tests/python/test_cuda.py \
      -q -p no:cacheprovider > "$OUT/pytest-$name.log" 2>&1; tail -1 "$OUT/pytest-$name.log")
  fi
  echo "== $name: bench_gpu.py"
  PYTHONPATH="$OUT/site-$name" timeout 200 "$PYTHON" benchmarks/bench_gpu.py --no-record --rounds 30 2>&1 \
    | grep -E "^\| (train|infer|backward) " | cut -d'|' -f2-8 | tee "$OUT/bench-$name.txt"
  if command -v ncu > /dev/null; then
    PYTHONPATH="$OUT/site-$name" timeout 200 ncu --clock-control none --csv --kernel-name-base function \
      --kernel-name "regex:plane_reduce|row_reduce|flat_elementwise|rows_elementwise" \
      --metrics gpu__time_duration.sum,dram__bytes_read.sum,dram__bytes_write.sum,launch__grid_size,launch__registers_per_thread \
      "$PYTHON" benchmarks/gpu_kernels.py > "$OUT/kernels-$name.csv" 2> /dev/null
    "$PYTHON" benchmarks/gpu_kernels.py --summary "$OUT/kernels-$name.csv" > "$OUT/kernels-$name.txt"
  fi
done
echo "== done at $((SECONDS - start)) s"
