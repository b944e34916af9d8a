"""fastnn: a small, fast neural-network core (compiled CPU kernels, CuPy CUDA path)."""
__version__ = "0.1.0"

from . import backend, kernels  # noqa: E402,F401
