"""Property-based fuzzing (hypothesis) of every public kernel of ``fastnn.kernels`` and
every layer: the compiled kernels ("cpu") against the NumPy reference ("numpy") on random
shapes (0 and 1 included), strides, paddings, float32/float64, and inputs that are
Fortran-ordered, strided, reversed (negative strides), read-only or hold NaN/inf.
Both backends must agree: equal to round-off with NaN and inf at the same places, or
raise the same exception type.

Example counts come from a settings profile: "ci" (the default: 100 per test, seconds for
the file) or "long" (2000) for runs by hand: ``HYPOTHESIS_PROFILE=long pytest
tests/test_fuzz.py``. Not fuzzed here: ``out=`` buffers that partly overlap an input.
"""
import contextlib
import os

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fastnn as fn
from fastnn import backend, kernels
from fastnn.kernels import _cpu

settings.register_profile("ci", max_examples=100, deadline=None, print_blob=True,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("long", max_examples=2000, deadline=None, print_blob=True,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

try:                                    # main's variant registry, after the merge
    from fastnn.kernels import variants
except ImportError:                     # this branch: _cpu._set_conv_algorithm
    variants = None

DTYPES = st.sampled_from([np.float32, np.float64])


def conv_paths(op, x_shape, w_shape, stride, padding, dtype):
    """The compiled paths of conv op ``op`` ("conv2d_forward"/"conv2d_backward") that can
    run these arguments (with the variant registry), else the algorithm names (each
    falls back to im2col where it cannot run)."""
    if variants is None:
        return ["winograd", "im2col"]
    return list(variants.applicable(op, x_shape=x_shape, w_shape=w_shape, stride=stride,
                                    padding=padding, dtype=dtype))


def chosen_path(op, x_shape, w_shape, stride, padding, dtype):
    """The path the chooser picks for conv op ``op`` (None: the window does not fit)."""
    if variants is None:
        return _cpu._conv_choice(x_shape, w_shape, stride, padding, dtype)
    try:
        return variants.chosen(op, x_shape=x_shape, w_shape=w_shape, stride=stride,
                               padding=padding, dtype=dtype)
    except ValueError:
        return None


@contextlib.contextmanager
def forced_path(op, name):
    """Calls of conv op ``op`` inside the block run path ``name``."""
    if variants is not None:
        with variants.force(op, name):
            yield
        return
    old = _cpu._set_conv_algorithm(name)
    try:
        yield
    finally:
        _cpu._set_conv_algorithm(old)
LAYOUTS = ["c", "fortran", "strided", "reversed", "readonly"]


class Inputs:
    """Draws array recipes; ``build`` makes fresh arrays from them, the same for each
    backend (in-place kernels must not see the other backend's writes)."""

    def __init__(self, data, dtype, specials=True):
        self.data, self.dtype, self.specials = data, dtype, specials
        self.seed = data.draw(st.integers(0, 2**32 - 1), label="seed")

    def recipe(self, shape, layout=None, specials=None):
        """A drawn layout and NaN/inf positions for an array of ``shape``."""
        layout = layout or self.data.draw(st.sampled_from(LAYOUTS), label="layout")
        size = int(np.prod(shape))
        special = [] if not (self.specials if specials is None else specials) or not size else \
            self.data.draw(st.lists(st.tuples(st.integers(0, size - 1),
                                              st.sampled_from([np.nan, np.inf, -np.inf])),
                                    max_size=3), label="specials")
        return tuple(shape), layout, special

    def build(self, recipe, index):
        shape, layout, special = recipe
        rng = np.random.default_rng([self.seed, index])
        a = rng.standard_normal(shape).astype(self.dtype)
        for position, value in special:
            a.reshape(-1)[position] = value
        return lay_out(a, layout)


def lay_out(a, layout):
    """The values of ``a`` in the memory layout ``layout``."""
    if layout == "fortran":
        return np.asfortranarray(a)
    if layout == "strided":
        big = np.zeros(tuple(2 * s for s in a.shape), a.dtype)
        view = big[tuple(slice(None, None, 2) for _ in a.shape)]
        view[...] = a
        return view
    if layout == "reversed":
        return np.ascontiguousarray(a[..., ::-1])[..., ::-1] if a.ndim else a.copy()
    if layout == "readonly":
        a.flags.writeable = False
    return a


def run(name, f, make_args):
    """``f(*make_args())`` under backend ``name`` -> ("ok", result) or ("error", type)."""
    previous = backend.current()
    backend.use(name)
    try:
        with np.errstate(all="ignore"):         # NaN/inf inputs: NumPy's warnings
            return "ok", f(*make_args())
    except Exception as e:          # the same exception type must come from both
        return "error", type(e)
    finally:
        backend.use(previous)


def assert_same(got, want, dtype):
    """Arrays (or tuples of them, None, scalars) equal to round-off, NaN/inf in place."""
    if isinstance(want, (tuple, list)):
        assert isinstance(got, (tuple, list)) and len(got) == len(want)
        for g, w in zip(got, want):
            assert_same(g, w, dtype)
        return
    if want is None:
        assert got is None
        return
    got, want = np.asarray(got), np.asarray(want)
    assert got.shape == want.shape and got.dtype == want.dtype, (got.shape, want.shape)
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want), err_msg="NaN positions")
    np.testing.assert_array_equal(np.isposinf(got), np.isposinf(want), err_msg="+inf positions")
    np.testing.assert_array_equal(np.isneginf(got), np.isneginf(want), err_msg="-inf positions")
    finite = np.isfinite(want)
    if got.dtype.kind == "f":
        eps = 1e-4 if got.dtype == np.float32 else 1e-10
        scale = max(1.0, float(np.abs(want[finite]).max(initial=0)))
        np.testing.assert_allclose(got[finite], want[finite], rtol=eps, atol=eps * scale)
    else:
        np.testing.assert_array_equal(got, want)


def check(f, make_args, dtype):
    """cpu against numpy: the same values, or the same exception type."""
    (kind_c, got), (kind_n, want) = run("cpu", f, make_args), run("numpy", f, make_args)
    assert kind_c == kind_n, f"cpu gave {kind_c} {got}, numpy {kind_n} {want}"
    if kind_c == "error":
        assert got is want, f"cpu raised {got.__name__}, numpy {want.__name__}"
    else:
        assert_same(got, want, dtype)


def geometry(data, min_size=0):
    """(N, C, H, W), a kernel (kh, kw), stride and padding (pairs or ints); kernels larger
    than the padded input are drawn too (both backends must raise)."""
    sizes = st.integers(min_size, 4)
    n, c = data.draw(sizes, label="n"), data.draw(sizes, label="c")
    h, w = data.draw(st.integers(1, 9), label="h"), data.draw(st.integers(1, 9), label="w")
    kh, kw = data.draw(st.integers(1, 5), label="kh"), data.draw(st.integers(1, 5), label="kw")
    pair = st.one_of(st.integers(1, 3), st.tuples(st.integers(1, 3), st.integers(1, 3)))
    stride = data.draw(pair, label="stride")
    padding = data.draw(st.one_of(st.integers(0, 2), st.tuples(st.integers(0, 2),
                                                               st.integers(0, 2))), label="padding")
    return (n, c, h, w), (kh, kw), stride, padding


# --- kernels -------------------------------------------------------------------------

@given(data=st.data(), dtype=DTYPES)
def test_im2col_col2im(data, dtype):
    inputs = Inputs(data, dtype)
    shape, (kh, kw), stride, padding = geometry(data)
    x = inputs.recipe(shape)
    check(lambda x: kernels.im2col(x, kh, kw, stride, padding), lambda: (inputs.build(x, 0),),
          dtype)
    try:
        oh = kernels.conv_output_size(shape[2], kh, kernels.pair(stride, "", "", 1)[0],
                                      kernels.pair(padding, "", "", 0)[0])
        ow = kernels.conv_output_size(shape[3], kw, kernels.pair(stride, "", "", 1)[1],
                                      kernels.pair(padding, "", "", 0)[1])
    except (TypeError, ValueError):
        return
    cols = inputs.recipe((shape[1] * kh * kw, shape[0] * max(oh, 0) * max(ow, 0)))
    check(lambda c: kernels.col2im(c, shape, kh, kw, stride, padding),
          lambda: (inputs.build(cols, 1),), dtype)


@given(data=st.data(), dtype=DTYPES)
def test_pools(data, dtype):
    inputs = Inputs(data, dtype)
    shape, (kh, kw), stride, _ = geometry(data)
    x = inputs.recipe(shape)
    check(lambda x: kernels.maxpool2d_forward(x, kh, kw, stride), lambda: (inputs.build(x, 0),),
          dtype)
    check(lambda x: kernels.avgpool2d_forward(x, kh, kw, stride), lambda: (inputs.build(x, 0),),
          dtype)
    kind, result = run("numpy", lambda x: kernels.maxpool2d_forward(x, kh, kw, stride),
                       lambda: (inputs.build(x, 0),))
    if kind == "error":
        return
    y, argmax = result
    if argmax.size and data.draw(st.booleans(), label="argmax out of its plane"):
        argmax.reshape(-1)[data.draw(st.integers(0, argmax.size - 1))] = \
            data.draw(st.sampled_from([-1, shape[2] * shape[3], 2**40]))
    grad = inputs.recipe(y.shape)
    check(lambda g: kernels.maxpool2d_backward(g, argmax, shape),
          lambda: (inputs.build(grad, 1),), dtype)
    check(lambda g: kernels.avgpool2d_backward(g, shape, kh, kw, stride),
          lambda: (inputs.build(grad, 1),), dtype)


def _conv_case(data, dtype, specials=True):
    """A drawn conv. The weights stay finite: the compiled grad_x (a transposed conv over
    grad_y padded with zeros) multiplies every weight by those zeros, so an inf/NaN weight
    makes NaN (0 * inf) at pixels the reference's col2im never pairs it with."""
    inputs = Inputs(data, dtype, specials)
    shape, (kh, kw), stride, padding = geometry(data)
    k = data.draw(st.integers(0, 4), label="k")
    x, W = inputs.recipe(shape), inputs.recipe((k, shape[1], kh, kw), specials=False)
    b = inputs.recipe((k,)) if data.draw(st.booleans(), label="bias") else None
    return inputs, shape, (kh, kw), stride, padding, k, x, W, b


def _check_conv_maxpool(args, stride, padding, dtype):
    """conv2d_maxpool_forward: its values against the reference's (the argmax may differ
    where two outputs round apart differently), and on the compiled kernels the bits of
    conv2d_forward then maxpool2d_forward (argmax included), or the same error."""
    def one_by_one(x, W, b):
        y = kernels.conv2d_forward(x, W, b, stride, padding)
        even = (max(1, y.shape[2] // 2 * 2), max(1, y.shape[3] // 2 * 2))
        return kernels.maxpool2d_forward(kernels.conv2d_forward(
            x, W, b, stride, padding, output_size=even), 2, 2, 2)
    check(lambda x, W, b: kernels.conv2d_maxpool_forward(x, W, b, stride, padding)[0], args,
          dtype)
    (kind, got), (kind_one, want) = (
        run("cpu", lambda x, W, b: kernels.conv2d_maxpool_forward(x, W, b, stride, padding), args),
        run("cpu", one_by_one, args))
    assert kind == kind_one, f"fused gave {kind} {got}, one by one {kind_one} {want}"
    assert kind == "ok" or got is want, f"fused raised {got.__name__}, one by one {want.__name__}"
    if kind == "ok":
        for g, w in zip(got, want):
            np.testing.assert_array_equal(g.view(np.uint8), w.view(np.uint8))


@given(data=st.data(), dtype=DTYPES)
def test_conv(data, dtype):
    inputs, shape, (kh, kw), stride, padding, k, x, W, b = _conv_case(data, dtype)
    pairs = kernels.pair(stride, "", "", 1), kernels.pair(padding, "", "", 0)
    if "winograd" in [chosen_path(op, shape, (k, shape[1], kh, kw), *pairs, dtype)
                      for op in ("conv2d_forward", "conv2d_backward")]:
        # Winograd mixes a tile's pixels: NaN/inf reach other outputs than a direct conv's
        inputs.specials = False
        x = inputs.recipe(shape, specials=False)
    args = lambda: (inputs.build(x, 0), inputs.build(W, 1), b and inputs.build(b, 2))
    check(lambda x, W, b: kernels.conv2d_forward(x, W, b, stride, padding), args, dtype)
    _check_conv_maxpool(args, stride, padding, dtype)
    oh = max(0, (shape[2] + 2 * kernels.pair(padding, "", "", 0)[0] - kh)
             // kernels.pair(stride, "", "", 1)[0] + 1)
    ow = max(0, (shape[3] + 2 * kernels.pair(padding, "", "", 0)[1] - kw)
             // kernels.pair(stride, "", "", 1)[1] + 1)
    grad = inputs.recipe((shape[0], k, oh, ow))
    need_grad_x = data.draw(st.booleans(), label="need_grad_x")
    check(lambda g, x, W: kernels.conv2d_backward(g, x, W, stride, padding,
                                                  need_grad_x=need_grad_x),
          lambda: (inputs.build(grad, 3), inputs.build(x, 0), inputs.build(W, 1)), dtype)


@given(data=st.data(), dtype=DTYPES)
def test_dense(data, dtype):
    inputs = Inputs(data, dtype)
    n, i, o = (data.draw(st.integers(0, 40), label=name) for name in ("n", "i", "o"))
    x, W, grad = inputs.recipe((n, i)), inputs.recipe((i, o)), inputs.recipe((n, o))
    b = inputs.recipe((o,)) if data.draw(st.booleans(), label="bias") else None
    relu = data.draw(st.booleans(), label="relu")
    check(lambda x, W, b: kernels.dense_forward(x, W, b, relu=relu),
          lambda: (inputs.build(x, 0), inputs.build(W, 1), b and inputs.build(b, 2)), dtype)
    need_grad_x = data.draw(st.booleans(), label="need_grad_x")
    check(lambda g, x, W: kernels.dense_backward(g, x, W, need_grad_x=need_grad_x, relu_x=relu),
          lambda: (inputs.build(grad, 3), inputs.build(x, 0), inputs.build(W, 1)), dtype)


def _any_shape(data):
    return tuple(data.draw(st.lists(st.integers(0, 6), min_size=0, max_size=4), label="shape"))


@given(data=st.data(), dtype=DTYPES)
def test_elementwise(data, dtype):
    inputs = Inputs(data, dtype)
    shape = _any_shape(data)
    x, g = inputs.recipe(shape), inputs.recipe(shape)
    alpha = data.draw(st.floats(-2, 2), label="alpha")
    xs = lambda: (inputs.build(x, 0),)
    pair_ = lambda: (inputs.build(g, 1), inputs.build(x, 0))
    check(kernels.relu_forward, xs, dtype)
    check(kernels.relu_backward, pair_, dtype)
    check(lambda x: kernels.leaky_relu_forward(x, alpha), xs, dtype)
    check(lambda g, x: kernels.leaky_relu_backward(g, x, alpha), pair_, dtype)
    # out= a fresh buffer or the input itself (in place)
    check(lambda x: kernels.relu_forward(x, out=np.empty_like(x, order="C")), xs, dtype)
    check(lambda x: kernels.relu_forward(x, out=x) if x.flags.c_contiguous
          and x.flags.writeable else None, xs, dtype)


@given(data=st.data(), dtype=DTYPES)
def test_softmax_cross_entropy(data, dtype):
    inputs = Inputs(data, dtype)
    n, c = data.draw(st.integers(0, 40), label="n"), data.draw(st.integers(0, 40), label="c")
    logits = inputs.recipe((n, c))
    onehot = data.draw(st.booleans(), label="onehot")
    if onehot:
        target = inputs.recipe((n, c), specials=False)
        labels = lambda: np.abs(inputs.build(target, 1))
    else:
        drawn = data.draw(st.lists(st.integers(-1 if c == 0 else 0, max(c - 1, 0)),
                                   min_size=n, max_size=n), label="labels")
        labels = lambda: np.array(drawn, dtype=np.int64)
    check(kernels.softmax_cross_entropy, lambda: (inputs.build(logits, 0), labels()), dtype)


@given(data=st.data(), dtype=DTYPES)
def test_sgd_and_adam_steps(data, dtype):
    inputs = Inputs(data, dtype)
    shape = _any_shape(data)
    p, g = inputs.recipe(shape), inputs.recipe(shape)
    m, v = inputs.recipe(shape, "c", False), inputs.recipe(shape, "c", False)
    lr, momentum = data.draw(st.floats(0, 1), label="lr"), data.draw(st.floats(0, 0.99))
    wd, l1 = data.draw(st.floats(0, 0.1), label="wd"), data.draw(st.floats(0, 0.1), label="l1")
    nesterov, first = data.draw(st.booleans(), label="nesterov"), data.draw(st.booleans())

    def sgd(p, g, buf):
        buf = kernels.sgd_step(p, g, None if first else buf, lr=lr, momentum=momentum,
                               weight_decay=wd, l1=l1, nesterov=nesterov)
        return p, buf

    check(sgd, lambda: (inputs.build(p, 0), inputs.build(g, 1), np.abs(inputs.build(m, 2))),
          dtype)
    step = data.draw(st.integers(1, 1000), label="step")

    decoupled = data.draw(st.booleans(), label="decoupled")

    def adam(p, g, m, v):
        kernels.adam_step(p, g, m, v, lr=lr, step=step, weight_decay=wd, decoupled=decoupled)
        return p, m, v

    check(adam, lambda: (inputs.build(p, 0), inputs.build(g, 1), inputs.build(m, 2),
                         np.abs(inputs.build(v, 3))), dtype)
    alpha = data.draw(st.floats(0, 1), label="alpha")

    def rmsprop(p, g, sq, buf):
        kernels.rmsprop_step(p, g, sq, buf if momentum else None, lr=lr, alpha=alpha,
                             momentum=momentum, weight_decay=wd)
        return p, sq, buf

    check(rmsprop, lambda: (inputs.build(p, 0), inputs.build(g, 1), np.abs(inputs.build(v, 3)),
                            inputs.build(m, 2)), dtype)


@given(value=st.one_of(st.integers(-2, 5), st.booleans(), st.floats(-2, 5), st.none(),
                       st.tuples(st.integers(-1, 4), st.integers(-1, 4)),
                       st.lists(st.integers(0, 3), max_size=3)),
       minimum=st.integers(0, 1))
def test_pair_and_conv_output_size(value, minimum):
    check(lambda: kernels.pair(value, "stride", "fuzz", minimum), lambda: (), np.float64)
    size, k, s, p = (value, 3, 1, 0) if isinstance(value, int) else (7, 3, 2, 1)
    check(lambda: kernels.conv_output_size(size, k, s, p), lambda: (), np.float64)


# --- layers --------------------------------------------------------------------------

def _layer_case(data, dtype):
    """(make_layer, input shape): every layer class, drawn sizes (0 and 1 included)."""
    n, c = data.draw(st.integers(0, 4), label="n"), data.draw(st.integers(1, 5), label="c")
    h, w = data.draw(st.integers(1, 7), label="h"), data.draw(st.integers(1, 7), label="w")
    k, size = data.draw(st.integers(1, 4), label="k"), data.draw(st.integers(1, 3), label="size")
    seed, stride = data.draw(st.integers(0, 99), label="layer seed"), data.draw(st.integers(1, 2))
    kind = data.draw(st.sampled_from(sorted(LAYERS)), label="layer")
    return LAYERS[kind](n, c, h, w, k, size, stride, seed, np.dtype(dtype).name)


LAYERS = {
    "Dense": lambda n, c, h, w, k, s, st_, seed, dt: (
        lambda: fn.Dense(c, k, seed=seed, dtype=dt), (n, c)),
    "FCLayer": lambda n, c, h, w, k, s, st_, seed, dt: (
        lambda: fn.FCLayer(c, k, seed=seed, dtype=dt), (n, c)),
    "Conv2D": lambda n, c, h, w, k, s, st_, seed, dt: (
        lambda: fn.Conv2D(c, k, s, stride=st_, padding=s // 2, seed=seed, dtype=dt),
        (n, c, h, w)),
    "MaxPool2D": lambda n, c, h, w, k, s, st_, seed, dt: (
        lambda: fn.MaxPool2D(s, st_), (n, c, h, w)),
    "AvgPool2D": lambda n, c, h, w, k, s, st_, seed, dt: (
        lambda: fn.AvgPool2D(s, st_), (n, c, h, w)),
    "Flatten": lambda n, c, h, w, *_: (fn.Flatten, (n, c, h, w)),
    "ReLU": lambda n, c, h, w, *_: (fn.ReLU, (n, c, h)),
    "LeakyReLU": lambda n, c, h, w, k, *_: (lambda: fn.LeakyReLU(0.1 * k), (n, c, h)),
    "Sigmoid": lambda n, c, *_: (fn.Sigmoid, (n, c)),
    "Tanh": lambda n, c, *_: (fn.Tanh, (n, c)),
    "Softmax": lambda n, c, h, *_: (fn.Softmax, (n, c, h)),
    "Dropout": lambda n, c, h, w, k, s, st_, seed, dt: (
        lambda: fn.Dropout(0.25 * (k - 1), seed=seed), (n, c, h)),
    "BatchNorm1d": lambda n, c, h, w, k, s, st_, seed, dt: (
        lambda: fn.BatchNorm1d(c, dtype=dt), (n, c)),
    "BatchNorm2d": lambda n, c, h, w, k, s, st_, seed, dt: (
        lambda: fn.BatchNorm2d(c, dtype=dt), (n, c, h, w)),
    "ActivationLayer": lambda n, c, *_: (
        lambda: fn.ActivationLayer(np.tanh, lambda x: 1 - np.tanh(x) ** 2), (n, c)),
}
LAYERS["RandomTranslation"] = lambda n, c, h, w, k, s, st_, seed, dt: (
    lambda: fn.RandomTranslation(0.3 * (k - 1) / 4, s, fill=k - 2.0, seed=seed), (n, c, h, w))
LAYERS["RandomFlip"] = lambda n, c, h, w, k, s, st_, seed, dt: (
    lambda: fn.RandomFlip(["horizontal", "vertical", "horizontal_and_vertical"][k % 3],
                          seed=seed), (n, c, h, w))
if hasattr(fn, "GlobalAvgPool2D"):       # main's global average pool (after the merge)
    LAYERS["GlobalAvgPool2D"] = lambda n, c, h, w, *_: (fn.GlobalAvgPool2D, (n, c, h, w))


@given(data=st.data(), dtype=DTYPES)
def test_layers(data, dtype):
    """One layer's forward (training or not) and, in training, its backward: the output,
    grad_x and the parameters' gradients."""
    inputs = Inputs(data, dtype)
    make, shape = _layer_case(data, dtype)
    x, training = inputs.recipe(shape), data.draw(st.booleans(), label="training")

    def forward_backward(x):
        layer = make()
        y = layer.forward(x, training=training)
        if not training:
            return y
        grad = np.random.default_rng(inputs.seed).standard_normal(y.shape).astype(y.dtype)
        grad_x = layer.backward(grad)
        return y, grad_x, [layer.grads.get(name) for name in sorted(layer.params)]

    check(forward_backward, lambda: (inputs.build(x, 0),), dtype)


@given(data=st.data(), dtype=DTYPES)
def test_conv_paths(data, dtype):
    """3x3 stride-1 convs (Winograd's domain) on each compiled path that can run them,
    forced; finite inputs on Winograd (it spreads a NaN over its tile, see test_conv)."""
    n, c, k = (data.draw(st.integers(lo, hi), label=name)
               for name, lo, hi in (("n", 0, 3), ("c", 1, 9), ("k", 1, 9)))
    h, w = data.draw(st.integers(1, 17), label="h"), data.draw(st.integers(1, 17), label="w")
    padding = data.draw(st.tuples(st.integers(0, 2), st.integers(0, 2)), label="padding")
    oh, ow = h + 2 * padding[0] - 2, w + 2 * padding[1] - 2
    if oh < 1 or ow < 1:
        return                          # no window fits: test_conv covers the errors
    geometry_ = ((n, c, h, w), (k, c, 3, 3), (1, 1), padding, dtype)
    paths = {op: data.draw(st.sampled_from(conv_paths(op, *geometry_)), label=op)
             for op in ("conv2d_forward", "conv2d_backward")}
    inputs = Inputs(data, dtype, specials="winograd" not in paths.values())
    x, W = inputs.recipe((n, c, h, w)), inputs.recipe((k, c, 3, 3), specials=False)
    b, grad = inputs.recipe((k,)), inputs.recipe((n, k, oh, ow))
    with forced_path("conv2d_forward", paths["conv2d_forward"]):
        check(lambda x, W, b: kernels.conv2d_forward(x, W, b, 1, padding),
              lambda: (inputs.build(x, 0), inputs.build(W, 1), inputs.build(b, 2)), dtype)
    with forced_path("conv2d_backward", paths["conv2d_backward"]):
        check(lambda g, x, W: kernels.conv2d_backward(g, x, W, 1, padding),
              lambda: (inputs.build(grad, 3), inputs.build(x, 0), inputs.build(W, 1)), dtype)


@pytest.mark.skipif(not hasattr(kernels, "global_avgpool2d_forward"),
                    reason="no global average pool kernels on this branch")
@given(data=st.data(), dtype=DTYPES)
def test_global_avgpool(data, dtype):
    inputs = Inputs(data, dtype)
    shape, _, _, _ = geometry(data)
    x, grad = inputs.recipe(shape), inputs.recipe(shape[:2])
    check(kernels.global_avgpool2d_forward, lambda: (inputs.build(x, 0),), dtype)
    check(lambda g: kernels.global_avgpool2d_backward(g, shape), lambda: (inputs.build(grad, 1),),
          dtype)


@given(data=st.data(), dtype=DTYPES)
def test_augmentation_copies(data, dtype):
    """random_translate (shifts past the edge included), its backward and random_flip."""
    inputs = Inputs(data, dtype)
    shape, _, _, _ = geometry(data)
    n, _, h, w = shape
    x = inputs.recipe(shape)
    pairs = np.random.default_rng(inputs.seed).integers(-12, 13, (n, 2))
    fill = data.draw(st.floats(-3, 3), label="fill")
    check(lambda x: kernels.random_translate(x, pairs, fill), lambda: (inputs.build(x, 0),),
          dtype)
    check(lambda g: kernels.random_translate_backward(g, pairs), lambda: (inputs.build(x, 0),),
          dtype)
    check(lambda x: kernels.random_flip(x, pairs % 2), lambda: (inputs.build(x, 0),), dtype)


# the public kernels each test above covers (conv_output_size and pair: one test;
# counter_bits: one NumPy function for every backend, tested in test_augment.py)
FUZZED = {"im2col", "col2im", "maxpool2d_forward", "maxpool2d_backward", "avgpool2d_forward",
          "avgpool2d_backward", "global_avgpool2d_forward", "global_avgpool2d_backward",
          "leaky_relu_forward", "leaky_relu_backward", "relu_forward", "relu_backward",
          "dense_forward", "dense_backward", "softmax_cross_entropy", "conv2d_forward",
          "conv2d_backward", "conv2d_maxpool_forward", "sgd_step", "adam_step", "rmsprop_step",
          "conv_output_size", "pair", "random_translate", "random_translate_backward",
          "random_flip", "counter_bits"}


def test_every_public_kernel_and_layer_is_fuzzed():
    """A kernel or layer added to the public API must get a fuzz test here too."""
    from fastnn.layers import LAYER_CLASSES
    assert set(kernels.__all__) - FUZZED == set()
    assert set(LAYER_CLASSES) - set(LAYERS) == set()
