"""Build of the compiled CPU kernels: fastnn.kernels._cpu (Cython + csrc/*.c).

-O3 (+ -fno-trapping-math), OpenMP when the compiler has it (probed by compiling and linking a tiny
OpenMP program with $CFLAGS and $LDFLAGS, as the extension is; without it the kernels build
and run on one thread, or with FASTNN_REQUIRE_OPENMP=1 the build fails: wheel builds set it),
and no
-march=native unless FASTNN_NATIVE=1 (a wheel must run on other CPUs).
FASTNN_SANITIZE=1 adds AddressSanitizer and UndefinedBehaviorSanitizer (GCC/Clang; how to
run the tests under them: README, "Security and reliability").
Dev build: python3 setup.py build_ext --inplace (add --force after changing these variables:
setuptools rebuilds objects by their timestamps, not their flags)
"""
import os
import shlex
import shutil
import sys
import tempfile
from glob import glob

import numpy
from Cython.Build import cythonize
from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

OPENMP_PROBE = r"""
#include <omp.h>
int main(void) {
    int threads = 0;
    #pragma omp parallel reduction(+:threads)
    threads += 1;
    return threads > 0 ? 0 : 1;
}
"""


def openmp_flags(compiler):
    """(compile_args, link_args) that enable OpenMP for ``compiler``, or None."""
    if compiler.compiler_type == "msvc":
        candidates = [(["/openmp"], [])]
    elif sys.platform == "darwin":
        candidates = [(["-fopenmp"], ["-fopenmp"]),
                      (["-Xpreprocessor", "-fopenmp"], ["-lomp"])]
    else:
        candidates = [(["-fopenmp"], ["-fopenmp"])]
    ldflags = shlex.split(os.environ.get("LDFLAGS", ""))
    tmp = tempfile.mkdtemp(prefix="fastnn-omp-")
    try:
        source = os.path.join(tmp, "probe.c")
        with open(source, "w") as f:
            f.write(OPENMP_PROBE)
        for compile_args, link_args in candidates:
            try:
                objects = compiler.compile([source], output_dir=tmp, extra_postargs=compile_args)
                # LDFLAGS (e.g. -L of Homebrew's libomp): setuptools gives them to the
                # extension's link but not to link_executable
                compiler.link_executable(objects, "probe", output_dir=tmp,
                                         extra_postargs=link_args + ldflags)
                return compile_args, link_args
            except Exception:   # CompileError / LinkError: try the next flags
                continue
        return None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


class BuildExt(build_ext):
    def build_extensions(self):
        msvc = self.compiler.compiler_type == "msvc"
        # -fno-trapping-math lets the compiler turn float compares into branch-free
        # selects (vectorized ReLU, softmax exp, max pooling); fastnn never reads
        # floating-point exception flags. NaN and Inf semantics are unchanged.
        compile_args = ["/O2"] if msvc else ["-O3", "-fno-trapping-math"]
        link_args = []
        if os.environ.get("FASTNN_NATIVE") == "1" and not msvc:
            compile_args.append("-march=native")
        if os.environ.get("FASTNN_SANITIZE") == "1" and not msvc:
            sanitize = ["-fsanitize=address,undefined", "-fno-omit-frame-pointer", "-g"]
            compile_args += sanitize
            link_args += sanitize
        flags = openmp_flags(self.compiler)
        if flags is None and os.environ.get("FASTNN_REQUIRE_OPENMP") == "1":
            sys.exit("fastnn: FASTNN_REQUIRE_OPENMP=1 but the compiler has no OpenMP (the "
                     "probe failed to compile or link; on macOS: libomp, CFLAGS=-I..., "
                     "LDFLAGS=-L...)")
        if flags is None:
            print("fastnn: the compiler has no OpenMP; the kernels will run on one thread",
                  file=sys.stderr)
        else:
            compile_args += flags[0]
            link_args += flags[1]
        for ext in self.extensions:
            ext.extra_compile_args = compile_args + ext.extra_compile_args
            ext.extra_link_args = link_args + ext.extra_link_args
        super().build_extensions()


extensions = [
    Extension(
        "fastnn.kernels._cpu",
        sources=["fastnn/kernels/_cpu.pyx"] + sorted(glob("csrc/*.c")),
        include_dirs=["csrc", numpy.get_include()],
        # the .pxi files _cpu.pyx includes: an edit of one rebuilds the module
        depends=sorted(glob("csrc/*.h")) + sorted(glob("fastnn/kernels/cpu/*.pxi")),
        define_macros=[("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION")],
    ),
]

setup(
    ext_modules=cythonize(extensions, compiler_directives={"language_level": "3"}),
    cmdclass={"build_ext": BuildExt},
)
