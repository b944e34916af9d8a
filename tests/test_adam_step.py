"""The compiled Adam update (kernels._cpu.adam_step) against its NumPy reference:
bit for bit in float64, to round-off in float32; in blocks over the worker pool
(large parameters) the same bits as on one thread."""
import numpy as np
import pytest

from fastnn import backend

if "cpu" not in backend.available():
    pytest.skip("compiled kernels not built", allow_module_level=True)

from fastnn.kernels import _cpu  # noqa: E402


def adam_reference(p, g, m, v, step_size, beta1, beta2, inv_sqrt_bc2, eps, weight_decay):
    """The rule in adam_step's order, in p's dtype, scalars rounded to it (in place)."""
    dt = p.dtype.type
    if weight_decay != 0:
        g = g + dt(weight_decay) * p
    m[...] = dt(beta1) * m + dt(1 - beta1) * g
    v[...] = dt(beta2) * v + dt(1 - beta2) * (g * g)
    p -= dt(step_size) * (m / (np.sqrt(v) * dt(inv_sqrt_bc2) + dt(eps)))


def _state(size, dtype, seed):
    rng = np.random.default_rng(seed)
    p = rng.standard_normal(size).astype(dtype)
    g = rng.standard_normal(size).astype(dtype)
    m = (0.1 * rng.standard_normal(size)).astype(dtype)
    v = (0.01 * rng.random(size)).astype(dtype)
    return p, g, m, v


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("size", [0, 1, 7, 1023, 16385, 100003])   # from 16384: over the pool
@pytest.mark.parametrize("weight_decay", [0.0, 0.01])
def test_adam_step_matches_reference(dtype, size, weight_decay):
    args = dict(beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=weight_decay)
    p, g, m, v = _state(size, dtype, size)
    want = [a.copy() for a in (p, g, m, v)]
    for t in (1, 2, 3):                   # a few steps, state carried over
        step_size = 1e-3 / (1 - 0.9 ** t)
        inv_sqrt_bc2 = 1 / np.sqrt(1 - 0.999 ** t)
        _cpu.adam_step(p, g, m, v, step_size, inv_sqrt_bc2=inv_sqrt_bc2, **args)
        adam_reference(*want, step_size, inv_sqrt_bc2=inv_sqrt_bc2, **args)
    for got, expected in zip((p, g, m, v), want):
        assert got.dtype == dtype
        if dtype == np.float64:
            np.testing.assert_array_equal(got, expected)
        else:
            np.testing.assert_allclose(got, expected, rtol=2e-6, atol=1e-7)
    np.testing.assert_array_equal(g, want[1])          # g is not written


def test_adam_step_moves_against_the_gradient():
    p, g, m, v = _state(50, np.float64, 1)
    before = p.copy()
    m[:] = v[:] = 0
    _cpu.adam_step(p, g, m, v, 0.01 / (1 - 0.9), 0.9, 0.999, 1 / np.sqrt(1 - 0.999), 1e-8, 0.0)
    # the first step is lr * sign(g) (up to eps)
    np.testing.assert_allclose(before - p, 0.01 * np.sign(g), rtol=1e-5)


def test_adam_step_same_bits_on_workers_or_caller():
    runs = []
    for busy in (False, True):
        _cpu._forget_busy_cores()
        if busy:
            _cpu._assume_busy_cores()
        p, g, m, v = _state(70001, np.float32, 5)
        _cpu.adam_step(p, g, m, v, 1e-3, 0.9, 0.999, 1.3, 1e-8, 0.1)
        runs.append((p, m, v))
    _cpu._forget_busy_cores()
    for a, b in zip(*runs):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("bad", ["size", "dtype", "layout"])
def test_adam_step_rejects_mismatched_state(bad):
    p, g, m, v = _state(12, np.float32, 2)
    if bad == "size":
        v = v[:11].copy()
    elif bad == "dtype":
        m = m.astype(np.float64)
    else:
        g = np.stack([g, g], axis=1)[:, 0]
    with pytest.raises(TypeError if bad == "dtype" else ValueError, match="adam_step"):
        _cpu.adam_step(p, g, m, v, 1e-3, 0.9, 0.999, 1.0, 1e-8, 0.0)
