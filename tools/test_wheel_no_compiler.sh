#!/usr/bin/env bash
# Install a built fastnn wheel where no C compiler can be found, and run the test
# suite against it (not against the source tree).
#
#   tools/test_wheel_no_compiler.sh [WHEEL] [-- PYTEST_ARGS...]
#       WHEEL: default, the newest wheelhouse/fastnn-*manylinux*.whl (tools/build_wheel.sh)
#   FASTNN_CPU_FEATURES=avx2 tools/test_wheel_no_compiler.sh      # as on a CPU without AVX-512
#   FASTNN_CPU_FEATURES=portable tools/test_wheel_no_compiler.sh  # ... nor AVX2 + FMA
#
# 1. A fresh virtual environment; PATH is then its bin/ plus a folder of symlinks to
#    a few shell tools (no gcc, cc, c++, clang), CC=CXX=/bin/false; the script proves
#    it (`which gcc cc` must fail, and Python's shutil.which agrees).
# 2. There, `pip install --only-binary=:all:` the wheel and the packages of
#    pyproject.toml's `test` extra, by name (fastnn itself is never built).
# 3. A copy of tests/, examples/, benchmarks/ and docs/ in a temporary folder (beside a
#    link to ../shared when the checkout has one: MNIST, API.md, the course notes),
#    and pytest there: `import fastnn` finds only the installed wheel, which the
#    script checks before the run.
# Exits with pytest's status. Needs python3 (3.11+, for tomllib) matching the wheel.
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
wheel="${1:-}"
[ "$#" -gt 0 ] && shift
[ "${1:-}" = "--" ] && shift
if [ -z "$wheel" ] || [ "$wheel" = "--" ]; then
    wheel="$(ls -t "$repo"/wheelhouse/fastnn-*manylinux*.whl 2>/dev/null | head -n 1 || true)"
fi
[ -f "$wheel" ] || { echo "test_wheel_no_compiler.sh: no wheel (run tools/build_wheel.sh)" >&2; exit 2; }
wheel="$(cd "$(dirname "$wheel")" && pwd)/$(basename "$wheel")"

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
python3 -m venv "$work/venv"
mkdir "$work/bin"
for tool in bash sh env which cat ls rm mkdir uname; do
    ln -s "$(command -v "$tool")" "$work/bin/$tool"
done
mapfile -t test_deps < <(python3 -c 'import sys, tomllib
print("\n".join(tomllib.load(open(sys.argv[1], "rb"))["project"]["optional-dependencies"]["test"]))' \
    "$repo/pyproject.toml")

mkdir -p "$work/run/fastnn"
cp -r "$repo/tests" "$repo/examples" "$repo/benchmarks" "$repo/docs" "$work/run/fastnn/"
[ -d "$repo/../shared" ] && ln -s "$(cd "$repo/../shared" && pwd)" "$work/run/shared"

# from here on: no compiler on PATH
export PATH="$work/venv/bin:$work/bin" CC=/bin/false CXX=/bin/false
unset PYTHONPATH VIRTUAL_ENV
echo "== no compiler: PATH=$PATH CC=$CC"
if which gcc cc c++ clang 2>/dev/null; then
    echo "test_wheel_no_compiler.sh: a compiler is on PATH" >&2
    exit 2
fi
python -c 'import shutil; assert not any(map(shutil.which, ("gcc", "cc", "c++", "clang")))'
echo "which gcc cc c++ clang: none found"

python -m pip install -q --disable-pip-version-check --only-binary=:all: "$wheel" "${test_deps[@]}"
cd "$work/run/fastnn"
python - <<'EOF'
import os, fastnn
from fastnn.kernels import _cpu, variants
assert "site-packages" in fastnn.__file__, fastnn.__file__
print("fastnn from", os.path.dirname(fastnn.__file__))
print("FASTNN_CPU_FEATURES cap:", _cpu.cpu_features(), "| applicable: gemm",
      variants.applicable("gemm", m=64, n=64, k=64), "row_kernels",
      variants.applicable("row_kernels"), "sgd_step", variants.applicable("sgd_step"))
EOF
python -m pytest -p no:cacheprovider -q -ra tests "$@"
