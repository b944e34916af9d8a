"""fit's validation_split, class_weight / sample_weight (Keras' rule, checked against
PyTorch's per-sample losses) and an iterable x of batches with steps_per_epoch."""
import numpy as np
import pytest

import fastnn as fn
from fastnn import losses


def data(n=20, seed=0, c=3):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, 4))
    return x, rng.integers(0, c, n)




@pytest.mark.parametrize("loss", ["cross_entropy", "cross_entropy_onehot", "mse",
                                  "binary_cross_entropy"])
def test_weighted_losses_match_torch(loss):
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(1)
    n, c = 7, 3
    w = rng.uniform(0, 2, n)
    if loss.startswith("cross_entropy"):
        pred = rng.standard_normal((n, c))
        labels = rng.integers(0, c, n)
        y = np.eye(c)[labels] if loss.endswith("onehot") else labels
        each = lambda t: torch.nn.functional.cross_entropy(  # noqa: E731
            t, torch.tensor(labels), reduction="none")
        ours = losses.CrossEntropy()
    elif loss == "mse":
        pred, y = rng.standard_normal((n, 2, 2)), rng.standard_normal((n, 2, 2))
        each = lambda t: ((t - torch.tensor(y)) ** 2).mean(dim=(1, 2))  # noqa: E731
        ours = losses.MSE()
    else:
        pred, y = rng.uniform(0.05, 0.95, (n, 2)), rng.integers(0, 2, (n, 2)).astype(float)
        each = lambda t: torch.nn.functional.binary_cross_entropy(  # noqa: E731
            t, torch.tensor(y), reduction="none").mean(dim=1)
        ours = losses.BinaryCrossEntropy()
    t = torch.tensor(pred, requires_grad=True)
    total = (each(t) * torch.tensor(w)).sum() / n
    total.backward()
    got_loss, got_grad = ours.weighted_loss_and_grad(pred, y, w)
    np.testing.assert_allclose(float(got_loss), total.item(), rtol=1e-12)
    np.testing.assert_allclose(got_grad, t.grad.numpy(), rtol=1e-10, atol=1e-14)
    # unit weights: the unweighted loss
    np.testing.assert_allclose(float(ours.weighted_loss_and_grad(pred, y, np.ones(n))[0]),
                               ours(pred, y), rtol=1e-12)
    with pytest.raises(ValueError, match="sample_weight must have shape"):
        ours.weighted_loss_and_grad(pred, y, np.ones(n + 1))


def test_sample_weight_in_fit_is_the_weighted_step():
    """One full batch with weights == the same step taken by hand from the weighted loss."""
    x, y = data(8)
    x = x.astype(np.float32)
    w = np.linspace(0.0, 2.0, 8)
    net = fn.Network([fn.Dense(4, 3, seed=0)])
    net.compile("cross_entropy", optimizer=fn.optim.SGD(lr=0.5))
    twin = fn.Network([fn.Dense(4, 3, seed=0)])
    h = net.fit(x, y, epochs=1, batch_size="full", sample_weight=w, shuffle=False, verbose=0)
    logits = twin.forward(x)
    loss, grad = losses.CrossEntropy().weighted_loss_and_grad(logits, y, w.astype(np.float32))
    twin.backward(grad)
    W = twin[0].params["W"] - 0.5 * twin[0].grads["W"]
    np.testing.assert_allclose(net[0].params["W"], W, rtol=1e-5, atol=1e-6)
    assert h["loss"][0] == pytest.approx(float(loss), rel=1e-6)


def test_class_weight_equals_the_matching_sample_weight():
    x, y = data(30)
    x = x.astype(np.float32)
    cw = {0: 1.0, 1: 3.0, 2: 0.5}
    runs = []
    for kw in (dict(class_weight=cw), dict(sample_weight=np.array([cw[c] for c in y]))):
        net = fn.Network([fn.Dense(4, 3, seed=0)])
        net.compile("cross_entropy", optimizer=fn.optim.SGD(lr=0.1))
        net.fit(x, y, epochs=2, batch_size=7, seed=3, verbose=0, **kw)
        runs.append(net[0].params["W"].copy())
    np.testing.assert_array_equal(runs[0], runs[1])
    net = fn.Network([fn.Dense(4, 3, seed=0)])
    net.compile("cross_entropy")
    with pytest.raises(ValueError, match="class_weight has no weight for the classes \\[2\\]"):
        net.fit(x, y, class_weight={0: 1, 1: 1}, verbose=0)
    with pytest.raises(ValueError, match="sample_weight must have shape \\(30,\\)"):
        net.fit(x, y, sample_weight=np.ones(29), verbose=0)
    with pytest.raises(ValueError, match="finite and >= 0"):
        net.fit(x, y, sample_weight=-np.ones(30), verbose=0)
    with pytest.raises(TypeError, match="class_weight must be a dict"):
        net.fit(x, y, class_weight=[1, 2, 3], verbose=0)


def test_validation_split_holds_out_the_last_fraction_before_shuffling():
    x, y = data(10)
    x = x.astype(np.float32)
    net = fn.Network([fn.Dense(4, 3, seed=0)])
    net.compile("cross_entropy")
    h = net.fit(x, y, epochs=2, batch_size=3, validation_split=0.25, verbose=0, seed=1)
    twin = fn.Network([fn.Dense(4, 3, seed=0)])
    twin.compile("cross_entropy")
    t = twin.fit(x[:7], y[:7], epochs=2, batch_size=3, validation_data=(x[7:], y[7:]),
                 verbose=0, seed=1)
    assert h.history == t.history
    np.testing.assert_array_equal(net[0].params["W"], twin[0].params["W"])
    np.testing.assert_allclose(h["val_loss"][-1], net.evaluate(x[7:], y[7:])["loss"], rtol=1e-6)
    with pytest.raises(ValueError, match="validation_data or validation_split, not both"):
        net.fit(x, y, validation_split=0.2, validation_data=(x, y), verbose=0)
    with pytest.raises(ValueError, match="validation_split must be a number in \\[0, 1\\)"):
        net.fit(x, y, validation_split=1.0, verbose=0)
    with pytest.raises(ValueError, match="leaves 0 to train on and 10"):
        net.fit(x, y, validation_split=0.95, verbose=0)


def batches_of(x, y, size):
    return [(x[i:i + size], y[i:i + size]) for i in range(0, len(x), size)]


def test_iterable_of_batches_trains_like_the_arrays():
    x, y = data(20)
    x = x.astype(np.float32)
    nets = []
    for how in ("arrays", "list", "generator"):
        net = fn.Network([fn.Dense(4, 3, seed=0)])
        net.compile("cross_entropy", optimizer=fn.optim.SGD(lr=0.1))
        if how == "arrays":
            h = net.fit(x, y, epochs=3, batch_size=6, shuffle=False, verbose=0)
        elif how == "list":
            h = net.fit(batches_of(x, y, 6), None, epochs=3, verbose=0)
        else:
            def endless():
                while True:
                    yield from batches_of(x, y, 6)
            h = net.fit(endless(), None, epochs=3, steps_per_epoch=4, verbose=0)
        nets.append((net[0].params["W"].copy(), h["loss"]))
    for W, loss in nets[1:]:
        np.testing.assert_array_equal(W, nets[0][0])
        assert loss == nets[0][1]


def test_iterable_errors_are_clear():
    x, y = data(12)
    x = x.astype(np.float32)
    net = fn.Network([fn.Dense(4, 3, seed=0)])
    net.compile("cross_entropy")
    gen = (b for b in batches_of(x, y, 4))
    with pytest.raises(ValueError, match="pass steps_per_epoch"):
        net.fit(gen, None, verbose=0)
    gen = (b for b in batches_of(x, y, 4))
    with pytest.raises(ValueError, match="ran out of batches after 1 of an epoch's 2"):
        net.fit(gen, None, epochs=2, steps_per_epoch=2, verbose=0)
    with pytest.raises(ValueError, match="must yield pairs"):
        net.fit([x[:4]], None, verbose=0)
    with pytest.raises(ValueError, match="batch 2 of the iterable x.*labels must lie"):
        net.fit([(x[:4], y[:4]), (x[4:8], y[4:8] + 5)], None, verbose=0)
    with pytest.raises(ValueError, match="steps_per_epoch is for an iterable"):
        net.fit(x, y, steps_per_epoch=3, verbose=0)
    with pytest.raises(ValueError, match="need arrays x, y"):
        net.fit(batches_of(x, y, 4), None, validation_split=0.5, verbose=0)
    with pytest.raises(ValueError, match="batch_size need arrays x, y"):
        net.fit(batches_of(x, y, 4), None, batch_size=4, verbose=0)
    with pytest.raises(ValueError, match="y is None"):
        net.fit(x, None, verbose=0)
