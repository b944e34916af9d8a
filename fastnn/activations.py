"""The tutorial's activation functions and their derivatives (for ActivationLayer).

Each maps an array to an array of the same shape, element-wise, on NumPy and
CuPy arrays alike; ``f_prime(x)`` is the derivative f'(x) at the input x.
"""
from . import backend

__all__ = ["tanh", "tanh_prime", "sigmoid", "sigmoid_prime", "relu", "relu_prime"]


def tanh(x):
    """tanh(x)."""
    return backend.get_array_module(x).tanh(x)


def tanh_prime(x):
    """1 - tanh(x)^2."""
    return 1 - backend.get_array_module(x).tanh(x) ** 2


def sigmoid(x):
    """1 / (1 + exp(-x))."""
    # (1 + tanh(x/2)) / 2 equals 1 / (1 + exp(-x)) without overflow for large |x|
    return 0.5 * (1 + backend.get_array_module(x).tanh(0.5 * x))


def sigmoid_prime(x):
    """sigmoid(x) * (1 - sigmoid(x))."""
    s = sigmoid(x)
    return s * (1 - s)


def relu(x):
    """max(x, 0)."""
    return backend.get_array_module(x).maximum(x, 0)


def relu_prime(x):
    """1 where x > 0, else 0 (in x's dtype)."""
    return (x > 0).astype(x.dtype)
