#!/usr/bin/env bash
# Build the documentation (MkDocs) with warnings as errors; CI runs this.
#
#   scripts/build_docs.sh              check the docs against the installed bnorm, then build
#   scripts/build_docs.sh --no-check   build only (no bnorm import needed)
#
# Needs: pip install "mkdocs==1.6.1" (and bnorm installed, for the checks).
# Checks, before `mkdocs build --strict`:
#   1. every public name of bnorm (bnorm.__all__) appears in docs/python-api.md, and each
#      signature written there after `bnorm.NAME(` matches the installed package's;
#   2. the ```python code blocks of the pages listed below run without error (each page's
#      blocks in order, in one namespace, in a scratch folder). Blocks that need something
#      optional (CuPy, a GPU) are fenced ```py instead and are not run.
# The site is written to build/site/.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"

if ! "$PYTHON" -c "import mkdocs" 2>/dev/null; then
  echo "build_docs.sh: mkdocs is not installed (pip install 'mkdocs==1.6.1')" >&2
  exit 1
fi

if [[ "${1:-}" != "--no-check" ]]; then
  if ! "$PYTHON" -c "import bnorm" 2>/dev/null; then
    echo "build_docs.sh: bnorm is not importable; install it first, or pass --no-check" >&2
    exit 1
  fi
  "$PYTHON" - <<'PY'
import ast, contextlib, importlib.util, inspect, io, os, re, sys, tempfile

import numpy
import bnorm

errors = []
api = open("docs/python-api.md", encoding="utf-8").read()

# 1. public names documented, signatures as in the package
for name in bnorm.__all__:
    if f"`{name}" not in api and f"bnorm.{name}" not in api:
        errors.append(f"docs/python-api.md does not mention bnorm.{name}")


def documented_params(text, name):
    m = re.search(r"bnorm\." + re.escape(name) + r"\(", text)
    if not m:
        return None
    depth, i = 1, m.end()
    while depth:
        depth += {"(": 1, ")": -1}.get(text[i], 0)
        i += 1
    params = " ".join(text[m.end():i - 1].split())
    args = ast.parse(f"def f({params}): pass").body[0].args
    out = []
    pos_defaults = [None] * (len(args.args) - len(args.defaults)) + list(args.defaults)
    for a, d in zip(args.args, pos_defaults):
        out.append((a.arg, "POSITIONAL_OR_KEYWORD", d))
    for a, d in zip(args.kwonlyargs, args.kw_defaults):
        out.append((a.arg, "KEYWORD_ONLY", d))
    return out


EMPTY = inspect.Parameter.empty
for name in bnorm.__all__:
    obj = getattr(bnorm, name)
    if not callable(obj):
        continue
    doc = documented_params(api, name)
    if doc is None:
        if name not in ("cuda_available", "get_num_threads", "set_num_threads"):
            errors.append(f"docs/python-api.md has no signature `bnorm.{name}(...)`")
        continue
    real = list(inspect.signature(obj).parameters.values())
    if [(n, k) for n, k, _ in doc] != [(p.name, p.kind.name) for p in real]:
        errors.append(f"bnorm.{name}: documented parameters {[(n, k) for n, k, _ in doc]} "
                      f"!= package {[(p.name, p.kind.name) for p in real]}")
        continue
    for (n, _, d), p in zip(doc, real):
        if (d is None) != (p.default is EMPTY):
            errors.append(f"bnorm.{name}: parameter {n}: default documented {d is not None}, "
                          f"package {p.default is not EMPTY}")
        elif d is not None:
            value = eval(compile(ast.Expression(d), "<doc>", "eval"), {"numpy": numpy, "np": numpy})
            if not (value is p.default or value == p.default):
                errors.append(f"bnorm.{name}: default of {n}: documented {value!r}, "
                              f"package {p.default!r}")

# 2. the pages' ```python examples run
pages = ["docs/index.md", "docs/getting-started.md", "docs/faq.md", "docs/variants.md"]
# the framework page's examples need PyTorch, JAX and bnorm's JAX handlers (CI has all three)
if all(importlib.util.find_spec(m) for m in ("torch", "jax")) and hasattr(bnorm._core, "jax_ffi_targets"):
    pages.append("docs/frameworks.md")
root = os.getcwd()
for page in pages:
    text = open(page, encoding="utf-8").read()
    blocks = re.findall(r"^```python\n(.*?)^```", text, flags=re.S | re.M)
    with tempfile.TemporaryDirectory() as tmp:
        os.chdir(tmp)
        ns = {"__name__": "__docs__"}
        for k, block in enumerate(blocks):
            try:
                with contextlib.redirect_stdout(io.StringIO()):  # the examples' prints
                    exec(compile(block, f"{page} block {k + 1}", "exec"), ns)
            except Exception as e:  # noqa: BLE001 - report every failing block
                errors.append(f"{page}: python block {k + 1} failed: {type(e).__name__}: {e}")
                break
        os.chdir(root)
    print(f"build_docs.sh: {page}: ran {len(blocks)} python block(s)", file=sys.stderr)

if errors:
    print("build_docs.sh: the docs do not match the package:", file=sys.stderr)
    for e in errors:
        print("  - " + e, file=sys.stderr)
    sys.exit(1)
print("build_docs.sh: API reference and examples match the installed bnorm", file=sys.stderr)
PY
fi

"$PYTHON" -m mkdocs build --strict --clean --config-file mkdocs.yml
