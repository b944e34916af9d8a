"""Helpers shared by the test files: finite differences, a batch-recording layer, the MNIST
files, a fresh interpreter on the same fastnn, a call on a given backend."""
import os
import pathlib
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import fastnn as fn

REPO = pathlib.Path(__file__).resolve().parents[1]
# Subprocesses import the same fastnn as this process (installed or in-tree build).
PACKAGE_PARENT = os.path.dirname(os.path.dirname(os.path.abspath(fn.__file__)))


def run_python(code, env=None, drop=()):
    """Run ``code`` in a fresh interpreter that imports the fastnn this process uses
    (from a neutral directory, so no other checkout shadows it); ``env`` adds
    variables, ``drop`` removes them. -> CompletedProcess (text stdout/stderr)."""
    environment = dict(os.environ, PYTHONPATH=PACKAGE_PARENT + os.pathsep
                       + os.environ.get("PYTHONPATH", ""))
    environment.update(env or {})
    for name in drop:
        environment.pop(name, None)
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                          text=True, env=environment, cwd=os.path.dirname(PACKAGE_PARENT),
                          timeout=120)


def numerical_grad(f, array, eps=1e-6):
    """Central finite differences of the scalar ``f()`` with respect to every entry of ``array``
    (perturbed in place and restored)."""
    assert array.flags.c_contiguous, "numerical_grad perturbs the array through a flat view"
    grad = np.empty_like(array)
    flat, g = array.reshape(-1), grad.reshape(-1)
    for i in range(flat.size):
        saved = flat[i]
        flat[i] = saved + eps
        up = f()
        flat[i] = saved - eps
        down = f()
        flat[i] = saved
        g[i] = (up - down) / (2 * eps)
    return grad


class BatchRecorder(fn.Layer):
    """Identity layer that records the batch sizes it sees in training."""

    def __init__(self):
        super().__init__()
        self.sizes = []

    def forward(self, x, training=True):
        if training:
            self.sizes.append(len(x))
        return x

    def backward(self, grad_y):
        return grad_y


def shared_data_root():
    """$FASTNN_DATA, else <repo>/../shared/data; None when neither holds MNIST."""
    for root in (os.environ.get("FASTNN_DATA"), REPO.parent / "shared" / "data"):
        if root and (pathlib.Path(root) / "mnist").is_dir():
            return str(root)
    return None


needs_mnist = pytest.mark.skipif(shared_data_root() is None,
                                 reason="MNIST files not found ($FASTNN_DATA or ../shared/data)")


def run_on(name, kernel, *args, **kwargs):
    """kernel(*args) under backend ``name``: "numpy" or "cpu" for NumPy arrays; "cuda": the
    NumPy arguments copied to the GPU, the results (which must be CuPy arrays: nothing
    may fall back to the host) copied back."""
    if name == "cuda":
        cp = fn.backend.cupy()
        args = [cp.asarray(a) if isinstance(a, np.ndarray) else a for a in args]
        return _to_host(kernel(*args, **kwargs))
    previous = fn.backend.current()
    fn.backend.use(name)
    try:
        return kernel(*args, **kwargs)
    finally:
        fn.backend.use(previous)


def _to_host(result):
    """A CUDA kernel's result (an array, None or a tuple of them) as NumPy arrays."""
    if isinstance(result, tuple):
        return tuple(_to_host(r) for r in result)
    if result is None:
        return None
    assert fn.backend.is_cuda_array(result), f"a CUDA kernel returned a {type(result).__name__}"
    return fn.backend.cupy().asnumpy(result)
