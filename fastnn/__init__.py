"""fastnn: a small, fast neural-network core (compiled CPU kernels, CuPy CUDA path)."""
__version__ = "0.1.0"

from . import backend, kernels  # noqa: E402,F401
from . import activations, callbacks, data, datasets, distributed, layers, losses, metrics, optim  # noqa: E402,F401
from .layers import (ActivationLayer, AvgPool2D, BatchNorm1d, BatchNorm2d, Conv2D,  # noqa: E402,F401
                     Dense, Dropout, FCLayer, Flatten, GlobalAvgPool2D, Layer, LeakyReLU,
                     MaxPool2D, RandomFlip, RandomTranslation, ReLU, Sigmoid, Softmax, Tanh)
from .network import History, Network, Sequential  # noqa: E402,F401

__all__ = ["__version__", "Network", "Sequential", "History", "Layer", "Dense", "FCLayer", "Conv2D",
           "MaxPool2D", "AvgPool2D", "GlobalAvgPool2D", "Flatten", "ReLU", "LeakyReLU", "Sigmoid", "Tanh", "Softmax",
           "Dropout", "BatchNorm1d", "BatchNorm2d", "ActivationLayer", "RandomTranslation", "RandomFlip", "losses", "activations",
           "optim", "callbacks", "metrics", "data", "datasets", "layers", "kernels", "backend"]
