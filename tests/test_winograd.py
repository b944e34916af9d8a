"""The compiled Winograd F(2x2, 3x3) conv (csrc/winograd_template.h) against the NumPy
reference: forward, grad_x, grad_W, grad_b on odd and even sizes, every padding it
takes, few and many channels, float32 and float64 (the variant "winograd" forced with
``fastnn.kernels.variants.force``); its blocking, determinism, and when the chooser
takes it."""
import numpy as np
import pytest

from _helpers import run_python
from fastnn import backend, kernels
from fastnn.kernels import _reference, variants

_cpu = pytest.importorskip("fastnn.kernels._cpu")

# relative to the largest value of the result; float32 Winograd adds a few ulps of
# transform round-off on top of the direct conv's (measured: 3-7e-7 here)
TOLERANCE = {np.float32: 1e-4, np.float64: 1e-12}


@pytest.fixture
def winograd():
    """Force Winograd (forward and backward), on the compiled backend."""
    previous_backend = backend.current()
    backend.use("cpu")
    with variants.force("conv2d_forward", "winograd"), \
            variants.force("conv2d_backward", "winograd"):
        yield
    backend.use(previous_backend)


@pytest.fixture(params=[1, 5, 40])
def small_blocks(request):
    """Small blocks of tiles: bands of tile rows, pieces of tile rows, single tiles."""
    old = _cpu._set_winograd_tiles(request.param)
    yield
    _cpu._set_winograd_tiles(old)


def inputs(n, c, k, h, w, dtype, seed=0):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((n, c, h, w)).astype(dtype),
            rng.standard_normal((k, c, 3, 3)).astype(dtype),
            rng.standard_normal(k).astype(dtype))


def reference(x, W, b, grad_y, padding):
    """Forward and backward of the NumPy reference, in float64."""
    x, W, b, grad_y = (a.astype(np.float64) for a in (x, W, b, grad_y))
    return (_reference.conv2d_forward(x, W, b, (1, 1), padding),
            *_reference.conv2d_backward(grad_y, x, W, (1, 1), padding))


def assert_matches_reference(got, want, dtype):
    eps = TOLERANCE[dtype]
    for name, g, r in zip(("y", "grad_x", "grad_W", "grad_b"), got, want):
        assert g.dtype == dtype and g.shape == r.shape, name
        scale = max(1.0, float(np.abs(r).max()))
        error = float(np.abs(g - r).max()) / scale
        assert error <= eps, f"{name}: relative error {error:.2e} > {eps:.0e}"


def run(x, W, b, grad_y, padding):
    return (kernels.conv2d_forward(x, W, b, 1, padding),
            *kernels.conv2d_backward(grad_y, x, W, 1, padding))


SIZES = [(1, 1), (2, 3), (5, 7), (32, 32)]
PADDINGS = [0, 1, 2, (0, 1)]
CHANNELS = [(1, 1, 1), (3, 3, 16), (1, 16, 17), (2, 17, 3)]     # (N, C, K)
CASES = [(n, c, k, h, w, p) for h, w in SIZES for p in PADDINGS for n, c, k in CHANNELS
         if h + 2 * np.broadcast_to(p, 2)[0] >= 3 and w + 2 * np.broadcast_to(p, 2)[1] >= 3]


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("case", CASES, ids=[f"n{n}c{c}k{k}-{h}x{w}-p{p}" for n, c, k, h, w, p in CASES])
def test_winograd_matches_reference(winograd, case, dtype):
    n, c, k, h, w, padding = case
    padding = kernels.pair(padding, "padding", "test", 0)
    x, W, b = inputs(n, c, k, h, w, dtype)
    assert variants.forced("conv2d_forward") == "winograd"
    assert "winograd" in variants.applicable("conv2d_backward", x_shape=x.shape,
                                             w_shape=W.shape, padding=padding, dtype=dtype)
    oh, ow = h + 2 * padding[0] - 2, w + 2 * padding[1] - 2
    grad_y = np.random.default_rng(1).standard_normal((n, k, oh, ow)).astype(dtype)
    assert_matches_reference(run(x, W, b, grad_y, padding), reference(x, W, b, grad_y, padding),
                             dtype)


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("size", [(6, 6), (1, 7), (5, 2)])
def test_winograd_first_outputs_match_reference(winograd, dtype, size):
    """output_size: Winograd computes only those outputs' tiles (6x6 of a 7x7 output: 9
    instead of 16), and its grad_x reads zeros past them; float64 reference."""
    x, W, b = inputs(3, 5, 6, 7, 7, dtype)
    grad_y = np.random.default_rng(1).standard_normal((3, 6) + size).astype(dtype)
    whole = np.zeros((3, 6, 7, 7), np.float64)
    whole[:, :, :size[0], :size[1]] = grad_y
    y, *grads = reference(x, W, b, whole, (1, 1))
    got = (kernels.conv2d_forward(x, W, b, 1, 1, output_size=size),
           *kernels.conv2d_backward(grad_y, x, W, 1, 1, output_size=size))
    assert_matches_reference(got, (y[:, :, :size[0], :size[1]], *grads), dtype)


@pytest.mark.parametrize("case", [(2, 3, 4, 33, 31, (1, 1)), (1, 5, 3, 7, 101, (0, 2)),
                                  (3, 4, 4, 40, 9, (2, 0)), (2, 16, 17, 32, 32, (1, 1))],
                         ids=["bands", "row-pieces", "tall", "w4-like"])
def test_winograd_small_blocks_match_reference(winograd, small_blocks, case):
    """Units of a few tile rows, pieces of one tile row, single tiles, with their edge
    tiles (the default blocks hold whole samples of these)."""
    n, c, k, h, w, padding = case
    x, W, b = inputs(n, c, k, h, w, np.float64, seed=2)
    grad_y = np.random.default_rng(3).standard_normal(
        (n, k, h + 2 * padding[0] - 2, w + 2 * padding[1] - 2))
    assert_matches_reference(run(x, W, b, grad_y, padding), reference(x, W, b, grad_y, padding),
                             np.float64)


def test_winograd_many_small_samples_per_block(winograd):
    """Blocks of several whole samples, the last one short (N=37 of 2x2 outputs)."""
    x, W, b = inputs(37, 5, 6, 4, 4, np.float64, seed=4)
    grad_y = np.random.default_rng(5).standard_normal((37, 6, 2, 2))
    assert_matches_reference(run(x, W, b, grad_y, (0, 0)), reference(x, W, b, grad_y, (0, 0)),
                             np.float64)


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["float32", "float64"])
def test_winograd_without_bias_and_without_grad_x(winograd, dtype):
    x, W, _ = inputs(3, 16, 16, 9, 6, dtype, seed=6)
    y = kernels.conv2d_forward(x, W, None, 1, 1)
    want = _reference.conv2d_forward(x.astype(np.float64), W.astype(np.float64), None, (1, 1), (1, 1))
    assert np.abs(y - want).max() <= TOLERANCE[dtype] * max(1.0, np.abs(want).max())
    grad_y = np.random.default_rng(7).standard_normal(y.shape).astype(dtype)
    full = kernels.conv2d_backward(grad_y, x, W, 1, 1)
    part = kernels.conv2d_backward(grad_y, x, W, 1, 1, need_grad_x=False)
    assert part[0] is None
    np.testing.assert_array_equal(part[1], full[1])
    np.testing.assert_array_equal(part[2], full[2])


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["float32", "float64"])
def test_winograd_non_contiguous_inputs(winograd, dtype):
    """Strided views through the public kernels give the same bits as their copies."""
    rng = np.random.default_rng(8)
    x = rng.standard_normal((6, 20, 12, 14)).astype(dtype)[::2, 1:18, 1:, ::-1]   # (3, 17, 11, 14)
    W = rng.standard_normal((17, 16, 3, 3)).astype(dtype).transpose(1, 0, 3, 2)  # (16, 17, 3, 3)
    b = rng.standard_normal(32).astype(dtype)[::2]
    grad_y = rng.standard_normal((3, 16, 14, 11)).astype(dtype).transpose(0, 1, 3, 2)
    copies = [np.ascontiguousarray(a) for a in (x, W, b, grad_y)]
    got = run(x, W, b, grad_y, 1)
    for g, want in zip(got, run(*copies, 1)):
        np.testing.assert_array_equal(g, want)
    assert_matches_reference(got, reference(*copies, (1, 1)), dtype)


def test_winograd_same_bits_on_repeated_calls(winograd):
    x, W, b = inputs(9, 16, 17, 20, 22, np.float32, seed=9)
    grad_y = np.random.default_rng(10).standard_normal((9, 17, 20, 22)).astype(np.float32)
    first = run(x, W, b, grad_y, 1)
    for _ in range(3):
        for g, want in zip(run(x, W, b, grad_y, 1), first):
            np.testing.assert_array_equal(g, want)


DIGEST_SCRIPT = """
    import hashlib, numpy as np
    from fastnn import backend, kernels
    from fastnn.kernels import _cpu, variants
    backend.use("cpu")
    assert variants.forced("conv2d_forward") == variants.forced("conv2d_backward") == "winograd"
    _cpu._set_winograd_tiles(18)              # many units and several chunks
    rng = np.random.default_rng(11)
    x = rng.standard_normal((9, 16, 20, 22)).astype(np.float32)
    W = rng.standard_normal((17, 16, 3, 3)).astype(np.float32)
    b = rng.standard_normal(17).astype(np.float32)
    grad_y = rng.standard_normal((9, 17, 20, 22)).astype(np.float32)
    outputs = (kernels.conv2d_forward(x, W, b, 1, 1), *kernels.conv2d_backward(grad_y, x, W, 1, 1))
    print(_cpu.threads(), hashlib.sha256(b"".join(a.tobytes() for a in outputs)).hexdigest())
"""


def test_winograd_same_bits_on_one_and_two_threads():
    """The blocks and the order of the grad_W sums do not depend on the thread count."""
    digests = []
    for threads in ("1", "2"):
        result = run_python(DIGEST_SCRIPT, env={"OMP_NUM_THREADS": threads,
                                                "FASTNN_VARIANT_CONV2D_FORWARD": "winograd",
                                                "FASTNN_VARIANT_CONV2D_BACKWARD": "winograd"})
        assert result.returncode == 0, result.stderr
        count, digest = result.stdout.split()
        assert count == threads
        digests.append(digest)
    assert digests[0] == digests[1]


@pytest.mark.parametrize("x_shape, w_shape, stride, padding, dtype, choice", [
    ((32, 64, 32, 32), (64, 64, 3, 3), (1, 1), (1, 1), np.float32, "winograd"),   # W4
    ((64, 16, 14, 14), (32, 16, 3, 3), (1, 1), (0, 2), np.float32, "winograd"),
    ((32, 64, 32, 32), (64, 64, 3, 3), (1, 1), (1, 1), np.float64, "other"),      # exact path
    ((64, 1, 28, 28), (6, 1, 5, 5), (1, 1), (2, 2), np.float32, "other"),         # LeNet conv1
    ((64, 6, 14, 14), (16, 6, 5, 5), (1, 1), (0, 0), np.float32, "other"),        # LeNet conv2
    ((32, 3, 32, 32), (64, 3, 3, 3), (1, 1), (1, 1), np.float32, "other"),        # 3 channels in
    ((32, 4, 32, 32), (4, 4, 3, 3), (1, 1), (1, 1), np.float32, "winograd"),
    ((32, 64, 32, 32), (3, 64, 3, 3), (1, 1), (1, 1), np.float32, "other"),       # 3 channels out
    ((32, 64, 32, 32), (64, 64, 3, 3), (2, 2), (1, 1), np.float32, "other"),      # stride 2
    ((32, 64, 32, 32), (64, 64, 3, 3), (1, 1), (3, 3), np.float32, "other"),      # padding 3
    ((32, 64, 2, 2), (64, 64, 3, 3), (1, 1), (1, 1), np.float32, "other"),        # 2x2 output
    ((1, 256, 14, 14), (256, 256, 3, 3), (1, 1), (1, 1), np.float32, "other"),    # few tiles in all
    ((4, 256, 14, 14), (256, 256, 3, 3), (1, 1), (1, 1), np.float32, "winograd"),
])
def test_auto_chooses_winograd_where_it_pays(x_shape, w_shape, stride, padding, dtype, choice):
    geometry = dict(x_shape=x_shape, w_shape=w_shape, stride=stride, padding=padding, dtype=dtype)
    for op in ("conv2d_forward", "conv2d_backward"):
        assert (variants.chosen(op, **geometry) == "winograd") == (choice == "winograd")


def test_forced_winograd_rejects_other_convs(winograd):
    """A 5x5 kernel or stride 2 under a forced "winograd" raises, saying why."""
    x, W, b = inputs(2, 3, 4, 8, 8, np.float64)
    W5 = np.random.default_rng(12).standard_normal((4, 3, 5, 5))
    assert "winograd" not in variants.applicable("conv2d_forward", x_shape=x.shape,
                                                 w_shape=W5.shape, padding=2)
    with pytest.raises(ValueError, match="conv2d_forward: variant 'winograd' .*3x3 kernel"):
        kernels.conv2d_forward(x, W5, b, 1, 2)
    with pytest.raises(ValueError, match="conv2d_backward: variant 'winograd' .*stride 1"):
        kernels.conv2d_backward(np.zeros((2, 4, 4, 4)), x, W, 2, 1)


def test_auto_winograd_float32_matches_reference():
    """The default choice on a W4-like conv (smaller batch): float32 within 1e-4."""
    previous = backend.current()
    backend.use("cpu")
    try:
        x, W, b = inputs(4, 64, 64, 32, 32, np.float32, seed=13)
        grad_y = np.random.default_rng(14).standard_normal((4, 64, 32, 32)).astype(np.float32)
        assert variants.chosen("conv2d_forward", x_shape=x.shape, w_shape=W.shape, padding=1,
                               dtype=np.float32) == "winograd"
        assert_matches_reference(run(x, W, b, grad_y, 1), reference(x, W, b, grad_y, (1, 1)),
                                 np.float32)
    finally:
        backend.use(previous)
