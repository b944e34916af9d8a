"""fastnn.kernels.sgd_step / adam_step, the update rules every optimizer runs: the NumPy
reference against PyTorch's rules written out, and every backend (compiled CPU, CUDA where
present) against the reference on the same cases, float32 and float64."""
import contextlib

import numpy as np
import pytest

from fastnn import backend, kernels

BACKENDS = [b for b in ("numpy", "cpu", "cuda") if b in backend.available()]
SIZES = [0, 1, 7, 1000, 70001]          # 70001: blocks over the worker pool, and a tail
SGD_CASES = [dict(lr=0.1), dict(lr=0.1, momentum=0.9), dict(lr=0.05, momentum=0.9, nesterov=True),
             dict(lr=0.1, weight_decay=0.01, l1=0.001),
             dict(lr=0.05, momentum=0.8, nesterov=True, weight_decay=0.05, l1=0.01)]
ADAM_CASES = [dict(lr=0.01), dict(lr=0.05, beta1=0.8, beta2=0.99, eps=1e-6),
              dict(lr=0.01, weight_decay=0.1)]


def on(name, a):
    """``a`` (a NumPy array) as backend ``name`` takes it."""
    return backend.to_device(a, "cuda") if name == "cuda" else a.copy()


def host(a):
    return None if a is None else np.asarray(backend.to_device(a, "cpu"))


def run(name, fn, *args, **kwargs):
    previous = backend.current()
    backend.use("numpy" if name == "numpy" else "cpu")
    try:
        return fn(*args, **kwargs)
    finally:
        backend.use(previous)


def sgd_trajectory(name, n, dtype, steps=3, **kwargs):
    rng = np.random.default_rng(n)
    p = on(name, rng.standard_normal(n).astype(dtype))
    buf = None
    for k in range(steps):
        g = on(name, rng.standard_normal(n).astype(dtype))
        buf = run(name, kernels.sgd_step, p, g, buf, **kwargs)
    return host(p), host(buf)


def adam_trajectory(name, n, dtype, steps=3, **kwargs):
    rng = np.random.default_rng(n)
    p = on(name, rng.standard_normal(n).astype(dtype))
    m, v = on(name, np.zeros(n, dtype)), on(name, np.zeros(n, dtype))
    for t in range(1, steps + 1):
        g = on(name, rng.standard_normal(n).astype(dtype))
        run(name, kernels.adam_step, p, g, m, v, step=t, **kwargs)
    return host(p), host(m), host(v)


def assert_same(got, want, dtype, name):
    """The compiled kernels give the reference's bits in float64 (element-wise, same order
    of operations); float32 and CUDA (which may contract into FMAs) to round-off."""
    for a, b in zip(got, want):
        if b is None:
            assert a is None
        elif dtype == np.float64 and name == "cpu":
            np.testing.assert_array_equal(a, b)
        else:
            np.testing.assert_allclose(a, b, rtol=2e-6 if dtype == np.float32 else 1e-14,
                                       atol=1e-6 if dtype == np.float32 else 1e-14)


def test_sgd_reference_is_torchs_rule():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(0)
    p0 = rng.standard_normal(50)
    grads = [rng.standard_normal(50) for _ in range(4)]
    kw = dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=0.01)
    t = torch.tensor(p0.copy(), requires_grad=True)
    opt = torch.optim.SGD([t], **kw)
    p, buf = p0.copy(), None
    for g in grads:
        t.grad = torch.tensor(g)
        opt.step()
        buf = run("numpy", kernels.sgd_step, p, g, buf, **kw)
    np.testing.assert_allclose(p, t.detach().numpy(), rtol=1e-13, atol=1e-13)


def test_adam_reference_is_torchs_rule():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(1)
    p0 = rng.standard_normal(50)
    grads = [rng.standard_normal(50) for _ in range(4)]
    t = torch.tensor(p0.copy(), requires_grad=True)
    opt = torch.optim.Adam([t], lr=0.01, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.1)
    p, m, v = p0.copy(), np.zeros(50), np.zeros(50)
    for step, g in enumerate(grads, 1):
        t.grad = torch.tensor(g)
        opt.step()
        run("numpy", kernels.adam_step, p, g, m, v, lr=0.01, step=step, beta1=0.8, beta2=0.99,
            eps=1e-6, weight_decay=0.1)
    np.testing.assert_allclose(p, t.detach().numpy(), rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize("name", ["numpy", "cpu"])
def test_update_kernels_refuse_bad_arrays(name):
    p = np.zeros(6, np.float32)
    g = np.ones(6, np.float32)
    readonly = np.zeros(6, np.float32)
    readonly.flags.writeable = False
    bad = [
        (dict(param=readonly, grad=g), ValueError, "writeable"),
        (dict(param=np.zeros(12, np.float32)[::2], grad=g), ValueError, "C-contiguous"),
        (dict(param=p, grad=np.ones(5, np.float32)), ValueError, "shape"),
        (dict(param=p, grad=np.ones(6, np.float64)), TypeError, "dtype"),
        (dict(param=p, grad=g, buf=p[:]), ValueError, "share memory"),
        (dict(param=np.zeros(6, np.int32), grad=g), TypeError, "float32 or float64"),
    ]
    for args, error, message in bad:
        with pytest.raises(error, match=message):
            run(name, kernels.sgd_step, lr=0.1, momentum=0.9 if "buf" in args else 0.0, **args)
    with pytest.raises(ValueError, match="momentum is 0"):
        run(name, kernels.sgd_step, p, g, np.zeros(6, np.float32), lr=0.1)
    m, v = np.zeros(6, np.float32), np.zeros(6, np.float32)
    with pytest.raises(ValueError, match="step"):
        run(name, kernels.adam_step, p, g, m, v, lr=0.1, step=0)
    with pytest.raises(ValueError, match="m and v"):
        run(name, kernels.adam_step, p, g, m, m, lr=0.1, step=1)
    with pytest.raises(ValueError, match="share memory"):
        run(name, kernels.adam_step, p, g, p, v, lr=0.1, step=1)
    np.testing.assert_array_equal(p, 0)           # nothing was written by a refused call


@pytest.mark.parametrize("name", BACKENDS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_non_contiguous_grad_is_read_by_value(name, dtype):
    """A strided grad (found by tests/test_fuzz.py): the fast path once handed its raw
    memory to the compiled kernels, which read every other element of the wrong array."""
    grad = np.zeros(8, dtype)[::2]
    grad[...] = [0.5, -1.0, 2.0, 3.0]
    results = []
    for b in ("numpy", name):
        # strided on the device too (on() would copy a NumPy array contiguously)
        g = backend.to_device(np.repeat(grad, 2), "cuda")[::2] if b == "cuda" else grad
        param, buf = on(b, np.ones(4, dtype)), on(b, np.full(4, 0.5, dtype))
        run(b, kernels.sgd_step, param, g, buf, lr=0.1, momentum=0.5)
        m, v = on(b, np.zeros(4, dtype)), on(b, np.zeros(4, dtype))
        p2 = on(b, np.ones(4, dtype))
        run(b, kernels.adam_step, p2, g, m, v, lr=0.1, step=1)
        results.append([host(a) for a in (param, buf, p2, m, v)])
    for got, want in zip(results[1], results[0]):
        np.testing.assert_allclose(got, want, rtol=1e-6)
    np.testing.assert_allclose(results[0][1], 0.25 + grad)


# --- AdamW (adam_step with decoupled decay) and RMSprop ---------------------------------
ADAMW_CASES = [dict(lr=0.01, weight_decay=0.01, decoupled=True),
               dict(lr=0.05, beta1=0.8, beta2=0.99, eps=1e-6, weight_decay=0.5, decoupled=True)]
RMSPROP_CASES = [dict(lr=0.01), dict(lr=0.01, alpha=0.9, eps=1e-6),
                 dict(lr=0.01, momentum=0.9), dict(lr=0.02, momentum=0.5, weight_decay=0.1)]


def rmsprop_trajectory(name, n, dtype, steps=3, **kwargs):
    rng = np.random.default_rng(n)
    p = on(name, rng.standard_normal(n).astype(dtype))
    sq = on(name, np.zeros(n, dtype))
    buf = on(name, np.zeros(n, dtype)) if kwargs.get("momentum") else None
    for _ in range(steps):
        g = on(name, rng.standard_normal(n).astype(dtype))
        run(name, kernels.rmsprop_step, p, g, sq, buf, **kwargs)
    return host(p), host(sq), host(buf)


def test_adamw_reference_is_torchs_rule():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(2)
    p0 = rng.standard_normal(50)
    grads = [rng.standard_normal(50) for _ in range(5)]
    t = torch.tensor(p0.copy(), requires_grad=True)
    opt = torch.optim.AdamW([t], lr=0.05, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.5)
    p, m, v = p0.copy(), np.zeros(50), np.zeros(50)
    for step, g in enumerate(grads, 1):
        t.grad = torch.tensor(g)
        opt.step()
        run("numpy", kernels.adam_step, p, g, m, v, lr=0.05, step=step, beta1=0.8, beta2=0.99,
            eps=1e-6, weight_decay=0.5, decoupled=True)
    np.testing.assert_allclose(p, t.detach().numpy(), rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize("kwargs", RMSPROP_CASES, ids=lambda k: ",".join(sorted(k)))
def test_rmsprop_reference_is_torchs_rule(kwargs):
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(3)
    p0 = rng.standard_normal(50)
    grads = [rng.standard_normal(50) for _ in range(5)]
    t = torch.tensor(p0.copy(), requires_grad=True)
    opt = torch.optim.RMSprop([t], **kwargs)
    p, sq = p0.copy(), np.zeros(50)
    buf = np.zeros(50) if kwargs.get("momentum") else None
    for g in grads:
        t.grad = torch.tensor(g)
        opt.step()
        run("numpy", kernels.rmsprop_step, p, g, sq, buf, **kwargs)
    np.testing.assert_allclose(p, t.detach().numpy(), rtol=1e-13, atol=1e-13)


# every update rule on every backend against the reference, on the same cases
RULE_CASES = [(trajectory, kwargs) for trajectory, cases in (
    (sgd_trajectory, SGD_CASES), (adam_trajectory, ADAM_CASES + ADAMW_CASES),
    (rmsprop_trajectory, RMSPROP_CASES)) for kwargs in cases]


@pytest.mark.parametrize("name", BACKENDS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("trajectory,kwargs", RULE_CASES,
                         ids=[f"{t.__name__.split('_')[0]}:{','.join(sorted(k))}"
                              for t, k in RULE_CASES])
def test_update_step_matches_reference(name, dtype, n, trajectory, kwargs):
    assert_same(trajectory(name, n, dtype, **kwargs),
                trajectory("numpy", n, dtype, **kwargs), dtype, name)


@pytest.mark.parametrize("name", ["numpy", "cpu"])
def test_rmsprop_step_refuses_bad_arrays(name):
    p, g = np.zeros(6, np.float32), np.ones(6, np.float32)
    sq = np.zeros(6, np.float32)
    with pytest.raises(ValueError, match="rmsprop_step.*exactly when momentum"):
        run(name, kernels.rmsprop_step, p, g, sq, np.zeros(6, np.float32), lr=0.1)
    with pytest.raises(ValueError, match="rmsprop_step.*exactly when momentum"):
        run(name, kernels.rmsprop_step, p, g, sq, None, lr=0.1, momentum=0.9)
    with pytest.raises(ValueError, match="square_avg and buf"):
        run(name, kernels.rmsprop_step, p, g, sq, sq, lr=0.1, momentum=0.9)
    with pytest.raises(ValueError, match="share memory"):
        run(name, kernels.rmsprop_step, p, g, p, None, lr=0.1)
    with pytest.raises(ValueError, match="shape"):
        run(name, kernels.rmsprop_step, p, g, np.zeros(5, np.float32), None, lr=0.1)
    with pytest.raises(TypeError, match="dtype"):
        run(name, kernels.rmsprop_step, p, g, np.zeros(6), None, lr=0.1)
    np.testing.assert_array_equal(p, 0)


def _state_near_underflow(dtype, n=70001):
    """A state array of n entries: most just above the smallest normal number (one
    decay step takes them below it), a few large, a NaN, and zero gradients."""
    tiny = np.finfo(dtype).tiny
    state = np.full(n, 1.05 * tiny, dtype)
    state[::2] *= -1
    state[:5] = [1.0, -2.0, np.nan, 3 * tiny, 0.0]
    return state, np.zeros(n, dtype)


def _variants_of(name, op):
    """The variants of ``op`` a backend may run: each the CPU can run (None elsewhere)."""
    from fastnn.kernels import variants
    return variants.applicable(op) if name == "cpu" else [None]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("name", BACKENDS)
def test_update_rules_store_no_subnormal_state(name, dtype):
    """Momentum buffers, Adam's m and v and RMSprop's square_avg and buffer are stored
    flushed: an entry that decays below the smallest normal number becomes 0 (a zero
    gradient would otherwise leave it subnormal, ~20x slower on a CPU), NaN and normal
    entries are kept, and every backend and variant gives the reference's state."""
    from fastnn.kernels import variants
    tiny = np.finfo(dtype).tiny

    def check(state):
        state = host(state)
        assert np.isnan(state[2]) and state[0] != 0 and state[1] != 0
        finite = state[np.isfinite(state)]
        assert not np.any((finite != 0) & (np.abs(finite) < tiny))
        return state

    for variant in _variants_of(name, "sgd_step"):
        for nesterov in (False, True):
            buf, g = _state_near_underflow(dtype)
            p = np.ones_like(buf)
            with (variants.force("sgd_step", variant) if variant else contextlib.nullcontext()):
                run(name, kernels.sgd_step, on(name, p), on(name, g), dev := on(name, buf),
                    lr=0.1, momentum=0.9, nesterov=nesterov)
            want = buf.copy()
            run("numpy", kernels.sgd_step, p.copy(), g, want, lr=0.1, momentum=0.9,
                nesterov=nesterov)
            np.testing.assert_array_equal(check(dev), want)
    m, g = _state_near_underflow(dtype)
    adam = dict(lr=0.01, step=5, beta1=0.9, beta2=0.5)
    for got, want in zip(*both(name, kernels.adam_step, [np.ones_like(m), g, m, np.abs(m)], adam)):
        np.testing.assert_array_equal(check(got), want)
    sq, g = _state_near_underflow(dtype)
    rms = dict(lr=0.01, alpha=0.5, momentum=0.9)
    for got, want in zip(*both(name, kernels.rmsprop_step, [np.ones_like(sq), g, np.abs(sq), sq],
                               rms)):
        np.testing.assert_array_equal(check(got), want)


def both(name, kernel, arrays, kwargs):
    """The state arrays (all but the first two) after ``kernel`` on backend ``name``, and
    after the NumPy reference, from copies of the same ``arrays``."""
    dev = [on(name, a) for a in arrays]
    ref = [a.copy() for a in arrays]
    run(name, kernel, *dev, **kwargs)
    run("numpy", kernel, *ref, **kwargs)
    return dev[2:], ref[2:]
