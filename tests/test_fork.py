"""Kernels in child processes after the parent ran OpenMP kernels (csrc/forksafe.c).

libgomp's thread pool does not survive fork(): before the fork guard, a child forked
after the parent's first parallel region (multiprocessing's default on Linux, data
loader workers) blocked forever in its own first one. Each case runs in a fresh
interpreter under a timeout, so a hang fails the test instead of hanging the run:
the parent runs the big element-wise, Winograd and im2col kernels (OpenMP, two
threads), then a child made by the start method under test runs them again and
checks them against the NumPy reference.
"""
import multiprocessing
import subprocess

import pytest

from _helpers import run_python

SCRIPT = r'''
import multiprocessing, sys
import numpy as np
from fastnn import backend, kernels
from fastnn.kernels import _cpu, variants


def run_all():
    """The OpenMP kernels, compiled and reference -> list of (name, got, want)."""
    rng = np.random.default_rng(3)
    big = rng.standard_normal(1 << 21).astype(np.float32)        # FNN_PARALLEL_MIN elements
    pools = rng.standard_normal((8, 16, 128, 128)).astype(np.float32)
    x = rng.standard_normal((5, 8, 18, 20)).astype(np.float32)
    W = rng.standard_normal((9, 8, 3, 3)).astype(np.float32)
    grad_y = rng.standard_normal((5, 9, 18, 20)).astype(np.float32)
    variants.force("conv2d_forward", "winograd").__enter__()         # for the whole child
    variants.force("conv2d_backward", "winograd").__enter__()
    _cpu._set_winograd_tiles(18)                                   # several blocks
    results = {}
    for name in ("cpu", "numpy"):
        backend.use(name)
        cols = kernels.im2col(x, 3, 3, 1, 1)
        results[name] = [kernels.relu_forward(big), kernels.maxpool2d_forward(pools, 2, 2, 2)[0],
                         kernels.avgpool2d_forward(pools, 2, 2, 2),
                         kernels.conv2d_forward(x, W, None, 1, 1),
                         *kernels.conv2d_backward(grad_y, x, W, 1, 1), cols,
                         kernels.col2im(cols, x.shape, 3, 3, 1, 1)]
    backend.use("cpu")
    return results["cpu"], results["numpy"]


def check():
    """Run the kernels and the prange hook; return whether this is a forked child."""
    got, want = run_all()
    for i, (g, w) in enumerate(zip(got, want)):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-3 * float(np.abs(w).max()),
                                   err_msg=f"output {i}")
    nested = _cpu._pool_nested(4, 10, in_openmp=True)             # a Cython prange region
    assert (nested[:, 0] == 55).all(), nested
    return _cpu._in_forked_child()


if __name__ == "__main__":
    if _cpu.threads() == 1:              # built without OpenMP: nothing to hang
        print("no-openmp")
        sys.exit(0)
    assert not check()                   # the parent: libgomp's team of 2 now exists
    context = multiprocessing.get_context(sys.argv[1])
    with context.Pool(1) as pool:
        forked = pool.apply_async(check).get(timeout=60)
        print("forked" if forked else "not-forked")
'''


@pytest.mark.parametrize("method", ["fork", "forkserver", "spawn"])
def test_child_after_openmp_completes_and_matches_reference(method, tmp_path):
    if method not in multiprocessing.get_all_start_methods():
        pytest.skip(f"no {method} start method on this platform")
    script = tmp_path / "child_kernels.py"
    script.write_text(SCRIPT)
    try:
        result = run_python(f"import runpy, sys; sys.argv = [{str(script)!r}, {method!r}]; "
                            f"runpy.run_path(sys.argv[0], run_name='__main__')",
                            env={"OMP_NUM_THREADS": "2"})
    except subprocess.TimeoutExpired:
        pytest.fail(f"a {method} child hung in its OpenMP kernels")
    assert result.returncode == 0, result.stderr
    if result.stdout.split() == ["no-openmp"]:
        pytest.skip("the compiled kernels were built without OpenMP")
    if method == "fork":
        assert result.stdout.split() == ["forked"]
    elif method == "spawn":
        assert result.stdout.split() == ["not-forked"]
