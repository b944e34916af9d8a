"""RandomTranslation and RandomFlip, added by ARCHITECTURE.md's two recipes: the reference
copies against a pixel-by-pixel definition and PyTorch, their backwards against finite
differences, every backend against the reference (the same bits: a copy), bad input, the
layers' draw (documented rule, the same on every backend for a seed), identity in
inference, fit's reseeding, a LeNet that trains with RandomTranslation."""
import numpy as np
import pytest

import fastnn as fn
from fastnn import backend, kernels
from fastnn.kernels import _cpu, _reference
from _helpers import numerical_grad, run_on
from cases import AUGMENT_CASES

BACKENDS = [b for b in ("numpy", "cpu", "cuda") if b in backend.available()]
DTYPES = [np.float32, np.float64]


def translate_by_pixels(x, shifts, fill):
    """The definition, one pixel at a time."""
    n, c, h, w = x.shape
    y = np.full_like(x, fill)
    for s in range(n):
        dy, dx = shifts[s]
        for i in range(h):
            for j in range(w):
                if 0 <= i - dy < h and 0 <= j - dx < w:
                    y[s, :, i, j] = x[s, :, i - dy, j - dx]
    return y


def some_shifts(rng, shape, beyond=1):
    """(N, 2) shifts within the image, some past its edge by up to ``beyond`` pixels."""
    n, _, h, w = shape
    return np.stack([rng.integers(-h - beyond, h + beyond + 1, n),
                     rng.integers(-w - beyond, w + beyond + 1, n)], axis=1)


# --- the reference ------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", AUGMENT_CASES[:5])
def test_reference_translate_is_the_definition(shape):
    rng = np.random.default_rng(0)
    x = rng.standard_normal(shape)
    shifts = some_shifts(rng, shape, beyond=0)
    np.testing.assert_array_equal(_reference.random_translate(x, shifts, 2.5),
                                  translate_by_pixels(x, shifts, 2.5))


def test_reference_flip_is_torchs_flip():
    torch = pytest.importorskip("torch")
    x = np.random.default_rng(1).standard_normal((4, 2, 3, 5))
    flips = np.array([[0, 0], [1, 0], [0, 1], [1, 1]])
    want = [torch.tensor(x[0]), torch.flip(torch.tensor(x[1]), [1]),
            torch.flip(torch.tensor(x[2]), [2]), torch.flip(torch.tensor(x[3]), [1, 2])]
    np.testing.assert_array_equal(_reference.random_flip(x, flips),
                                  torch.stack(want).numpy())


def test_translate_backward_is_the_finite_difference():
    rng = np.random.default_rng(2)
    x = rng.standard_normal((3, 2, 4, 5))
    weights = rng.standard_normal(x.shape)
    shifts = np.array([[1, -2], [-3, 0], [0, 5]])

    def loss():
        return float((run_on("numpy", kernels.random_translate, x, shifts, 0.7) * weights).sum())
    grad = run_on("numpy", kernels.random_translate_backward, weights, shifts)
    np.testing.assert_allclose(grad, numerical_grad(loss, x), rtol=1e-7, atol=1e-9)
    assert not grad[2].any()                 # shifted out whole: no gradient


def test_flip_backward_is_the_finite_difference():
    rng = np.random.default_rng(3)
    x = rng.standard_normal((3, 2, 3, 4))
    weights = rng.standard_normal(x.shape)
    flips = np.array([[1, 0], [0, 1], [1, 1]])

    def loss():
        return float((run_on("numpy", kernels.random_flip, x, flips) * weights).sum())
    np.testing.assert_allclose(run_on("numpy", kernels.random_flip, weights, flips),
                               numerical_grad(loss, x), rtol=1e-7, atol=1e-9)


# --- every backend against the reference ----------------------------------------------------------
@pytest.mark.parametrize("name", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=["float32", "float64"])
@pytest.mark.parametrize("shape", AUGMENT_CASES)
def test_backends_match_reference(name, dtype, shape):
    """Forward and backward of both ops: the same bits, also for a non-contiguous input
    and shifts past the image's edge (clipped: the whole sample becomes fill)."""
    rng = np.random.default_rng(4)
    x = rng.standard_normal(shape).astype(dtype)
    strided = np.ascontiguousarray(np.swapaxes(x, 2, 3)).swapaxes(2, 3)   # x, not C-ordered
    shifts = some_shifts(rng, shape, beyond=3)
    clipped = np.clip(shifts, [-shape[2], -shape[3]], [shape[2], shape[3]])
    flips = rng.integers(0, 2, (shape[0], 2))
    want = _reference.random_translate(x, clipped, -1.25)
    for a in (x, strided):
        got = run_on(name, kernels.random_translate, a, shifts, -1.25)
        assert got.dtype == dtype and got.shape == shape
        np.testing.assert_array_equal(got, want)
        np.testing.assert_array_equal(run_on(name, kernels.random_flip, a, flips),
                                      _reference.random_flip(x, flips))
    np.testing.assert_array_equal(run_on(name, kernels.random_translate_backward, x, shifts),
                                  _reference.random_translate(x, -clipped, 0.0))


@pytest.mark.parametrize("name", BACKENDS)
def test_bad_arguments_name_the_kernel(name):
    x = np.zeros((2, 1, 3, 3), np.float32)
    cases = [
        ((x[0], np.zeros((1, 2), np.int64), 0.0), ValueError, "random_translate: x must have 4"),
        ((x, np.zeros((3, 2), np.int64), 0.0), ValueError, r"shifts must have shape \(2, 2\)"),
        ((x, np.zeros((2, 2)), 0.0), TypeError, "shifts must be an integer array"),
        ((x, np.zeros((2, 2), np.int64), float("nan")), ValueError, "fill must not be NaN"),
        ((x, np.zeros((2, 2), np.int64), "0"), TypeError, "fill must be a number"),
        ((x.astype(np.int32), np.zeros((2, 2), np.int64), 0.0), TypeError, "float32 or float64"),
    ]
    for args, error, message in cases:
        with pytest.raises(error, match=message):
            run_on(name, kernels.random_translate, *args)
    with pytest.raises(ValueError, match=r"random_flip: flips must have shape \(2, 2\)"):
        run_on(name, kernels.random_flip, x, np.zeros((2, 3), np.int64))


def test_compiled_kernel_refuses_unclipped_shifts():
    """Called directly (no public checks), a shift past the edge is an error, not a read
    out of bounds."""
    x = np.zeros((2, 1, 3, 3))
    with pytest.raises(ValueError, match=r"random_translate: shifts\[1\] = \(0, 4\)"):
        _cpu.random_translate(x, np.array([[0, 0], [0, 4]], np.int64), 0.0)
    with pytest.raises(TypeError, match="random_flip: flips must be a int64"):
        _cpu.random_flip(x, np.zeros((2, 2), np.int32))


# --- the layers -------------------------------------------------------------------------------------
def test_translation_draw_follows_the_documented_rule():
    layer = fn.RandomTranslation(0.1, 2, seed=5)
    x = np.random.default_rng(6).standard_normal((64, 1, 28, 20))
    seed = int(np.random.default_rng(5).integers(2**63))       # the layer's first draw
    bits = kernels.counter_bits(seed, 128).reshape(64, 2)
    y = layer.forward(x)
    want = np.stack([(bits[:, 0] % np.uint64(7)).astype(np.int64) - 3,    # 0.1 * 28 -> 3
                     (bits[:, 1] % np.uint64(5)).astype(np.int64) - 2], axis=1)
    np.testing.assert_array_equal(layer._pairs, want)
    assert set(want[:, 0]) == set(range(-3, 4)) and set(want[:, 1]) == set(range(-2, 3))
    np.testing.assert_array_equal(y, _reference.random_translate(x, want, 0.0))


def test_flip_draw_follows_the_documented_rule():
    x = np.random.default_rng(7).standard_normal((200, 1, 3, 3))
    seed = int(np.random.default_rng(8).integers(2**63))
    top = (kernels.counter_bits(seed, 400).reshape(200, 2) >> np.uint64(63)).astype(np.int64)
    for mode, axes in (("horizontal", [0, 1]), ("vertical", [1, 0]),
                       ("horizontal_and_vertical", [1, 1])):
        layer = fn.RandomFlip(mode, seed=8)
        y = layer.forward(x)
        np.testing.assert_array_equal(layer._pairs, top * axes)
        np.testing.assert_array_equal(y, _reference.random_flip(x, top * axes))
    assert 80 < top.sum(axis=0).min() and top.sum(axis=0).max() < 120     # about 1/2 each


@pytest.mark.parametrize("make", [lambda: fn.RandomTranslation(0.3, 0.3, fill=0.5, seed=9),
                                  lambda: fn.RandomFlip(seed=9)], ids=["translation", "flip"])
def test_draw_is_the_same_on_every_backend(make):
    x = np.random.default_rng(10).standard_normal((6, 2, 7, 5)).astype(np.float32)
    outputs, grads = [], []
    for name in BACKENDS:
        layer = make()
        outputs.append(run_on(name, layer.forward, x))
        grads.append(run_on(name, layer.backward, x))
    for y, g in zip(outputs[1:], grads[1:]):
        np.testing.assert_array_equal(y, outputs[0])
        np.testing.assert_array_equal(g, grads[0])
    assert not np.array_equal(outputs[0], x)


@pytest.mark.parametrize("make", [lambda: fn.RandomTranslation(2, 2, seed=0),
                                  lambda: fn.RandomFlip(seed=0)], ids=["translation", "flip"])
def test_identity_when_not_training(make):
    layer = make()
    x = np.random.default_rng(11).standard_normal((4, 1, 6, 6))
    assert layer.forward(x, training=False) is x
    assert layer.backward(x) is x
    net = fn.Network([make(), fn.Flatten(), fn.Dense(36, 2, seed=0, dtype="float64")])
    plain = fn.Network([fn.Flatten(), fn.Dense(36, 2, seed=0, dtype="float64")])
    np.testing.assert_array_equal(net.predict(x), plain.predict(x))


def test_each_forward_draws_anew_and_fit_seed_reseeds():
    layer = fn.RandomTranslation(3, 3, seed=1)
    x = np.random.default_rng(12).standard_normal((8, 1, 8, 8))
    first, second = layer.forward(x), layer.forward(x)
    assert not np.array_equal(first, second)

    def trained(seed):
        net = fn.Network([fn.RandomTranslation(0.25, 0.25), fn.Flatten(),
                          fn.Dense(64, 2, seed=0, dtype="float64")])
        net.compile("cross_entropy", fn.optim.SGD(lr=0.1))
        net.fit(x, np.arange(8) % 2, epochs=3, batch_size=8, verbose=0, seed=seed)
        return net.layers[2].params["W"]
    np.testing.assert_array_equal(trained(3), trained(3))
    assert not np.array_equal(trained(3), trained(4))


def test_bad_settings_and_inputs_name_the_layer():
    for args, message in [((1.5, 0.1), "height_factor must be a fraction in"),
                          ((0.1, -1), "width_factor must be a fraction in"),
                          ((True, 1), "height_factor")]:
        with pytest.raises(ValueError, match=f"RandomTranslation: {message}"):
            fn.RandomTranslation(*args)
    with pytest.raises(ValueError, match="RandomTranslation: fill"):
        fn.RandomTranslation(1, 1, fill=float("nan"))
    with pytest.raises(ValueError, match="RandomFlip: mode must be one of"):
        fn.RandomFlip("diagonal")
    with pytest.raises(ValueError, match=r"RandomFlip: expected an \(N, C, H, W\) input"):
        fn.RandomFlip().forward(np.zeros((2, 3), np.float32))


def test_pixel_counts_and_large_factors():
    """An int factor is a pixel count (at most the image: all fill beyond); 0 is none."""
    x = np.ones((50, 1, 3, 4))
    layer = fn.RandomTranslation(0, 100, fill=-1.0, seed=13)
    layer.forward(x)
    assert not layer._pairs[:, 0].any() and np.abs(layer._pairs[:, 1]).max() == 4
    assert layer.get_config() == {"height_factor": 0, "width_factor": 100, "fill": -1.0}


def test_a_lenet_with_random_translation_trains():
    """Bars, horizontal (class 0) or vertical (class 1), anywhere in a 12x12 image: a
    LeNet-like network behind RandomTranslation learns them."""
    rng = np.random.default_rng(14)
    n = 256
    y = rng.integers(0, 2, n)
    x = np.zeros((n, 1, 12, 12), np.float32)
    for s in range(n):
        i, j = rng.integers(2, 10, 2)
        if y[s]:
            x[s, 0, i - 2:i + 3, j] = 1
        else:
            x[s, 0, i, j - 2:j + 3] = 1
    net = fn.Network([fn.RandomTranslation(0.2, 0.2, seed=0), fn.Conv2D(1, 4, 3, padding=1, seed=1),
                      fn.ReLU(), fn.MaxPool2D(2), fn.Conv2D(4, 8, 3, padding=1, seed=2), fn.ReLU(),
                      fn.MaxPool2D(2), fn.Flatten(), fn.Dense(72, 2, seed=3)])
    net.compile("cross_entropy", fn.optim.Adam(lr=0.01), metrics=["accuracy"])
    history = net.fit(x, y, epochs=15, batch_size=32, verbose=0, seed=0)
    assert history.history["loss"][-1] < 0.5 * history.history["loss"][0]
    assert net.evaluate(x, y)["accuracy"] > 0.9


def test_random_flip_default_mode_is_api_mds():
    """API.md: RandomFlip(mode="horizontal", seed=None): left-right mirror images only."""
    flip = fn.RandomFlip(seed=0)
    assert flip.mode == "horizontal"
    x = np.arange(2 * 1 * 3 * 4, dtype=np.float32).reshape(2, 1, 3, 4)
    for _ in range(8):
        y = flip.forward(x, training=True)
        for got, sample in zip(y, x):
            assert np.array_equal(got, sample) or np.array_equal(got, sample[..., ::-1])
