"""Every applicable variant of the compiled conv and dense kernels (fastnn.kernels.variants),
forced one by one on the shared case lists of tests/cases.py (convs also with an
``output_size`` below the whole output), against the NumPy reference,
float32 and float64: not only the variant that the chooser picks on this machine. float32
runs under both GEMM engines (fastnn's AVX-512 kernel where the CPU has it, and BLAS: the
portable path of CPUs without AVX-512). Also the registry itself: names, errors, forcing,
the environment variables, and that ``chosen`` names what runs."""
import functools

import numpy as np
import pytest

from _helpers import run_python
from fastnn import backend

if "cpu" not in backend.available():
    pytest.skip("compiled kernels not built", allow_module_level=True)

from fastnn.kernels import _cpu, _reference, variants  # noqa: E402
from cases import CONV_CASES, DENSE_CASES  # noqa: E402

# the shared conv cases, plus an empty batch and no filters (the hypothesis fuzz found
# the implicit conv's packed weights failing on K = 0)
CASES = CONV_CASES + [(0, 3, 9, 8, 4, 3, 3, 1, 1), (2, 13, 6, 6, 0, 3, 3, 1, 0)]
DTYPES = {"float32": np.float32, "float64": np.float64}
# float32 GEMMs on each engine forced in turn; float64 ones always run on BLAS
ENGINES = {"float32": [e for e in ("own", "blas") if e in variants.applicable(
    "gemm", m=1, n=1, k=1, dtype=np.float32)], "float64": ["blas"]}


def _pairs(value):
    return value if isinstance(value, tuple) else (value, value)


def _conv_geometry(case, dtype):
    n, c, h, w, k, kh, kw, stride, padding = case
    return dict(x_shape=(n, c, h, w), w_shape=(k, c, kh, kw), stride=stride, padding=padding,
                dtype=dtype)


def _conv_params(op):
    """(case index, dtype name, engine, variant) for each applicable variant of ``op``."""
    params = []
    for index, case in enumerate(CASES):
        for dname, dtype in DTYPES.items():
            for variant in variants.applicable(op, **_conv_geometry(case, dtype)):
                params += [pytest.param(index, dname, engine, variant,
                                        id=f"case{index}-{dname}-{engine}-{variant}")
                           for engine in ENGINES[dname]]
    return params


@functools.lru_cache(maxsize=None)
def _conv_data(index, dname):
    """Inputs and the reference's results (forward, backward) for one case and dtype."""
    n, c, h, w, k, kh, kw, stride, padding = CASES[index]
    dtype = DTYPES[dname]
    stride, padding = _pairs(stride), _pairs(padding)
    rng = np.random.default_rng(index)
    x = rng.standard_normal((n, c, h, w)).astype(dtype)
    W = rng.standard_normal((k, c, kh, kw)).astype(dtype)
    b = rng.standard_normal(k).astype(dtype)
    y = _reference.conv2d_forward(x, W, b, stride, padding)
    grad_y = rng.standard_normal(y.shape).astype(dtype)
    return x, W, b, stride, padding, y, grad_y, _reference.conv2d_backward(grad_y, x, W, stride,
                                                                           padding)


def _first_outputs(y, grad_y):
    """An output_size below y's (one row and two columns fewer where there are that
    many), y's slice and grad_y's, and the reference's backward of that slice."""
    size = max(1, y.shape[2] - 1), max(1, y.shape[3] - 2)
    return (size, y[:, :, :size[0], :size[1]],
            np.ascontiguousarray(grad_y[:, :, :size[0], :size[1]]))


def assert_close(got, want, dtype):
    """Round-off relative to the largest value (sums of many products)."""
    eps = 1e-5 if dtype == np.float32 else 1e-12
    assert got.dtype == dtype and got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=eps,
                               atol=eps * max(1.0, float(np.abs(want).max(initial=0))))


@pytest.mark.parametrize("index, dname, engine, variant", _conv_params("conv2d_forward"))
def test_conv2d_forward_variant_matches_reference(index, dname, engine, variant):
    x, W, b, stride, padding, y, grad_y, _ = _conv_data(index, dname)
    size, first, _ = _first_outputs(y, grad_y)
    with variants.force("gemm", engine), variants.force("conv2d_forward", variant):
        assert_close(_cpu.conv2d_forward(x, W, b, stride, padding), y, DTYPES[dname])
        assert_close(_cpu.conv2d_forward(x, W, None, stride, padding),
                     _reference.conv2d_forward(x, W, None, stride, padding), DTYPES[dname])
        assert_close(_cpu.conv2d_forward(x, W, b, stride, padding, size), first, DTYPES[dname])
        if min(y.shape[2:]) >= 2:    # the conv and its 2x2 max pool in one call: their bits
            even = (y.shape[2] // 2 * 2, y.shape[3] // 2 * 2)
            pooled = _cpu.conv2d_maxpool_forward(x, W, b, stride, padding)
            want = _cpu.maxpool2d_forward(_cpu.conv2d_forward(x, W, b, stride, padding, even),
                                          2, 2, (2, 2))
            for got, one_by_one in zip(pooled, want):
                np.testing.assert_array_equal(got, one_by_one)


@pytest.mark.parametrize("index, dname, engine, variant", _conv_params("conv2d_backward"))
def test_conv2d_backward_variant_matches_reference(index, dname, engine, variant):
    x, W, _, stride, padding, y, grad_y, want = _conv_data(index, dname)
    size, _, first_grad = _first_outputs(y, grad_y)
    want_first = _reference.conv2d_backward(first_grad, x, W, stride, padding,
                                            output_size=size)
    with variants.force("gemm", engine), variants.force("conv2d_backward", variant):
        got = _cpu.conv2d_backward(grad_y, x, W, stride, padding)
        without = _cpu.conv2d_backward(grad_y, x, W, stride, padding, False)
        got_first = _cpu.conv2d_backward(first_grad, x, W, stride, padding, True, size)
        without_first = _cpu.conv2d_backward(first_grad, x, W, stride, padding, False, size)
    for g, w in zip(got, want):
        assert_close(g, w, DTYPES[dname])
    assert without[0] is None and without_first[0] is None
    for g, w in zip(without[1:], want[1:]):
        assert_close(g, w, DTYPES[dname])
    for g, w in zip(got_first + without_first[1:], want_first + want_first[1:]):
        assert_close(g, w, DTYPES[dname])


# --- dense ------------------------------------------------------------------------

# the shared dense cases, plus batch 1 with inputs for several GEMV blocks
DENSE = DENSE_CASES + [(1, 300, 70)]
DENSE_ENGINES = {"float32": ENGINES["float32"] + (
    ["own_packed"] if "own" in ENGINES["float32"] else []), "float64": ["blas"]}


def _dense_params(op):
    params = []
    for n, i, o in DENSE:
        for dname, dtype in DTYPES.items():
            for variant in variants.applicable(op, x_shape=(n, i), w_shape=(i, o), dtype=dtype):
                params += [pytest.param((n, i, o), dname, engine, variant,
                                        id=f"{n}x{i}x{o}-{dname}-{engine}-{variant}")
                           for engine in DENSE_ENGINES[dname]]
    return params


def _dense_data(shape, dname):
    n, i, o = shape
    dtype = DTYPES[dname]
    rng = np.random.default_rng(n + 3 * i + 7 * o)
    x = rng.standard_normal((n, i)).astype(dtype)
    W = (rng.standard_normal((i, o)) / np.sqrt(max(i, 1))).astype(dtype)
    return x, W, rng.standard_normal(o).astype(dtype), rng.standard_normal((n, o)).astype(dtype)


@pytest.mark.parametrize("shape, dname, engine, variant", _dense_params("dense_forward"))
def test_dense_forward_variant_matches_reference(shape, dname, engine, variant):
    x, W, b, _ = _dense_data(shape, dname)
    with variants.force("gemm", engine), variants.force("dense_forward", variant):
        for bias in (b, None):
            for relu in (False, True):
                assert_close(_cpu.dense_forward(x, W, bias, relu),
                             _reference.dense_forward(x, W, bias, relu=relu), DTYPES[dname])


@pytest.mark.parametrize("shape, dname, engine, variant", _dense_params("dense_backward"))
def test_dense_backward_variant_matches_reference(shape, dname, engine, variant):
    x, W, _, grad_y = _dense_data(shape, dname)
    x = np.maximum(x, 0)                  # a ReLU's output, for relu_x
    with variants.force("gemm", engine), variants.force("dense_backward", variant):
        for relu_x in (False, True):
            got = _cpu.dense_backward(grad_y, x, W, True, relu_x)
            for g, w in zip(got, _reference.dense_backward(grad_y, x, W, relu_x=relu_x)):
                assert_close(g, w, DTYPES[dname])
    if variant != "pair":
        with variants.force("gemm", engine), variants.force("dense_backward", variant):
            got = _cpu.dense_backward(grad_y, x, W, False)
        assert got[0] is None
        for g, w in zip(got[1:], _reference.dense_backward(grad_y, x, W)[1:]):
            assert_close(g, w, DTYPES[dname])


OWN_GEMV = [v for v in ("gemv_own", "gemv_own_split") if v in variants.applicable(
    "dense_forward", x_shape=(1, 1), w_shape=(1, 1), dtype=np.float32)]
needs_own_gemv = pytest.mark.skipif(not OWN_GEMV, reason="no AVX-512F: no own GEMV")


@needs_own_gemv
@pytest.mark.parametrize("variant", OWN_GEMV)
@pytest.mark.parametrize("i", [1, 3, 784])
@pytest.mark.parametrize("o", [1, 15, 16, 17, 63, 64, 65, 127, 511, 513, 1000])
def test_own_gemv_tails_match_reference(variant, i, o):
    """Blocks of 1..16 vectors, masked last vectors, rows left over by 2 or 4 chains."""
    x, W, b, _ = _dense_data((1, i, o), "float32")
    with variants.force("dense_forward", variant):
        for bias in (b, None):
            for relu in (False, True):
                want = _reference.dense_forward(x.astype(np.float64), W.astype(np.float64),
                                                None if bias is None else
                                                bias.astype(np.float64), relu=relu)
                assert_close(_cpu.dense_forward(x, W, bias, relu), want.astype(np.float32),
                             np.float32)


@needs_own_gemv
@pytest.mark.parametrize("variant", OWN_GEMV)
@pytest.mark.parametrize("i, o", [(37, 256), (300, 128), (9, 240), (300, 112), (300, 32),
                                  (5, 17), (300, 1)])
def test_own_gemv_any_alignment_of_w(variant, i, o):
    """W at every 4-byte offset from a 64-byte line (the kernel aligns its loads where
    the rows allow it, masking lanes before W; blocks of 7, 8, 15, 16, 17 vectors): the
    bits of an aligned copy."""
    x, W, b, _ = _dense_data((1, i, o), "float32")
    with variants.force("dense_forward", variant):
        want = _cpu.dense_forward(x, np.require(W, requirements="A"), b, True)
        buffer = np.zeros(W.size + 64, np.float32)
        base = (-buffer.ctypes.data % 64) // 4
        for shift in range(16):
            moved = buffer[base + shift:base + shift + W.size].reshape(W.shape)
            moved[...] = W
            assert moved.ctypes.data % 64 == 4 * shift
            np.testing.assert_array_equal(_cpu.dense_forward(x, moved, b, True), want)
        assert_close(want, _reference.dense_forward(x, W, b, relu=True), np.float32)


def test_own_gemv_needs_float32_and_avx512():
    geometry = dict(x_shape=(1, 3), w_shape=(3, 4))
    for variant in ("gemv_own", "gemv_own_split"):
        if not OWN_GEMV:
            assert "AVX-512F" in variants.why_not("dense_forward", variant, dtype=np.float32,
                                                  **geometry)
            with pytest.raises(ValueError, match=f"variant '{variant}' cannot run here"):
                with variants.force("dense_forward", variant):
                    pass
            continue
        assert variants.why_not("dense_forward", variant, dtype=np.float64, **geometry) == \
            "fastnn's own GEMV runs float32 only"
        with variants.force("dense_forward", variant):
            with pytest.raises(ValueError, match=f"variant '{variant}' is forced .*float32 only"):
                _cpu.dense_forward(np.ones((1, 3)), np.ones((3, 4)), None)
            with pytest.raises(ValueError, match="one sample"):
                _cpu.dense_forward(np.ones((2, 3), np.float32), np.ones((3, 4), np.float32),
                                   None)
    want = "gemv_own" if OWN_GEMV else "gemv"
    assert variants.chosen("dense_forward", dtype=np.float32, **geometry) == want
    assert variants.chosen("dense_forward", dtype=np.float64, **geometry) == "gemv"


# --- the registry -----------------------------------------------------------------

@pytest.mark.parametrize("op, params", [
    ("conv2d_forward", _conv_params("conv2d_forward")),
    ("conv2d_backward", _conv_params("conv2d_backward")),
    ("dense_forward", _dense_params("dense_forward")),
    ("dense_backward", _dense_params("dense_backward"))])
def test_every_variant_runs_on_some_case(op, params):
    """Each variant this CPU can run meets at least one case above (else a case is missing)."""
    tested = {p.values[3] for p in params}
    runnable = set(variants.names(op))
    lenet1 = _conv_geometry((64, 1, 28, 28, 6, 5, 5, 1, 2), np.float32)
    if "direct" not in variants.applicable("conv2d_forward", **lenet1):
        runnable.discard("direct")        # no AVX2 + FMA: no direct conv
    if "implicit" not in variants.applicable("conv2d_forward", **lenet1):
        runnable.discard("implicit")      # no AVX-512: no implicit conv
    assert runnable <= tested, f"{op}: no case runs {sorted(runnable - tested)}"


def _chosen_cases():
    for index, case in enumerate(CASES):
        for dname, dtype in DTYPES.items():
            yield pytest.param(index, dname, id=f"case{index}-{dname}")


@pytest.mark.skipif("implicit" not in variants.applicable(
    "conv2d_forward", **_conv_geometry(CASES[0], np.float32)), reason="needs AVX-512")
@pytest.mark.parametrize("index", [i for i, case in enumerate(CASES)
                                   if case[1] >= 4 and _pairs(case[7]) == (1, 1)])
def test_implicit_conv_gives_the_patch_rows_bits(index):
    """The implicit conv sums the patch rows' products in their order: on fastnn's GEMM
    it gives the bits of the patch-row forward and of rows_col2im's backward, so the
    chooser taking it changes no training trajectory."""
    x, W, b, stride, padding, _, grad_y, _ = _conv_data(index, "float32")
    results = {}
    for forward, backward in (("rows", "rows_col2im"), ("implicit", "implicit")):
        with variants.force("gemm", "own"), variants.force("conv2d_forward", forward), \
                variants.force("conv2d_backward", backward):
            results[forward] = (_cpu.conv2d_forward(x, W, b, stride, padding),
                                *_cpu.conv2d_backward(grad_y, x, W, stride, padding))
    for rows, implicit in zip(results["rows"], results["implicit"]):
        np.testing.assert_array_equal(rows, implicit)


@pytest.mark.parametrize("index, dname", list(_chosen_cases()))
def test_chosen_names_the_variant_that_runs(index, dname):
    """Forcing the variant that ``chosen`` names gives the chooser's bits."""
    x, W, b, stride, padding, y, grad_y, _ = _conv_data(index, dname)
    geometry = _conv_geometry(CASES[index], DTYPES[dname])
    auto = (_cpu.conv2d_forward(x, W, b, stride, padding),
            *_cpu.conv2d_backward(grad_y, x, W, stride, padding))
    with variants.force("conv2d_forward", variants.chosen("conv2d_forward", **geometry)), \
            variants.force("conv2d_backward", variants.chosen("conv2d_backward", **geometry)):
        forced = (_cpu.conv2d_forward(x, W, b, stride, padding),
                  *_cpu.conv2d_backward(grad_y, x, W, stride, padding))
    for a, f in zip(auto, forced):
        np.testing.assert_array_equal(a, f)


def test_chosen_dense_and_gemm_variants():
    f32 = dict(dtype=np.float32)
    assert variants.chosen("dense_forward", x_shape=(1, 5), w_shape=(5, 3), **f32) == \
        ("gemv_own" if OWN_GEMV else "gemv")
    assert variants.chosen("dense_forward", x_shape=(7, 13), w_shape=(13, 4), **f32) == "gemm"
    assert variants.chosen("dense_backward", x_shape=(3, 4), w_shape=(4, 2), **f32) == "serial"
    assert variants.chosen("dense_backward", x_shape=(3, 4), w_shape=(4, 2), need_grad_x=False,
                           **f32) == "serial"
    assert variants.chosen("gemm", m=4, n=4, k=4, dtype=np.float32) == "blas"
    big = "own" if "own" in variants.applicable("gemm", m=1, n=1, k=1, **f32) else "blas"
    assert variants.chosen("gemm", m=256, n=256, k=256, **f32) == big
    assert variants.chosen("gemm", m=256, n=256, k=256, dtype=np.float64) == "blas"


@pytest.mark.parametrize("op", ["row_kernels", "sgd_step"])
def test_cpu_only_variants(op):
    """AVX-512 loops where the CPU has them (chosen), the portable ones always."""
    assert variants.names(op) == ("avx512", "portable")
    usable = variants.applicable(op)
    assert "portable" in usable
    assert variants.chosen(op) == ("avx512" if "avx512" in usable else "portable")
    if "avx512" not in usable:
        with pytest.raises(ValueError, match=f"{op}: variant 'avx512' cannot run here"):
            with variants.force(op, "avx512"):
                pass
    with variants.force(op, "portable"):
        assert variants.forced(op) == "portable"
    assert variants.forced(op) is None


def test_names_and_unknown_ops_or_variants():
    assert set(variants.OPS) == set(_cpu.VARIANTS)
    assert variants.names("conv2d_forward") == ("winograd", "direct", "pointwise", "rows",
                                                "columns", "implicit")
    assert "pair" in variants.names("dense_backward")
    with pytest.raises(ValueError, match="op must be one of .*got 'conv3d'"):
        variants.names("conv3d")
    with pytest.raises(ValueError, match="conv2d_forward has no variant 'fft'"):
        with variants.force("conv2d_forward", "fft"):
            pass
    assert variants.forced("conv2d_forward") is None


def test_force_restores_the_previous_setting_even_after_an_error():
    with variants.force("gemm", "blas"):
        with pytest.raises(RuntimeError):
            with variants.force("gemm", None):
                assert variants.forced("gemm") is None
                raise RuntimeError("inside")
        assert variants.forced("gemm") == "blas"
    assert variants.forced("gemm") is None


@pytest.mark.parametrize("op, variant, call, words", [
    ("conv2d_forward", "winograd",
     lambda: _cpu.conv2d_forward(*_conv_data(3, "float32")[:5]), "3x3 kernel"),
    ("conv2d_forward", "pointwise",
     lambda: _cpu.conv2d_forward(*_conv_data(0, "float32")[:5]), "1x1 kernel"),
    ("conv2d_forward", "direct",
     lambda: _cpu.conv2d_forward(*_conv_data(0, "float64")[:5]), "float32 only"),
    ("conv2d_backward", "rows_col2im",
     lambda: _cpu.conv2d_backward(np.zeros((2, 4, 4, 3)), *_conv_data(4, "float64")[:2],
                                  (2, 2), (0, 0)), "stride 1"),
    ("dense_forward", "gemv",
     lambda: _cpu.dense_forward(np.ones((2, 3)), np.ones((3, 4)), None), "one sample"),
    ("dense_backward", "pair",
     lambda: _cpu.dense_backward(np.ones((2, 4)), np.ones((2, 3)), np.ones((3, 4)), False),
     "need_grad_x"),
])
def test_forced_variant_that_cannot_run_a_call_raises(op, variant, call, words):
    if variant == "direct" and "direct" not in variants.applicable(
            "conv2d_forward", **_conv_geometry(CASES[0], np.float32)):
        pytest.skip("no direct conv on this CPU")
    with variants.force(op, variant):
        with pytest.raises(ValueError, match=f"{op}: variant '{variant}' is forced") as info:
            call()
    assert words in str(info.value)


def test_own_gemm_forced_on_float64_raises():
    if "own" not in variants.applicable("gemm", m=1, n=1, k=1, dtype=np.float32):
        with pytest.raises(ValueError, match="gemm: variant 'own' cannot run here: .*AVX-512"):
            with variants.force("gemm", "own"):
                pass
        return
    assert variants.why_not("gemm", "own", m=2, n=2, k=2, dtype=np.float64) == \
        "fastnn's own GEMM kernel runs float32 only"
    with variants.force("gemm", "own"):
        with pytest.raises(ValueError, match="gemm: variant 'own' is forced .*float32 only"):
            _cpu.dense_forward(np.ones((2, 3)), np.ones((3, 4)), None)


def _python(code, **env):
    return run_python(code, env=env)


def test_environment_forces_a_variant_at_import():
    run = _python("from fastnn.kernels import variants; print(variants.forced('gemm'), "
                  "variants.forced('conv2d_forward'))", FASTNN_VARIANT_GEMM="blas",
                  FASTNN_VARIANT_CONV2D_FORWARD="columns")
    assert run.returncode == 0, run.stderr
    assert run.stdout.split() == ["blas", "columns"]
    bad = _python("import fastnn", FASTNN_VARIANT_DENSE_FORWARD="gemv2")
    assert bad.returncode != 0
    assert "FASTNN_VARIANT_DENSE_FORWARD=gemv2" in bad.stderr and "no variant 'gemv2'" in bad.stderr
