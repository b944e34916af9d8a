"""The tutorial's activation functions and their derivatives (for ActivationLayer).

They work on NumPy and CuPy arrays alike.
"""
from . import backend

__all__ = ["tanh", "tanh_prime", "sigmoid", "sigmoid_prime", "relu", "relu_prime"]


def tanh(x):
    return backend.get_array_module(x).tanh(x)


def tanh_prime(x):
    return 1 - backend.get_array_module(x).tanh(x) ** 2


def sigmoid(x):
    # (1 + tanh(x/2)) / 2 equals 1 / (1 + exp(-x)) without overflow for large |x|
    return 0.5 * (1 + backend.get_array_module(x).tanh(0.5 * x))


def sigmoid_prime(x):
    s = sigmoid(x)
    return s * (1 - s)


def relu(x):
    return backend.get_array_module(x).maximum(x, 0)


def relu_prime(x):
    return (x > 0).astype(x.dtype)
