"""Losses: values and gradients against finite differences and PyTorch; label checks."""
import numpy as np
import pytest

from fastnn import losses
from _helpers import numerical_grad


def rand(*shape, seed=0, dtype=np.float64):
    return np.random.default_rng(seed).standard_normal(shape).astype(dtype)


def test_tutorial_mse_functions():
    y_true, y_pred = rand(4, 1, 3), rand(4, 1, 3, seed=1)
    assert np.isclose(losses.mse(y_true, y_pred), np.mean((y_true - y_pred) ** 2))
    np.testing.assert_allclose(losses.mse_prime(y_true, y_pred), 2 * (y_pred - y_true) / y_true.size)


@pytest.mark.parametrize("loss,make", [
    (losses.MSE(), lambda: (rand(5, 3), rand(5, 3, seed=1))),
    (losses.BinaryCrossEntropy(), lambda: (np.random.default_rng(0).uniform(0.05, 0.95, (6, 1)),
                                           np.random.default_rng(1).integers(0, 2, (6, 1)).astype(float))),
    (losses.CrossEntropy(), lambda: (rand(6, 4), np.array([0, 3, 1, 1, 2, 0]))),
    (losses.CrossEntropy(), lambda: (rand(3, 4), np.random.default_rng(2).dirichlet(np.ones(4), 3))),
], ids=["mse", "bce", "ce-labels", "ce-probabilities"])
def test_gradients_by_finite_differences(loss, make):
    y_pred, y_true = make()
    value, grad = loss.loss_and_grad(y_pred, y_true)
    assert isinstance(loss(y_pred, y_true), float)
    assert np.isclose(float(value), loss(y_pred, y_true))
    np.testing.assert_allclose(loss.grad(y_pred, y_true), numerical_grad(lambda: loss(y_pred, y_true), y_pred),
                               rtol=1e-5, atol=1e-8)
    assert grad.shape == y_pred.shape


def test_losses_match_torch():
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    logits, labels = rand(7, 5, seed=3) * 4, np.array([4, 0, 2, 2, 1, 3, 0])
    t = torch.tensor(logits, requires_grad=True)
    F.cross_entropy(t, torch.tensor(labels)).backward()
    assert np.isclose(losses.CrossEntropy()(logits, labels),
                      F.cross_entropy(torch.tensor(logits), torch.tensor(labels)).item())
    np.testing.assert_allclose(losses.CrossEntropy().grad(logits, labels), t.grad.numpy(), rtol=1e-10)
    onehot = np.eye(5)[labels]
    assert np.isclose(losses.CrossEntropy()(logits, onehot), losses.CrossEntropy()(logits, labels))

    p = np.random.default_rng(4).uniform(0.01, 0.99, (6, 2))
    y = np.random.default_rng(5).integers(0, 2, (6, 2)).astype(float)
    tp = torch.tensor(p, requires_grad=True)
    F.binary_cross_entropy(tp, torch.tensor(y)).backward()
    assert np.isclose(losses.BinaryCrossEntropy()(p, y), F.binary_cross_entropy(torch.tensor(p), torch.tensor(y)).item())
    np.testing.assert_allclose(losses.BinaryCrossEntropy().grad(p, y), tp.grad.numpy(), rtol=1e-8)

    a, b = rand(4, 3, seed=6), rand(4, 3, seed=7)
    ta = torch.tensor(a, requires_grad=True)
    F.mse_loss(ta, torch.tensor(b)).backward()
    assert np.isclose(losses.MSE()(a, b), F.mse_loss(torch.tensor(a), torch.tensor(b)).item())
    np.testing.assert_allclose(losses.MSE().grad(a, b), ta.grad.numpy(), rtol=1e-12)


def test_stable_at_extremes():
    logits = np.array([[1e4, -1e4, 0.0], [-1e4, 1e4, 3.0]], dtype=np.float32)
    value, grad = losses.CrossEntropy().loss_and_grad(logits, np.array([0, 2]))
    assert np.isfinite(value) and np.isfinite(grad).all()
    assert value.dtype == np.float32 and grad.dtype == np.float32
    p = np.array([[0.0], [1.0], [1.0], [0.0]], dtype=np.float32)
    y = np.array([[0.0], [1.0], [0.0], [1.0]], dtype=np.float32)
    value, grad = losses.BinaryCrossEntropy().loss_and_grad(p, y)
    assert np.isfinite(value) and np.isfinite(grad).all() and value > 1


def test_float32_in_float32_out():
    a, b = rand(4, 3, dtype=np.float32), rand(4, 3, seed=1, dtype=np.float32)
    assert losses.MSE().grad(a, b).dtype == np.float32
    assert losses.CrossEntropy().grad(a, np.array([0, 1, 2, 0])).dtype == np.float32


def test_get_by_name_and_bad_names():
    assert isinstance(losses.get("mse"), losses.MSE)
    assert isinstance(losses.get("binary_cross_entropy"), losses.BinaryCrossEntropy)
    assert isinstance(losses.get(losses.CrossEntropy), losses.CrossEntropy)
    with pytest.raises(ValueError, match="unknown loss 'hinge'"):
        losses.get("hinge")


def test_bad_targets_raise_naming_the_loss():
    logits = rand(4, 3)
    with pytest.raises(ValueError, match=r"CrossEntropy.*\[0, 3\).*\[0, 3\]"):
        losses.CrossEntropy()(logits, np.array([0, 1, 2, 3]))
    with pytest.raises(ValueError, match=r"CrossEntropy.*4 rows.*3 labels"):
        losses.CrossEntropy()(logits, np.array([0, 1, 2]))
    with pytest.raises(ValueError, match=r"CrossEntropy.*\(4, 3\).*\(4, 2\)"):
        losses.CrossEntropy()(logits, np.zeros((4, 2)))
    with pytest.raises(TypeError, match=r"CrossEntropy.*integer"):
        losses.CrossEntropy()(logits, np.array([0.5, 1, 2, 0]))
    with pytest.raises(ValueError, match=r"MSE.*\(4, 3\).*\(4, 2\)"):
        losses.MSE()(logits, np.zeros((4, 2)))
    # (N,) targets against (N, 1) outputs are the same data
    assert np.isclose(losses.MSE()(logits[:, :1], logits[:, 0]), 0.0)
    assert np.isclose(losses.MSE()(logits[:, None, :], logits), 0.0)
    # the same number of values in another layout is not: no silent reshape
    with pytest.raises(ValueError, match=r"MSE.*\(4, 2, 3\).*\(4, 3, 2\)"):
        losses.MSE()(rand(4, 2, 3), rand(4, 3, 2))
    with pytest.raises(ValueError, match=r"BinaryCrossEntropy.*\[0, 1\].*\[0, 3\]"):
        losses.BinaryCrossEntropy()(np.full((3, 1), 0.5), np.array([0.0, 1.0, 3.0]))
