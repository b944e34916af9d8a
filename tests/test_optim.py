"""Optimizers and LR schedules: trajectories against torch.optim over several steps."""
import math

import numpy as np
import pytest

from fastnn import optim


def start(dtype=np.float64):
    rng = np.random.default_rng(0)
    return [rng.standard_normal((4, 3)).astype(dtype), rng.standard_normal(3).astype(dtype)]


def grad_of(p, k):
    """A gradient that depends on the parameters (so weight decay matters) and on the step."""
    return 0.5 * p + np.cos(np.arange(p.size).reshape(p.shape) + k)


def run_ours(opt, steps=6, dtype=np.float64):
    params = start(dtype)
    for k in range(steps):
        opt.step(params, [grad_of(p, k).astype(dtype) for p in params], decay=[True, False])
    return params


def run_torch(make_opt, steps=6):
    torch = pytest.importorskip("torch")
    W, b = (torch.tensor(a, requires_grad=True) for a in start())
    opt = make_opt(torch, W, b)
    for k in range(steps):
        for t in (W, b):
            t.grad = torch.tensor(grad_of(t.detach().numpy(), k))
        opt.step()
    return [W.detach().numpy(), b.detach().numpy()]


def assert_matches_torch(name, kwargs, rtol, default_decay=0.0):
    """optim.<name>(**kwargs) and torch.optim.<name> with the same arguments (weight decay
    on the weight only, as fastnn's rule: not on the bias) reach the same parameters."""
    decay = kwargs.get("weight_decay", default_decay)
    rest = {k: v for k, v in kwargs.items() if k != "weight_decay"}
    theirs = run_torch(lambda torch, W, b: getattr(torch.optim, name)(
        [{"params": [W], "weight_decay": decay}, {"params": [b], "weight_decay": 0.0}], **rest))
    for a, b in zip(run_ours(getattr(optim, name)(**kwargs)), theirs):
        np.testing.assert_allclose(a, b, rtol=rtol, atol=1e-12)


@pytest.mark.parametrize("kwargs", [
    dict(lr=0.1), dict(lr=0.1, momentum=0.9), dict(lr=0.05, momentum=0.9, nesterov=True),
    dict(lr=0.1, weight_decay=0.01), dict(lr=0.1, momentum=0.8, weight_decay=0.1),
    dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=0.05)])
def test_sgd_matches_torch(kwargs):
    assert_matches_torch("SGD", kwargs, rtol=1e-12)


@pytest.mark.parametrize("kwargs", [dict(lr=0.01), dict(lr=0.05, betas=(0.8, 0.99), eps=1e-6),
                                    dict(lr=0.01, weight_decay=0.1)])
def test_adam_matches_torch(kwargs):
    assert_matches_torch("Adam", kwargs, rtol=1e-10)


def test_sgd_l1_adds_sign_of_weights_only():
    opt = optim.SGD(lr=0.1, momentum=0.5, l1=0.02)
    params = start()
    W, b = (p.copy() for p in params)
    buf = [None, None]
    for k in range(4):
        grads = [grad_of(p, k) for p in params]
        opt.step(params, grads, decay=[True, False])
        for i, (p, g) in enumerate(zip((W, b), grads)):
            g = g + (0.02 * np.sign(p) if i == 0 else 0)
            buf[i] = g.copy() if buf[i] is None else 0.5 * buf[i] + g
            p -= 0.1 * buf[i]
    np.testing.assert_allclose(params[0], W, rtol=1e-12)
    np.testing.assert_allclose(params[1], b, rtol=1e-12)


def test_updates_in_place_and_keep_float32():
    for opt in (optim.SGD(lr=0.1, momentum=0.9, weight_decay=0.1), optim.Adam(lr=0.1)):
        params = start(np.float32)
        ids = [id(p) for p in params]
        before = [p.copy() for p in params]
        opt.step(params, [np.ones_like(p) for p in params])
        assert [id(p) for p in params] == ids
        assert all(p.dtype == np.float32 for p in params)
        assert all(not np.array_equal(p, q) for p, q in zip(params, before))
    with pytest.raises(ValueError, match="nesterov"):
        optim.SGD(lr=0.1, nesterov=True)
    with pytest.raises(ValueError, match="lr"):
        optim.SGD(lr=-1)
    with pytest.raises(ValueError, match="unknown optimizer"):
        optim.get("adagrad")


@pytest.mark.parametrize("ours,theirs", [
    (lambda: optim.StepLR(3, gamma=0.5), lambda torch, o: torch.optim.lr_scheduler.StepLR(o, 3, gamma=0.5)),
    (lambda: optim.ExponentialLR(0.9), lambda torch, o: torch.optim.lr_scheduler.ExponentialLR(o, 0.9)),
    (lambda: optim.CosineAnnealingLR(7), lambda torch, o: torch.optim.lr_scheduler.CosineAnnealingLR(o, 7))])
def test_schedules_match_torch(ours, theirs):
    torch = pytest.importorskip("torch")
    topt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.2)
    tsched = theirs(torch, topt)
    opt = optim.SGD(lr=0.2, schedule=ours())
    for epoch in range(10):
        assert math.isclose(opt.lr, topt.param_groups[0]["lr"], rel_tol=1e-12, abs_tol=1e-15), epoch
        topt.step()
        tsched.step()
        opt.schedule.step()


@pytest.mark.parametrize("kwargs", [
    dict(lr=0.1), dict(lr=0.1, momentum=0.9), dict(lr=0.05, momentum=0.9, nesterov=True),
    dict(lr=0.1, momentum=0.5, weight_decay=0.05, l1=0.02)])
@pytest.mark.parametrize("dtype, rtol", [(np.float32, 1e-5), (np.float64, 1e-13)])
def test_sgd_compiled_step_matches_the_numpy_one(kwargs, dtype, rtol):
    """The compiled CPU backend updates in one fused pass; the NumPy backend runs the
    array expressions. Both must follow the same rule."""
    from fastnn import backend
    if "cpu" not in backend.available():
        pytest.skip("compiled kernels not built")
    before = backend.current()
    try:
        results = []
        for name in ("cpu", "numpy"):
            backend.use(name)
            results.append(run_ours(optim.SGD(**kwargs), dtype=dtype))
    finally:
        backend.use(before)
    for ours, reference in zip(*results):
        assert ours.dtype == dtype
        np.testing.assert_allclose(ours, reference, rtol=rtol, atol=rtol)


# --- AdamW, RMSprop and gradient clipping against torch ---------------------------------
@pytest.mark.parametrize("kwargs", [dict(), dict(lr=0.05, betas=(0.8, 0.99), eps=1e-6,
                                                 weight_decay=0.3)])
def test_adamw_matches_torch(kwargs):
    assert_matches_torch("AdamW", kwargs, rtol=1e-12, default_decay=1e-2)


@pytest.mark.parametrize("kwargs", [dict(), dict(lr=0.01, alpha=0.9, eps=1e-6),
                                    dict(lr=0.01, momentum=0.9, weight_decay=0.1)])
def test_rmsprop_matches_torch(kwargs):
    assert_matches_torch("RMSprop", kwargs, rtol=1e-12)


def test_global_clipnorm_matches_torchs_clip_grad_norm():
    torch = pytest.importorskip("torch")
    W, b = (torch.tensor(a, requires_grad=True) for a in start())
    opt = torch.optim.SGD([{"params": [W], "weight_decay": 0.1},
                           {"params": [b], "weight_decay": 0.0}], lr=0.1, momentum=0.9)
    for k in range(6):
        for t in (W, b):
            t.grad = torch.tensor(grad_of(t.detach().numpy(), k))
        torch.nn.utils.clip_grad_norm_([W, b], 1.5)
        opt.step()
    ours = run_ours(optim.SGD(lr=0.1, momentum=0.9, weight_decay=0.1, global_clipnorm=1.5))
    for a, t in zip(ours, (W, b)):
        np.testing.assert_allclose(a, t.detach().numpy(), rtol=1e-12, atol=1e-12)


def test_clipnorm_and_clipvalue_before_decay_keras_rule():
    """clipnorm scales each gradient to norm <= c (Keras' clip_by_norm), clipvalue clips
    each element; both before weight decay (plain SGD: W -= lr * (clip(g) + wd W))."""
    for clip, expect in (
            (dict(clipnorm=0.5), lambda g: g * 0.5 / max(np.linalg.norm(g), 0.5)),
            (dict(clipvalue=0.3), lambda g: np.clip(g, -0.3, 0.3))):
        params = start()
        grads = [grad_of(p, 0) * 3 for p in params]
        want = [p - 0.1 * (expect(g) + 0.2 * p) for p, g in zip(params, grads)]
        opt = optim.SGD(lr=0.1, weight_decay=0.2, **clip)
        opt.step(params, grads)
        for a, b in zip(params, want):
            np.testing.assert_allclose(a, b, rtol=1e-14, atol=1e-14)
    small = [np.full(3, 0.01)]
    p = [np.zeros(3)]
    optim.SGD(lr=1.0, clipnorm=1.0).step(p, small)    # under the norm: unchanged
    np.testing.assert_array_equal(p[0], -0.01)


def test_clip_options_are_checked_and_saved():
    with pytest.raises(ValueError, match="Adam: give at most one of clipnorm"):
        optim.Adam(clipnorm=1.0, clipvalue=0.5)
    with pytest.raises(ValueError, match="RMSprop: clipvalue must be a finite number > 0"):
        optim.RMSprop(clipvalue=0)
    with pytest.raises(TypeError, match="SGD: clipnorm must be a number"):
        optim.SGD(clipnorm="1")
    opt = optim.AdamW(global_clipnorm=2.0)
    assert opt.get_config()["global_clipnorm"] == 2.0
    assert "clipnorm" not in optim.SGD().get_config()
    again = optim.AdamW(**opt.get_config())
    assert again.get_config() == opt.get_config()
    assert isinstance(optim.get("adamw"), optim.AdamW)
    assert isinstance(optim.get("rmsprop"), optim.RMSprop)


def test_new_optimizers_save_and_resume(tmp_path):
    import fastnn as fn
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((20, 4)).astype(np.float32), rng.integers(0, 2, 20)
    for opt in (optim.AdamW(lr=0.01, clipnorm=1.0), optim.RMSprop(lr=0.01, momentum=0.9)):
        net = fn.Network([fn.Dense(4, 2, seed=0)])
        net.compile("cross_entropy", optimizer=opt)
        net.fit(x, y, epochs=1, batch_size=5, verbose=0)
        net.save(tmp_path / "m.npz")
        other = fn.Network.load(tmp_path / "m.npz")
        assert type(other.optimizer) is type(opt)
        assert other.optimizer.get_config() == opt.get_config()
        net.fit(x, y, epochs=1, batch_size=5, verbose=0, shuffle=False)
        other.fit(x, y, epochs=1, batch_size=5, verbose=0, shuffle=False)
        np.testing.assert_array_equal(other.forward(x), net.forward(x))


# --- per-batch schedules against torch's lr (and momentum) sequences --------------------
@pytest.mark.parametrize("make", ["sgd", "adam"])
def test_one_cycle_matches_torch(make):
    torch = pytest.importorskip("torch")
    p = torch.zeros(1, requires_grad=True)
    p.grad = torch.zeros(1)
    topt = torch.optim.SGD([p], lr=0.1, momentum=0.9) if make == "sgd" else \
        torch.optim.Adam([p], lr=0.1)
    tsched = torch.optim.lr_scheduler.OneCycleLR(topt, max_lr=0.5, epochs=3, steps_per_epoch=7,
                                                 pct_start=0.25)
    n = 21
    want_lr, want_m = [], []
    for _ in range(n):
        g = topt.param_groups[0]
        want_lr.append(g["lr"])
        want_m.append(g["momentum"] if make == "sgd" else g["betas"][0])
        topt.step()
        tsched.step()
    sched = optim.OneCycleLR(0.5, epochs=3, steps_per_epoch=7, pct_start=0.25)
    opt = optim.SGD(lr=0.1, momentum=0.9, schedule=sched) if make == "sgd" else \
        optim.Adam(lr=0.1, schedule=sched)
    got_lr, got_m = [], []
    for _ in range(n):
        got_lr.append(opt.lr)
        got_m.append(opt.momentum if make == "sgd" else opt.betas[0])
        sched.on_batch_end(None, 0, {})
    np.testing.assert_allclose(got_lr, want_lr, rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(got_m, want_m, rtol=1e-12)
    with pytest.raises(ValueError, match="OneCycleLR: stepped 22 times"):
        sched.step()


def test_linear_warmup_matches_torch_linear_lr_then_hands_over():
    torch = pytest.importorskip("torch")
    topt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.2)
    tsched = torch.optim.lr_scheduler.LinearLR(topt, start_factor=1 / 5, total_iters=5)
    want = []
    for _ in range(8):
        want.append(topt.param_groups[0]["lr"])
        topt.step()
        tsched.step()
    then = optim.StepLR(1, gamma=0.5)
    warm = optim.LinearWarmup(5, then=then)
    opt = optim.SGD(lr=0.2, schedule=warm)
    got = []
    for _ in range(8):
        got.append(opt.lr)
        warm.on_batch_end(None, 0, {})
        warm.on_epoch_end(None, 1, {}) if len(got) == 3 else None   # before the hand-over: no-op
    np.testing.assert_allclose(got, want, rtol=1e-12)
    assert then.optimizer is opt and opt.lr == 0.2
    warm.on_epoch_end(None, 1, {})        # then steps per epoch after the hand-over
    assert opt.lr == pytest.approx(0.1)


def test_batch_schedules_step_per_batch_in_fit_and_resume(tmp_path):
    import fastnn as fn
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((12, 3)).astype(np.float32), rng.integers(0, 2, 12)
    sched = optim.OneCycleLR(0.1, epochs=2, steps_per_epoch=3)
    net = fn.Network([fn.Dense(3, 2, seed=0)])
    net.compile("cross_entropy", optimizer=optim.SGD(schedule=sched))
    net.fit(x, y, epochs=1, batch_size=4, verbose=0)
    assert sched.epoch == 3 and net.optimizer.lr == pytest.approx(sched.lr_at(3))
    net.save(tmp_path / "m.npz")
    other = fn.Network.load(tmp_path / "m.npz")
    assert other.optimizer.schedule.epoch == 3
    assert other.optimizer.momentum == pytest.approx(sched.momentum_at(3))
    warm = optim.LinearWarmup(2, then=optim.CosineAnnealingLR(4))
    net.compile("cross_entropy", optimizer=optim.Adam(lr=0.01, schedule=warm))
    net.fit(x, y, epochs=1, batch_size=4, verbose=0)
    net.save(tmp_path / "w.npz")
    other = fn.Network.load(tmp_path / "w.npz")
    assert other.optimizer.schedule.then.optimizer is other.optimizer
    assert other.optimizer.schedule.get_config() == warm.get_config()
    with pytest.raises(ValueError, match="OneCycleLR: the warm-up phase has no step"):
        optim.OneCycleLR(0.1, 1, 3, pct_start=0.3)
    with pytest.raises(ValueError, match="OneCycleLR: pct_start"):
        optim.OneCycleLR(0.1, 1, 1, pct_start=1.5)
    with pytest.raises(TypeError, match="LinearWarmup: then must be a Schedule"):
        optim.LinearWarmup(3, then=5)
