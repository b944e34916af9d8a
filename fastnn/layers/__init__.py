"""Layers: each owns its params/grads, checks its input and calls the kernels."""
from .activation import LeakyReLU, ReLU, Sigmoid, Softmax, Tanh
from .augment import RandomFlip, RandomTranslation
from .base import ActivationLayer, Layer
from .conv import Conv2D
from .dense import Dense, FCLayer
from .dropout import Dropout
from .norm import BatchNorm1d, BatchNorm2d
from .pool import AvgPool2D, GlobalAvgPool2D, MaxPool2D
from .reshape import Flatten

__all__ = ["Layer", "Dense", "FCLayer", "Conv2D", "MaxPool2D", "AvgPool2D", "GlobalAvgPool2D",
           "Flatten", "ReLU", "LeakyReLU", "Sigmoid", "Tanh", "Softmax", "Dropout", "BatchNorm1d",
           "BatchNorm2d", "ActivationLayer", "RandomTranslation", "RandomFlip"]

# the built-in layers Network.save / Network.load know by class name
LAYER_CLASSES = {cls.__name__: cls for cls in (
    Dense, FCLayer, Conv2D, MaxPool2D, AvgPool2D, GlobalAvgPool2D, Flatten, ReLU, LeakyReLU,
    Sigmoid, Tanh, Softmax, Dropout, BatchNorm1d, BatchNorm2d, ActivationLayer,
    RandomTranslation, RandomFlip)}
