"""Arguments that once crashed a kernel or changed memory they must not: every ``out=``
checked (writeable, shape, dtype, layout, no partial overlap with an input), the
compiled wrappers refusing what would make them read or write out of bounds whoever
calls them, and sizes past 32 bits (fastnn issue 14, defects 3 and 8). Cases that
could crash run in a child process."""
import json

import numpy as np
import pytest
from numpy.lib.stride_tricks import as_strided

from fastnn import kernels
from _helpers import run_python

BACKENDS = ["numpy", "cpu"]


def _child_errors(code):
    """Run ``code`` in a child; it defines CASES, a list of (label, thunk). -> {label:
    (exception type name, message)} for each thunk (None where it raised nothing)."""
    result = run_python(code + """
import json
out = {}
for label, thunk in CASES:
    try:
        thunk()
        out[label] = None
    except Exception as e:
        out[label] = [type(e).__name__, str(e)]
print("RESULT" + json.dumps(out))
""")
    assert result.returncode == 0, f"child died ({result.returncode}): {result.stderr[-2000:]}"
    line = [s for s in result.stdout.splitlines() if s.startswith("RESULT")][-1]
    return json.loads(line[len("RESULT"):])


OUT_CASES = """
import mmap, os, tempfile
import numpy as np
from fastnn import backend, kernels
backend.use({backend!r})
x = np.linspace(-1, 1, 12).astype(np.float32)
path = os.path.join(tempfile.mkdtemp(), "out.bin")
np.memmap(path, np.float32, "w+", shape=(12,)).flush()
read_only = np.memmap(path, np.float32, "r", shape=(12,))
frozen = np.frombuffer(bytes(48), np.float32)
buf = np.linspace(-1, 1, 13).astype(np.float32)
CASES = [
    ("memmap forward", lambda: kernels.relu_forward(x, out=read_only)),
    ("memmap backward", lambda: kernels.relu_backward(x, x, out=read_only)),
    ("bytes forward", lambda: kernels.relu_forward(x, out=frozen)),
    ("bytes backward", lambda: kernels.relu_backward(x, x, out=frozen)),
    ("overlap forward", lambda: kernels.relu_forward(buf[:12], out=buf[1:13])),
    ("overlap grad_y", lambda: kernels.relu_backward(buf[:12], x, out=buf[1:13])),
    ("overlap y", lambda: kernels.relu_backward(x, buf[1:13], out=buf[:12])),
    ("shape", lambda: kernels.relu_forward(x, out=np.empty(13, np.float32))),
    ("dtype", lambda: kernels.relu_forward(x, out=np.empty(12, np.float64))),
    ("order", lambda: kernels.relu_forward(x.reshape(3, 4),
                                           out=np.empty((4, 3), np.float32).T)),
]
assert not frozen.any()                      # the immutable bytes kept their zeros
"""


@pytest.mark.parametrize("name", BACKENDS)
def test_every_out_is_checked(name):
    errors = _child_errors(OUT_CASES.format(backend=name))
    want = {"memmap": (ValueError, "writeable"), "bytes": (ValueError, "writeable"),
            "overlap": (ValueError, "shares memory"), "shape": (ValueError, "shape"),
            "dtype": (TypeError, "float64"), "order": (ValueError, "C-contiguous")}
    for label, got in errors.items():
        error, word = want[label.split()[0]]
        assert got is not None, f"{label}: accepted"
        assert got[0] == error.__name__ and "relu_" in got[1] and word in got[1], (label, got)
    assert len(errors) == 10


def test_out_may_be_exactly_an_input(cpu_backend):
    buf = np.linspace(-1, 1, 13).astype(np.float32)
    x, want = buf[:12], np.maximum(buf[:12], 0)
    assert kernels.relu_forward(x, out=x) is x
    np.testing.assert_array_equal(x, want)
    g = np.linspace(-2, 2, 12)
    y = np.where(np.arange(12) % 2, 1.0, -1.0)
    expected = np.where(y > 0, g, 0)
    assert kernels.relu_backward(g, y, out=g) is g
    np.testing.assert_array_equal(g, expected)
    g = np.linspace(-2, 2, 12)
    assert kernels.relu_backward(g, y, out=y) is y
    np.testing.assert_array_equal(y, expected)


COMPILED_CASES = """
import numpy as np
from fastnn.kernels import _cpu
f32, f64 = np.float32, np.float64
x4 = np.ones((2, 3, 8, 8), f32)
W4 = np.ones((4, 3, 3, 3), f32)
read_only = np.ones(12, f32)
read_only.flags.writeable = False
CASES = [
    ("relu_forward out shape", lambda: _cpu.relu_forward(np.ones(12, f32), np.empty(11, f32))),
    ("relu_forward out read-only", lambda: _cpu.relu_forward(np.ones(12, f32), read_only)),
    ("relu_forward out dtype", lambda: _cpu.relu_forward(np.ones(12, f32), np.empty(12, f64))),
    ("relu_backward y shape", lambda: _cpu.relu_backward(np.ones(12, f32), np.ones(3, f32))),
    ("relu_forward strided", lambda: _cpu.relu_forward(np.ones(24, f32)[::2])),
    ("leaky_relu_backward x shape", lambda: _cpu.leaky_relu_backward(np.ones(12, f32), np.ones(5, f32), 0.1)),
    ("dense_forward W rows", lambda: _cpu.dense_forward(np.ones((4, 5), f32), np.ones((3, 2), f32), None)),
    ("dense_forward b", lambda: _cpu.dense_forward(np.ones((4, 5), f32), np.ones((5, 2), f32),
                                          np.ones(7, f32))),
    ("dense_backward grad_y", lambda: _cpu.dense_backward(np.ones((4, 9), f32), np.ones((4, 5), f32),
                                                 np.ones((5, 2), f32))),
    ("dense_forward dtype", lambda: _cpu.dense_forward(np.ones((4, 5), f32), np.ones((5, 2), f64), None)),
    ("conv2d_forward W channels", lambda: _cpu.conv2d_forward(x4, np.ones((4, 2, 3, 3), f32), None,
                                                     (1, 1), (0, 0))),
    ("conv2d_forward b", lambda: _cpu.conv2d_forward(x4, W4, np.ones(9, f32), (1, 1), (0, 0))),
    ("conv2d_backward grad_y", lambda: _cpu.conv2d_backward(np.ones((2, 4, 5, 5), f32), x4, W4,
                                                  (1, 1), (0, 0))),
    ("conv2d_forward window", lambda: _cpu.conv2d_forward(x4, np.ones((4, 3, 9, 9), f32), None,
                                                 (1, 1), (0, 0))),
    ("col2im cols", lambda: _cpu.col2im(np.ones((27, 10), f32), (2, 3, 8, 8), 3, 3,
                                        (1, 1), (0, 0))),
    ("im2col stride", lambda: _cpu.im2col(x4, 3, 3, (0, 1), (0, 0))),
    ("maxpool2d_forward window", lambda: _cpu.maxpool2d_forward(x4, 9, 2, (1, 1))),
    ("maxpool2d_backward argmax dtype", lambda: _cpu.maxpool2d_backward(
        np.ones((2, 3, 4, 4), f32), np.zeros((2, 3, 4, 4), np.int32), (2, 3, 8, 8))),
    ("maxpool2d_backward x_shape", lambda: _cpu.maxpool2d_backward(
        np.ones((2, 3, 4, 4), f32), np.zeros((2, 3, 4, 4), np.int64), (5, 3, 8, 8))),
    ("avgpool2d_backward grad_y", lambda: _cpu.avgpool2d_backward(np.ones((2, 3, 5, 4), f32),
                                                        (2, 3, 8, 8), 2, 2, (2, 2))),
    ("softmax_cross_entropy labels range", lambda: _cpu.softmax_cross_entropy(
        np.ones((4, 3), f32), np.array([0, 1, 2, 3]))),
    ("softmax_cross_entropy labels shape", lambda: _cpu.softmax_cross_entropy(
        np.ones((4, 3), f32), np.array([0, 1]))),
    ("dropout_backward mask", lambda: _cpu.dropout_backward(np.ones(12, f32), np.ones(6, f32))),
    ("batchnorm_forward gamma", lambda: _cpu.batchnorm_forward(np.ones((4, 3), f32), np.ones(5),
                                                        np.ones(3), 1e-5)),
    ("batchnorm_backward x_hat", lambda: _cpu.batchnorm_backward(np.ones((4, 3), f32),
                                                         np.ones((4, 2), f32), np.ones(3),
                                                         np.ones(3, f32))),
    ("sgd_step read-only", lambda: _cpu.sgd_step(read_only, np.ones(12, f32), None, 0.1, 0.0,
                                            0.0, 0.0, False, False)),
    ("sgd_step grad size", lambda: _cpu.sgd_step(np.ones(12, f32), np.ones(3, f32), None, 0.1,
                                            0.0, 0.0, 0.0, False, False)),
    ("adam_step read-only m", lambda: _cpu.adam_step(np.ones(12, f32), np.ones(12, f32), read_only,
                                                np.ones(12, f32), 0.1, 0.9, 0.99, 1.0, 1e-8,
                                                0.0)),
    ("all_finite dtype", lambda: _cpu.all_finite(np.ones(12, np.int32))),
]
"""


def test_compiled_wrappers_refuse_out_of_bounds_arguments():
    """Called directly (as the layers do), each compiled wrapper raises, naming itself,
    where its kernel would read or write past an array."""
    pytest.importorskip("fastnn.kernels._cpu")
    errors = _child_errors(COMPILED_CASES)
    assert len(errors) == 29
    for label, got in errors.items():
        assert got is not None, f"{label}: accepted"
        assert got[0] in ("ValueError", "TypeError"), (label, got)
        assert got[1].startswith(label.split()[0] + ":"), (label, got)


# --- 64-bit sizes ------------------------------------------------------------------------

def _fake(shape, dtype=np.float32):
    """A C-contiguous array of ``shape`` over a one-element buffer (never to be read
    where the shape has more than one element)."""
    base = np.zeros(1, dtype)
    strides = [base.itemsize] * len(shape)
    for k in range(len(shape) - 2, -1, -1):
        strides[k] = strides[k + 1] * max(shape[k + 1], 1)
    return as_strided(base, shape=shape, strides=strides)


def test_dense_keeps_sizes_past_32_bits(cpu_backend):
    """A (2^32 + 3, 0) input gives a (2^32 + 3, O) output (it gave (3, 0))."""
    n = 2 ** 32 + 3
    x = _fake((n, 0))
    y = kernels.dense_forward(x, np.zeros((0, 0), np.float32), np.zeros(0, np.float32))
    assert y.shape == (n, 0) and y.dtype == np.float32
    grad_x, grad_w, grad_b = kernels.dense_backward(_fake((n, 0)), x, np.zeros((0, 0), np.float32))
    assert grad_x.shape == (n, 0) and grad_w.shape == (0, 0) and grad_b.shape == (0,)
    y = kernels.dense_forward(np.zeros((3, 0)), np.zeros((0, 2)), np.array([1.0, -2.0]), relu=True)
    np.testing.assert_array_equal(y, [[1.0, 0.0]] * 3)


def test_gemm_dimensions_past_int_max_are_refused():
    """BLAS takes C int dimensions: a batch of 2^31 rows is refused, never truncated
    (the fake arrays would crash any kernel that read them: child process)."""
    pytest.importorskip("fastnn.kernels._cpu")
    errors = _child_errors("""
import numpy as np
from numpy.lib.stride_tricks import as_strided
from fastnn.kernels import _cpu
big = as_strided(np.zeros(1, np.float32), shape=(2 ** 31, 1), strides=(4, 4))
w = np.ones((1, 1), np.float32)
CASES = [("forward", lambda: _cpu.dense_forward(big, w, None)),
         ("backward", lambda: _cpu.dense_backward(big, big, w))]
""")
    for label in ("forward", "backward"):
        assert errors[label] is not None and errors[label][0] == "ValueError"
        assert "dense_" in errors[label][1] and "2147483648" in errors[label][1]


@pytest.mark.parametrize("call, words", [
    (lambda x, W: kernels.conv2d_forward(x, W, padding=2 ** 31), ["conv2d_forward", "padding"]),
    (lambda x, W: kernels.conv2d_forward(x, W, stride=(1, 2 ** 40)), ["conv2d_forward", "stride"]),
    (lambda x, W: kernels.conv2d_backward(np.zeros((1, 1, 2, 2)), x, W, stride=2 ** 31),
     ["conv2d_backward", "stride"]),
    (lambda x, W: kernels.maxpool2d_forward(x, 2, 2, 2 ** 31), ["maxpool2d_forward", "stride"]),
    (lambda x, W: kernels.avgpool2d_forward(x, 1, 1, (2 ** 33, 1)), ["avgpool2d_forward", "stride"]),
    (lambda x, W: kernels.im2col(x, 1, 1, padding=2 ** 31), ["im2col", "padding"]),
    (lambda x, W: kernels.col2im(np.zeros((1, 4)), (1, 1, 2, 2), 1, 1, stride=2 ** 31),
     ["col2im", "stride"]),
    (lambda x, W: kernels.im2col(np.zeros((1, 4, 2, 2)), 1, 1, padding=(2 ** 30, 2 ** 30)),
     ["im2col", "2^62"]),
])
def test_absurd_geometry_is_refused(cpu_backend, call, words):
    x, W = np.zeros((1, 1, 2, 2)), np.zeros((1, 1, 1, 1))
    with pytest.raises(ValueError) as info:
        call(x, W)
    for word in words:
        assert word in str(info.value)


def test_huge_padding_computes_in_64_bits(cpu_backend):
    """Padding 2^30 (2 * padding past a C int): an empty output of the right size,
    where the 32-bit geometry overflowed (UBSan) and sized outputs from garbage."""
    p = 2 ** 30
    y = kernels.conv2d_forward(np.zeros((1, 0, 2, 2)), np.zeros((0, 0, 1, 1)), padding=(p, 0))
    assert y.shape == (1, 0, 2 * p + 2, 2)
    cols = kernels.im2col(np.zeros((1, 0, 2, 2)), 1, 1, padding=(0, p))
    assert cols.shape == (0, 2 * (2 * p + 2))
    y = kernels.maxpool2d_forward(np.zeros((0, 1, 2, 2 ** 31 + 1))[:, :, :, ::2 ** 31], 1, 1,
                                  (1, 2 ** 31 - 1))
    assert y[0].shape == (0, 1, 2, 1)
