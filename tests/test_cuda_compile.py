"""The CUDA kernels compile, with no GPU: NVRTC alone (no driver) compiles the shipped
sources (fastnn/kernels/cuda/*.cu) the way fastnn.kernels._cuda does at run time, for
every kernel in float and double. Skipped where CuPy's NVRTC binding or the NVRTC
library is missing; a syntax or template error fails with the compiler's log."""
import os
import re

import pytest

nvrtc = pytest.importorskip("cupy_backends.cuda.libs.nvrtc")

from fastnn.kernels import _cuda  # noqa: E402  (imports without CuPy)

# What CuPy's RawModule adds to the module's own options on an NVRTC compile
# (cupy.cuda.compiler: _compile_with_cache_cuda and _compile_using_nvrtc), with the
# H100's virtual architecture in place of the device's.
CUPY_OPTIONS = ("-ftz=true", "-arch=compute_90", "--device-as-default-execution-space")


@pytest.fixture(scope="module")
def nvrtc_library():
    """The NVRTC library loads (it needs no driver and no GPU), else skip."""
    try:
        return nvrtc.getVersion()
    except Exception as error:  # the library itself is absent: not a compile failure
        pytest.skip(f"NVRTC library unavailable: {error!r}")


def compile_module(source, names):
    """Compile ``source`` with the runtime's options -> {name expression: lowered name};
    a compile error fails the test with the program log."""
    prog = nvrtc.createProgram(source, "fastnn_kernels.cu", (), ())
    try:
        for name in names:
            nvrtc.addNameExpression(prog, name)
        try:
            nvrtc.compileProgram(prog, _cuda._NVRTC_OPTIONS + CUPY_OPTIONS)
        except nvrtc.NVRTCError as error:
            pytest.fail(f"NVRTC failed ({error}):\n{nvrtc.getProgramLog(prog)}")
        assert nvrtc.getPTX(prog)
        return {name: nvrtc.getLoweredName(prog, name) for name in names}
    finally:
        nvrtc.destroyProgram(prog)


def test_every_kernel_compiles_in_float_and_double(nvrtc_library):
    source = _cuda._kernel_source()
    names = _cuda._name_expressions(source)
    kernels = {name.split("<")[0] for name in names}
    assert len(names) == 2 * len(kernels) >= 2 * 18
    lowered = compile_module(source, names)
    for name, mangled in lowered.items():
        kernel, ctype = re.fullmatch(r"(\w+)<(float|double)>", name).groups()
        # Itanium mangling: the kernel's name, then I f/d E (template argument float/double)
        assert mangled.startswith("_Z") and f"{kernel}I{ctype[0]}E" in mangled, (name, mangled)
    assert len(set(lowered.values())) == len(names)


def test_a_broken_kernel_fails_to_compile(nvrtc_library):
    """The check can fail: a kernel with a type error in its template body."""
    source = _cuda._kernel_source().replace("relu_of(x[i]);", "relu_of(x[i], 1);", 1)
    assert "relu_of(x[i], 1);" in source
    with pytest.raises(pytest.fail.Exception, match="relu"):
        compile_module(source, _cuda._name_expressions(source))


def test_every_launched_kernel_is_compiled():
    """Each ``_kernel("name", ...)`` in _cuda.py names a kernel of the module."""
    with open(_cuda.__file__, encoding="utf-8") as f:
        launched = set(re.findall(r'_kernel\("(\w+)"', f.read()))
    compiled = {name.split("<")[0] for name in _cuda._name_expressions(_cuda._kernel_source())}
    assert launched and launched <= compiled, sorted(launched - compiled)


def test_every_shipped_source_file_is_in_the_module():
    """A .cu/.cuh file in the package's cuda/ folder that the module does not read
    would be dead code, and a listed file that is missing would fail at run time."""
    shipped = {f for f in os.listdir(_cuda._SOURCE_DIR) if f.endswith((".cu", ".cuh"))}
    assert shipped == set(_cuda._SOURCE_FILES)
    assert _cuda._SOURCE_FILES[0] == "common.cuh"      # the helpers come first
