#!/usr/bin/env bash
# What each CPU optimization bought: builds the C++ library of several commits (the CPU
# backend only) and times each with benchmarks/cpp/bench_ops.cpp from this checkout, on
# the same shapes, one commit after the other in one run.
#
#   benchmarks/bench_history.sh [THREADS] [SHAPES] [COMMIT ...]
#
# Defaults: 2 threads, issue 3's shapes as (outer x C x inner), and the commits that
# changed the CPU kernels. Run it on a quiet machine; it prints one Markdown table per
# commit. Builds go to build/history/<commit> (kept, so a rerun only re-times).
set -euo pipefail
cd "$(dirname "$0")/.."
THREADS=${1:-2}
SHAPES=${2:-64x256x784,50176x256x1,8192x1024x1,32x64x196,128x64x3136}
shift $(( $# > 2 ? 2 : $# ))
COMMITS=("$@")
if [ ${#COMMITS[@]} -eq 0 ]; then
  # (the ISA dispatch, f93ed56, is first buildable at c81117c: its CMake change landed there)
  COMMITS=(245a3af 31e2644 c81117c HEAD)
fi
ROOT=$PWD
for commit in "${COMMITS[@]}"; do
  sha=$(git rev-parse --short "$commit")
  dir=build/history/$sha
  if [ ! -x "$dir/bench_ops" ]; then
    rm -rf "$dir" && mkdir -p "$dir"
    git archive "$sha" | tar -x -C "$dir"
    if [ "$commit" = HEAD ] && ! git diff --quiet HEAD -- cpp; then
      echo "note: HEAD is timed as committed; uncommitted changes to cpp/ are not included" >&2
    fi
    cmake -S "$dir" -B "$dir/build" -DCMAKE_BUILD_TYPE=Release -DBNORM_PYTHON=OFF -DBNORM_CUDA=OFF \
      -DBNORM_TESTS=OFF -DBNORM_INSTALL=OFF > "$dir/configure.log"
    cmake --build "$dir/build" -j 2 > "$dir/build.log"
    "${CXX:-c++}" -O2 -std=c++17 -fopenmp -I"$dir/cpp/include" -I"$dir/build/include" \
      "$ROOT/benchmarks/cpp/bench_ops.cpp" "$dir/build/libbnorm.a" -o "$dir/bench_ops"
  fi
  echo
  echo "### $sha: $(git log -1 --format=%s "$sha" | cut -c1-100)"
  echo
  "$dir/bench_ops" "$SHAPES" "$THREADS"
done
